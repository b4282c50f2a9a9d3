"""Flax module ``LayerNorm`` over the trailing dims (``torch.nn.LayerNorm``).

Each example is normalized over its last ``len(normalized_shape)`` dims::

    y = (x - mean) / sqrt(var + eps) * scale + bias      # scale, bias: normalized_shape

Batch-independent, the same in train and eval. The tutorial's ``nn.LayerNorm([256, 32, 32])``
on NCHW data is ``jaxbn.LayerNorm((32, 32, 256))`` on NHWC data: the same elements are
normalized together, with the affine parameters laid out like the input. Relation to
``flax.linen.LayerNorm``: PyTorch's defaults (``eps=1e-5``) and an explicit, checked shape.

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> ln = jaxbn.LayerNorm((8, 8, 16))
    >>> x = jnp.ones((2, 8, 8, 16))                           # [N, H, W, C]
    >>> y = ln.apply(ln.init(jax.random.key(0), x), x)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn._module_logic import as_shape
from jaxbn.linen.batch_norm import Initializer

__all__ = ["LayerNorm"]


class LayerNorm(nn.Module):
    """Layer normalization over the trailing ``normalized_shape`` dims.

    Attributes:
      normalized_shape: int or shape of the trailing dims to normalize over.
      eps: added to the variance.
      elementwise_affine: learn ``scale`` and ``bias`` of shape ``normalized_shape``.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init: initializer of ``scale``, Flax's signature ``(key, shape, dtype)``; default
        ones.
      bias_init: initializer of ``bias``; default zeros.
    """

    normalized_shape: int | Sequence[int]
    eps: float = 1e-5
    elementwise_affine: bool = True
    param_dtype: Any = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    def __post_init__(self) -> None:
        logic.check_layer_norm_fields(self.normalized_shape, self.eps)
        logic.check_initializers(self.scale_init, self.bias_init)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        """Layer norm of ``x`` over its trailing ``normalized_shape``, the same in train and eval.

        Args:
          x: ``[*, *normalized_shape]``.
          train: accepted and ignored (uniform model code).

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          RuntimeError: trailing dims other than ``normalized_shape`` (``Given
            normalized_shape=[3], expected input with shape [*, 3], but got input of
            size[2, 4]``).

        Example:
            >>> import jax, jax.numpy as jnp, jaxbn
            >>> ln = jaxbn.LayerNorm((4, 4, 6))
            >>> x = jnp.ones((2, 4, 4, 6))                           # [N, H, W, C]
            >>> variables = ln.init(jax.random.key(0), x)
            >>> ln.apply(variables, x).shape
            (2, 4, 4, 6)
        """
        del train  # same in train and eval; accepted so model code can pass it uniformly
        shape = as_shape(self.normalized_shape)
        weight = bias = None
        if self.elementwise_affine:
            weight = self.param("scale", self.scale_init, shape, self.param_dtype)
            bias = self.param("bias", self.bias_init, shape, self.param_dtype)
        return functional.layer_norm(x, shape, weight, bias, self.eps)
