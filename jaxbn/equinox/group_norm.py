"""Equinox layer ``GroupNorm`` with ``torch.nn.GroupNorm``'s fields and defaults.

Per example, the channels are split into ``num_groups`` groups and each group is normalized over
its channels and positions (biased variance), then scaled and shifted per channel::

    y = (x - mean_group) / sqrt(var_group + eps) * weight_c + bias_c

Batch-independent: the same in training and inference, and called on one example as Equinox
layers are (``[C, ...]``, channels first; ``jax.vmap`` it over a batch). Relation to
``eqx.nn.GroupNorm``: the same computation with PyTorch's names (``num_channels``, ``affine``)
and :func:`jaxbn.functional.group_norm`'s numbers. Like Equinox's, it may be called with or
without a state: ``gn(x)`` returns ``y``, ``gn(x, state)`` returns ``(y, state)``.

Example:
    >>> from jaxbn.equinox import GroupNorm
    >>> gn = GroupNorm(4, 16)
    >>> y = jax.vmap(gn)(jnp.ones((2, 16, 8, 8)))               # [N, C, H, W]
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn.equinox.batch_norm import default_dtype

__all__ = ["GroupNorm"]

_NO_STATE = object()


class GroupNorm(eqx.Module):
    """Group normalization of one example ``[C, ...]`` (channel axis ``axis``, default 0).

    Attributes:
      weight, bias: [C] (ones, zeros), None without ``affine``.
      num_groups: the number of groups; divides C.
      num_channels: C.
      eps: added to the variance (PyTorch's 1e-5).
      affine: learn ``weight`` and ``bias``.
      axis: the channel axis of the example.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    num_groups: int = eqx.field(static=True)
    num_channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    affine: bool = eqx.field(static=True)
    axis: int = eqx.field(static=True)

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        axis: int = 0,
        param_dtype: Any = None,
    ) -> None:
        logic.check_feature_count(num_channels, "num_channels", allow_none=False)
        logic.check_group_norm_fields(num_groups, num_channels, eps, axis)
        param_dtype = default_dtype() if param_dtype is None else param_dtype
        self.weight = jnp.ones((num_channels,), param_dtype) if affine else None
        self.bias = jnp.zeros((num_channels,), param_dtype) if affine else None
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.axis = axis

    def __call__(self, x: jax.Array, state: Any = _NO_STATE, *, key: Any = None) -> Any:
        """``x``: one example ``[C, ...]`` → ``y`` (or ``(y, state)`` when given a state)."""
        del key
        x = jnp.asarray(x)
        logic.group_norm_channels(self.num_channels, self.affine, self.axis, x[None])
        axis = self.axis + 1 if self.axis >= 0 else self.axis  # after the batch axis added
        y = functional.group_norm(
            x[None], self.num_groups, self.weight, self.bias, self.eps, axis=axis
        )[0]
        return y if state is _NO_STATE else (y, state)
