"""jaxbn: batch normalization for JAX/Flax with PyTorch's exact semantics.

Layout: :mod:`jaxbn.functional` (the pure API) is built on the private numeric core
(``jaxbn._core``) and its CPU kernels (``jaxbn._cpu_kernels``); :mod:`jaxbn.linen` holds the
Flax linen modules, :mod:`jaxbn.nnx` the same for Flax NNX (both thin shells over
``jaxbn._module_logic``), :mod:`jaxbn.models` the tutorial's networks, :mod:`jaxbn.tools` what
works on variable trees (fold, update_bn, inspect, interop, Flax checkpoints);
:mod:`jaxbn.sync` and :mod:`jaxbn.multihost` the multi-device switch and cluster start;
:mod:`jaxbn.flax_compat` ``flax.linen.BatchNorm``'s spelling over jaxbn's numbers.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from jaxbn import flax_compat, functional, linen, models, multihost, nnx, tools
from jaxbn.linen import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    GroupNorm,
    LayerNorm,
    renorm_schedule,
)
from jaxbn.sync import sync_batch_norm, sync_batch_stats
from jaxbn.tools import (
    BatchNormReport,
    FoldedModel,
    FoldResult,
    FreezeResult,
    FrozenModel,
    fold_batch_norm,
    fold_batch_norm_variables,
    freeze_batch_norm,
    from_flax_batch_norm,
    fuse_conv_bn_weights,
    fuse_dense_bn_weights,
    inspect_batchnorm,
    interop,
    unfreeze_batch_norm,
    update_bn,
)

try:
    __version__ = _version("jaxbn")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReport",
    "BatchRenorm",
    "FoldResult",
    "FoldedModel",
    "FreezeResult",
    "FrozenBatchNorm",
    "FrozenModel",
    "GhostBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "__version__",
    "flax_compat",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "freeze_batch_norm",
    "from_flax_batch_norm",
    "functional",
    "fuse_conv_bn_weights",
    "fuse_dense_bn_weights",
    "inspect_batchnorm",
    "interop",
    "linen",
    "models",
    "multihost",
    "nnx",
    "renorm_schedule",
    "sync_batch_norm",
    "sync_batch_stats",
    "tools",
    "unfreeze_batch_norm",
    "update_bn",
]
