"""Flax module ``GroupNorm``: the small-batch alternative to batch norm (``torch.nn.GroupNorm``).

Per example, channels are split into ``num_groups`` groups and each group is normalized over its
channels and spatial positions::

    y = (x - mean_group) / sqrt(var_group + eps) * scale_c + bias_c

No batch statistics, so it behaves the same in train and eval and works with a batch of one.
``GroupNorm(1, C)`` normalizes each example over all of (H, W, C); ``GroupNorm(C, C)`` is
instance norm. Relation to ``flax.linen.GroupNorm``: same computation, but PyTorch's argument
order and defaults (``eps=1e-5``, ``num_groups`` required).

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> gn = jaxbn.GroupNorm(num_groups=4, num_channels=16)
    >>> x = jnp.ones((1, 8, 8, 16))                            # [N, H, W, C]
    >>> y = gn.apply(gn.init(jax.random.key(0), x), x)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn.linen.batch_norm import Initializer

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    """Group normalization over [N, ..., C] inputs (channel axis ``axis``, batch axis 0).

    Attributes:
      num_groups: number of channel groups; must divide C.
      num_channels: C; inferred from the input when None, checked when given.
      eps: added to the variance.
      affine: learn per-channel ``scale`` and ``bias``.
      axis: the channel axis.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init: initializer of ``scale``, Flax's signature ``(key, shape, dtype)``; default
        ones.
      bias_init: initializer of ``bias``; default zeros.
    """

    num_groups: int
    num_channels: int | None = None
    eps: float = 1e-5
    affine: bool = True
    axis: int = -1
    param_dtype: Any = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    def __post_init__(self) -> None:
        logic.check_group_norm_fields(self.num_groups, self.num_channels, self.eps, self.axis)
        logic.check_initializers(self.scale_init, self.bias_init)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        """Group norm of ``x``, the same in train and eval.

        Args:
          x: [N, ..., C], the channels at ``axis``.
          train: accepted and ignored (uniform model code).

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          ValueError: ``num_groups`` does not divide C, or one value per group.
          RuntimeError: fewer than 2 dims, or C other than ``num_channels``.

        Example:
            >>> import jax, jax.numpy as jnp, jaxbn
            >>> gn = jaxbn.GroupNorm(num_groups=2)
            >>> x = jnp.ones((2, 4, 4, 6))                           # [N, H, W, C]
            >>> variables = gn.init(jax.random.key(0), x)
            >>> gn.apply(variables, x).shape
            (2, 4, 4, 6)
        """
        del train  # same in train and eval; accepted so model code can pass it uniformly
        x = jnp.asarray(x)
        channels = logic.group_norm_channels(self.num_channels, self.affine, self.axis, x)
        weight = bias = None
        if self.affine:
            weight = self.param("scale", self.scale_init, (channels,), self.param_dtype)
            bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
        return functional.group_norm(x, self.num_groups, weight, bias, self.eps, axis=self.axis)
