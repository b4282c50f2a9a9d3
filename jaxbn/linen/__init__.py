"""Flax linen modules: hold the variables and call :mod:`jaxbn.functional`."""

from jaxbn.linen.batch_norm import (
    MOMENTS_COLLECTION,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)
from jaxbn.linen.batch_renorm import BatchRenorm, renorm_schedule
from jaxbn.linen.frozen_batch_norm import FrozenBatchNorm
from jaxbn.linen.ghost_batch_norm import GhostBatchNorm
from jaxbn.linen.group_norm import GroupNorm
from jaxbn.linen.layer_norm import LayerNorm

__all__ = [
    "MOMENTS_COLLECTION",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "renorm_schedule",
]
