"""Flax NNX module ``GroupNorm`` (``torch.nn.GroupNorm``): the small-batch alternative.

Per example, channels are split into ``num_groups`` groups and each group is normalized over
its channels and spatial positions (biased variance), then scaled and shifted per channel::

    y = (x - mean_group) / sqrt(var_group + eps) * scale_c + bias_c

No batch statistics: the same in train and eval, fine with a batch of one. The numbers are
:func:`jaxbn.functional.group_norm`'s, as in :class:`jaxbn.linen.GroupNorm`.

Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> gn = jaxbn.nnx.GroupNorm(4, 16)
    >>> y = gn(jnp.ones((1, 8, 8, 16)))                        # [N, H, W, C]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn._module_logic import check_feature_count
from jaxbn.nnx.batch_norm import affine_params

__all__ = ["GroupNorm"]


class GroupNorm(nnx.Module):
    """Group normalization over [N, ..., C] inputs (channel axis ``axis``, batch axis 0).

    Args:
      num_groups: number of channel groups; must divide C.
      num_channels: C (PyTorch requires it too: the parameters are created here).
      eps: added to the variance.
      affine: learn per-channel ``scale`` and ``bias`` (``nnx.Param``).
      axis: the channel axis.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init, bias_init: initializers ``(key, shape, dtype)``; default ones / zeros.
      rngs: ``nnx.Rngs``, needed only by a random initializer.

    Call: ``gn(x, *, train=None)``: ``x`` [N, ..., C] → ``y`` like ``x``; ``train`` (and
    ``use_running_average``) are accepted and ignored, so model code can pass them uniformly.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = -1,
        *,
        param_dtype: Any = jnp.float32,
        scale_init: Any = nn.initializers.ones,
        bias_init: Any = nn.initializers.zeros,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        check_feature_count(num_channels, "num_channels", allow_none=False)
        logic.check_group_norm_fields(num_groups, num_channels, eps, axis)
        logic.check_initializers(scale_init, bias_init)
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = eps
        self.affine = bool(affine)
        self.axis = axis
        self.scale, self.bias = affine_params(
            self.affine, (self.num_channels,), scale_init, bias_init, param_dtype, rngs
        )

    def __call__(
        self, x: jax.Array, use_running_average: Any = None, *, train: Any = None
    ) -> jax.Array:
        """Group norm of ``x``, the same in train and eval.

        Args:
          x: [N, ..., C], the channels at ``axis``.
          use_running_average: accepted and ignored (uniform model code).
          train: accepted and ignored.

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          ValueError: ``num_groups`` does not divide C, or one value per group.
          RuntimeError: fewer than 2 dims, or C other than ``num_channels``.

        Example:
            >>> import jax.numpy as jnp, jaxbn.nnx
            >>> gn = jaxbn.nnx.GroupNorm(2, 6)
            >>> gn(jnp.ones((2, 4, 4, 6))).shape                     # [N, H, W, C]
            (2, 4, 4, 6)
        """
        del use_running_average, train  # the same in train and eval
        logic.group_norm_channels(self.num_channels, self.affine, self.axis, x)
        weight = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return functional.group_norm(x, self.num_groups, weight, bias, self.eps, axis=self.axis)
