"""Flax NNX module ``LayerNorm`` over the trailing dims (``torch.nn.LayerNorm``).

Each example is normalized over its last ``len(normalized_shape)`` dims::

    y = (x - mean) / sqrt(var + eps) * scale + bias      # scale, bias: normalized_shape

Batch-independent, the same in train and eval; the numbers are
:func:`jaxbn.functional.layer_norm`'s, as in :class:`jaxbn.linen.LayerNorm`. PyTorch's
``nn.LayerNorm([C, H, W])`` on NCHW images is ``LayerNorm((H, W, C))`` on NHWC images.

Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> ln = jaxbn.nnx.LayerNorm((8, 8, 16))
    >>> y = ln(jnp.ones((2, 8, 8, 16)))                        # [N, H, W, C]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn._module_logic import as_shape
from jaxbn.nnx.batch_norm import affine_params

__all__ = ["LayerNorm"]


class LayerNorm(nnx.Module):
    """Layer normalization over the trailing ``normalized_shape`` dims.

    Args:
      normalized_shape: int or shape of the trailing dims to normalize over.
      eps: added to the variance.
      elementwise_affine: learn ``scale`` and ``bias`` (``nnx.Param``) of that shape.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init, bias_init: initializers ``(key, shape, dtype)``; default ones / zeros.
      rngs: ``nnx.Rngs``, needed only by a random initializer.

    Call: ``ln(x, *, train=None)``: ``x`` ``[*, *normalized_shape]`` → ``y`` like ``x``; ``train``
    (and ``use_running_average``) are accepted and ignored.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        *,
        param_dtype: Any = jnp.float32,
        scale_init: Any = nn.initializers.ones,
        bias_init: Any = nn.initializers.zeros,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        logic.check_layer_norm_fields(normalized_shape, eps)
        logic.check_initializers(scale_init, bias_init)
        self.normalized_shape = as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self.scale, self.bias = affine_params(
            self.elementwise_affine, self.normalized_shape, scale_init, bias_init, param_dtype, rngs
        )

    def __call__(
        self, x: jax.Array, use_running_average: Any = None, *, train: Any = None
    ) -> jax.Array:
        """Layer norm of ``x`` over its trailing ``normalized_shape``, the same in train and eval.

        Args:
          x: ``[*, *normalized_shape]``.
          use_running_average: accepted and ignored (uniform model code).
          train: accepted and ignored.

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          RuntimeError: trailing dims other than ``normalized_shape``.

        Example:
            >>> import jax.numpy as jnp, jaxbn.nnx
            >>> ln = jaxbn.nnx.LayerNorm(6)
            >>> ln(jnp.ones((2, 6))).shape
            (2, 6)
        """
        del use_running_average, train  # the same in train and eval
        weight = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
