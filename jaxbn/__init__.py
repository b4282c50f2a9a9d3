"""jaxbn: batch normalization for JAX/Flax with PyTorch's exact semantics."""

from jaxbn import functional, interop, models, multihost, tree_paths
from jaxbn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from jaxbn.fold import (
    FoldedModel,
    FoldResult,
    fold_batch_norm,
    fold_batch_norm_variables,
    fuse_conv_bn_weights,
    fuse_dense_bn_weights,
)
from jaxbn.group_norm import GroupNorm
from jaxbn.inspect_bn import BatchNormReport, inspect_batchnorm
from jaxbn.layer_norm import LayerNorm
from jaxbn.sync import sync_batch_norm
from jaxbn.update_bn import update_bn

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReport",
    "FoldResult",
    "FoldedModel",
    "GroupNorm",
    "LayerNorm",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "functional",
    "fuse_conv_bn_weights",
    "fuse_dense_bn_weights",
    "inspect_batchnorm",
    "interop",
    "models",
    "multihost",
    "sync_batch_norm",
    "tree_paths",
    "update_bn",
]
