"""jaxbn: batch normalization for JAX/Flax with PyTorch's exact semantics."""

from jaxbn import functional
from jaxbn.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from jaxbn.group_norm import GroupNorm
from jaxbn.layer_norm import LayerNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "functional",
]
