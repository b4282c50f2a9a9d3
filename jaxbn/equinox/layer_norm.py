"""Equinox layer ``LayerNorm`` over the trailing dims, with ``torch.nn.LayerNorm``'s fields.

Each example is normalized over its last ``len(normalized_shape)`` dims::

    y = (x - mean) / sqrt(var + eps) * weight + bias      # weight, bias: normalized_shape

Batch-independent (the same in training and inference); ``x`` may be one example or a batch:
only the trailing ``normalized_shape`` is reduced. Relation to ``eqx.nn.LayerNorm``: PyTorch's
names (``normalized_shape``, ``elementwise_affine``) and :func:`jaxbn.functional.layer_norm`'s
numbers. ``ln(x)`` returns ``y``; ``ln(x, state)`` returns ``(y, state)``.

Example:
    >>> from jaxbn.equinox import LayerNorm
    >>> ln = LayerNorm((16, 8, 8))                              # an example [C, H, W]
    >>> y = ln(jnp.ones((16, 8, 8)))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn.equinox.batch_norm import default_dtype

__all__ = ["LayerNorm"]

_NO_STATE = object()


class LayerNorm(eqx.Module):
    """Layer normalization over the trailing ``normalized_shape`` dims.

    Attributes:
      weight, bias: arrays of ``normalized_shape`` (ones, zeros), None without
        ``elementwise_affine``.
      normalized_shape: the trailing shape normalized over.
      eps: added to the variance (PyTorch's 1e-5).
      elementwise_affine: learn ``weight`` and ``bias``.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    elementwise_affine: bool = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        *,
        param_dtype: Any = None,
    ) -> None:
        logic.check_layer_norm_fields(normalized_shape, eps)
        shape = logic.as_shape(normalized_shape)
        param_dtype = default_dtype() if param_dtype is None else param_dtype
        self.weight = jnp.ones(shape, param_dtype) if elementwise_affine else None
        self.bias = jnp.zeros(shape, param_dtype) if elementwise_affine else None
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine

    def __call__(self, x: jax.Array, state: Any = _NO_STATE, *, key: Any = None) -> Any:
        """``x``: ``[*, *normalized_shape]`` → ``y`` (or ``(y, state)`` when given a state)."""
        del key
        y = functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y if state is _NO_STATE else (y, state)
