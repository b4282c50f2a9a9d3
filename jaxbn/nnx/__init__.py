"""jaxbn for Flax NNX: the batch, group and layer norms and the batch norm variants
(``BatchRenorm``, ``GhostBatchNorm``, ``FrozenBatchNorm``, ``freeze_batch_norm``) as
``flax.nnx.Module`` s, ``flax_compat.BatchNorm`` (``flax.nnx.BatchNorm``'s spelling over jaxbn's
numbers: the one-line switch), the tutorial's models, and the tools through the Linen variables
layout.

The modules are thin shells over :mod:`jaxbn.functional` (the same numbers as the Linen
modules and PyTorch); the mode follows NNX's idiom — ``model.train()`` / ``model.eval()`` or
a per-call ``train=`` — and a batch norm that was never given one raises on its first call.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbn.nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    ...         # was nnx.BatchNorm(16, rngs=rngs): the same arguments, seed and variables
    ...         self.bn = jaxbn.nnx.flax_compat.BatchNorm(16, rngs=rngs)
    ...     def __call__(self, x):
    ...         return nnx.relu(self.bn(self.conv(x)))
    >>> net = Net(nnx.Rngs(0))
    >>> net.train(); y = net(jnp.ones((8, 6, 6, 3)))
    >>> y.shape
    (8, 6, 6, 16)
"""

from jaxbn.nnx import flax_compat
from jaxbn.nnx.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from jaxbn.nnx.batch_renorm import BatchRenorm
from jaxbn.nnx.fold import FoldedBatchNorm
from jaxbn.nnx.freeze import freeze_batch_norm, unfreeze_batch_norm
from jaxbn.nnx.frozen_batch_norm import FrozenBatchNorm, FrozenParam, trainable
from jaxbn.nnx.ghost_batch_norm import GhostBatchNorm
from jaxbn.nnx.group_norm import GroupNorm
from jaxbn.nnx.layer_norm import LayerNorm
from jaxbn.nnx.models import MLP, ConvNet, ResidualBlock, ResNet
from jaxbn.nnx.tools import (
    fold_batch_norm,
    from_linen_variables,
    inspect_batchnorm,
    nnx_to_torch,
    to_linen_variables,
    torch_names,
    torch_to_nnx,
    update_bn,
)

__all__ = [
    "MLP",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "ConvNet",
    "FoldedBatchNorm",
    "FrozenBatchNorm",
    "FrozenParam",
    "GhostBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "ResNet",
    "ResidualBlock",
    "flax_compat",
    "fold_batch_norm",
    "freeze_batch_norm",
    "from_linen_variables",
    "inspect_batchnorm",
    "nnx_to_torch",
    "to_linen_variables",
    "torch_names",
    "torch_to_nnx",
    "trainable",
    "unfreeze_batch_norm",
    "update_bn",
]
