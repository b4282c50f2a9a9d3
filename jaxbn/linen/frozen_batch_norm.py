"""Flax module ``FrozenBatchNorm``: batch norm with every statistic and parameter constant.

torchvision's and detectron2's ``FrozenBatchNorm2d``, over any rank::

    y = (x − mean) · rsqrt(var + eps) · scale + bias          (train and eval alike)

``mean``, ``var``, ``scale`` and ``bias`` are read from a :class:`jaxbn.BatchNorm`'s variables
tree (``params: scale, bias``; ``batch_stats: mean, var, num_batches_tracked``) and are
constants: ``stop_gradient`` gives them zero gradients, and nothing is ever updated (``train``
is accepted and ignored, so the module drops into code that passes it). The gradient with
respect to ``x`` flows as through an affine map. Checkpoints move freely between a
``BatchNorm`` and a ``FrozenBatchNorm`` with the same fields; :func:`jaxbn.freeze_batch_norm`
turns every batch norm of a model into this without rebuilding it.

Relation to PyTorch: ``torchvision.ops.FrozenBatchNorm2d(C)`` (``eps=1e-5``, its buffers
``weight, bias, running_mean, running_var`` are ``scale, bias, mean, var`` here), or a
``BatchNorm2d`` in ``eval()`` with ``requires_grad_(False)``. torchvision computes
``x · (w·rsqrt(rv+eps)) + (b − rm·w·rsqrt(rv+eps))``: the same numbers up to rounding.

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> bn = jaxbn.FrozenBatchNorm(8)
    >>> variables = bn.init(jax.random.key(0), jnp.ones((2, 8)))   # a BatchNorm's tree
    >>> y = bn.apply(variables, jnp.ones((2, 8)), train=True)       # no mutable needed
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn.linen.batch_norm import affine_params, has_params, running_stats
from jaxbn.linen.variant_fields import VariantFields

__all__ = ["FrozenBatchNorm", "frozen_batch_norm"]


def frozen_batch_norm(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    eps: float = 1e-5,
    *,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``(x − mean) · rsqrt(var + eps) · scale + bias`` with ``mean, var, scale, bias``
    constant (no gradient). x: [N, ..., C]; the others [C] (``scale``/``bias`` may be None)."""
    constant = lambda a: None if a is None else jax.lax.stop_gradient(a)
    y, _, _ = functional.batch_norm(
        x,
        constant(mean),
        constant(var),
        constant(scale),
        constant(bias),
        False,
        0.0,
        eps,
        axis=axis,
        mask=mask,
    )
    return y


class FrozenBatchNorm(VariantFields):
    """Frozen batch norm (see module docstring): a BatchNorm's variables, all constant.

    ``num_features`` and ``eps`` go by position or keyword, the rest by keyword only (the
    fields shared with the other variants are in ``jaxbn.linen.variant_fields``).

    Attributes:
      num_features: C; inferred from the input when None.
      eps: added to the variance (torchvision's 1e-5).
      affine: whether ``params: scale, bias`` exist (as the BatchNorm it replaces).
      axis: the feature axis (-1 channels-last; 1 for NC...).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of the variables created at init.
      scale_init, bias_init: initializers at init (a frozen module is usually loaded instead).
      bias, use_scale, use_bias, scale_metadata, bias_metadata: as :class:`jaxbn.BatchNorm`'s
        (which parameters exist, as in the BatchNorm it replaces).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jaxbn
        >>> bn = jaxbn.FrozenBatchNorm(2)
        >>> x = jnp.arange(8.0).reshape(4, 2)                        # [N, C]
        >>> variables = bn.init(jax.random.key(0), x)
        >>> y = bn.apply(variables, x, train=True)               # (x − 0) / sqrt(1 + eps)
        >>> print(np.asarray(y[:, 0]).round(2))
        [0. 2. 4. 6.]
    """

    # positional like torchvision's FrozenBatchNorm2d(num_features, eps); the rest by keyword
    eps: float = 1e-5
    _: dataclasses.KW_ONLY

    #: what jaxbn's tools read (``jaxbn.tools.layers.kind_of``): constants, which no tool resets,
    #: re-estimates or updates; it has no batch statistics, so it never reports any.
    batch_norm_kind: ClassVar[str] = "frozen"

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """``(x − mean)·rsqrt(var + eps)·scale + bias``, the same in train and eval.

        Args:
          x: [N, ..., C], the features at ``axis``.
          train: accepted and ignored (uniform model code); nothing is updated.
          mask: optional boolean, broadcastable to ``x``: False elements output 0.

        Returns:
          ``y``, shaped like ``x``, in ``dtype`` (default: ``x``'s dtype).

        Raises:
          RuntimeError: an input whose channel count is not the variables'.

        Example:
            >>> import jax, jax.numpy as jnp, jaxbn
            >>> bn = jaxbn.FrozenBatchNorm(3)
            >>> variables = bn.init(jax.random.key(0), jnp.ones((2, 3)))
            >>> bn.apply(variables, jnp.ones((2, 3))).shape
            (2, 3)
        """
        del train  # the same in train and eval
        x, features = logic.input_features(self, x, affine=has_params(self))
        scale, bias = affine_params(self, features)
        mean_v, var_v, _ = running_stats(self, features, counter=False)  # constants
        mean, var = mean_v.value, var_v.value
        y = frozen_batch_norm(x, mean, var, scale, bias, self.eps, axis=self.axis, mask=mask)
        return logic.output_dtype(self, y)
