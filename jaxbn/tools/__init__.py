"""Tools on variable trees: fold, update_bn, inspect, interop, Flax checkpoints. They import
the core and the modules; nothing in the core or the modules imports them."""

from jaxbn.tools import interop
from jaxbn.tools.flax_checkpoint import from_flax_batch_norm
from jaxbn.tools.fold import (
    FoldedModel,
    FoldResult,
    fold_batch_norm,
    fold_batch_norm_variables,
    fuse_conv_bn_weights,
    fuse_dense_bn_weights,
)
from jaxbn.tools.freeze import (
    FreezeResult,
    FrozenModel,
    freeze_batch_norm,
    unfreeze_batch_norm,
)
from jaxbn.tools.inspect_bn import BatchNormReport, inspect_batchnorm
from jaxbn.tools.update_bn import update_bn

__all__ = [
    "BatchNormReport",
    "FoldResult",
    "FoldedModel",
    "FreezeResult",
    "FrozenModel",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "freeze_batch_norm",
    "from_flax_batch_norm",
    "fuse_conv_bn_weights",
    "fuse_dense_bn_weights",
    "inspect_batchnorm",
    "interop",
    "unfreeze_batch_norm",
    "update_bn",
]
