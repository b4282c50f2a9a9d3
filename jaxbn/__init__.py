"""jaxbn: batch normalization for JAX/Flax with PyTorch's exact semantics."""

from jaxbn import functional, interop, models, multihost
from jaxbn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from jaxbn.group_norm import GroupNorm
from jaxbn.layer_norm import LayerNorm
from jaxbn.sync import sync_batch_norm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "functional",
    "interop",
    "models",
    "multihost",
    "sync_batch_norm",
]
