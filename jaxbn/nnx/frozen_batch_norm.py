"""Flax NNX module ``FrozenBatchNorm`` (torchvision's ``FrozenBatchNorm2d``), the twin of
:class:`jaxbn.FrozenBatchNorm`: a batch norm whose variables are all constants::

    y = (x − mean) · rsqrt(var + eps) · scale + bias        in train and eval alike

Nothing is updated and no gradient reaches ``scale``/``bias``/``mean``/``var``. The
variables keep a :class:`jaxbn.nnx.BatchNorm`'s names; ``scale`` and ``bias`` are
:class:`FrozenParam` — an ``nnx.Param`` (so checkpoints and the tools that read parameters see
them where a BatchNorm's are) that an optimizer leaves alone when built with
``wrt=jaxbn.nnx.trainable`` (``nnx.Param`` but not ``FrozenParam``): a zero gradient alone does
not stop weight decay.

Example:
    >>> import jax.numpy as jnp, optax, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.FrozenBatchNorm(8)          # usually loaded (torch_to_nnx) or frozen
    >>> y = bn(jnp.ones((4, 8)))                                            # [N, C]
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), bn)
    >>> opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=jaxbn.nnx.trainable)
    >>> y.shape
    (4, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn.linen.frozen_batch_norm import frozen_batch_norm
from jaxbn.nnx.batch_norm import Initializer, init_variables

__all__ = ["FrozenBatchNorm", "FrozenParam", "trainable"]


class FrozenParam(nnx.Param):
    """A frozen batch norm's ``scale`` / ``bias``: an ``nnx.Param`` that is not trained.

    :func:`jaxbn.nnx.freeze_batch_norm` makes them; ``jaxbn.nnx.trainable`` (``nnx.Param``
    but not ``FrozenParam``) leaves them out of an optimizer's ``wrt`` and of a gradient's
    ``nnx.DiffState``, while ``nnx.Param`` still selects them (checkpoints, ``nnx.state``).

    Args:
      value: the array, [C] (the batch norm's ``num_features``).
      **metadata: ``nnx.Variable`` metadata (e.g. sharding), kept as given.

    Raises:
      TypeError: no value, as any ``nnx.Variable`` (``Variable.__init__() missing 1 required
        positional argument: 'value'``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.nnx import FrozenParam, trainable
      >>> scale = FrozenParam(jnp.ones(3))
      >>> isinstance(scale, nnx.Param), scale.shape
      (True, (3,))
      >>> class Affine(nnx.Module):
      ...     def __init__(self):
      ...         self.scale = FrozenParam(jnp.ones(3))
      ...         self.bias = nnx.Param(jnp.zeros(3))
      >>> [path for path, _ in nnx.to_flat_state(nnx.state(Affine(), trainable))]
      [('bias',)]
    """


#: ``nnx.Param`` but not :class:`FrozenParam`: the ``wrt`` of an optimizer (and the
#: ``nnx.DiffState`` of a gradient) that trains a model with frozen batch norms.
trainable = nnx.All(nnx.Param, nnx.Not(FrozenParam))


class FrozenBatchNorm(nnx.Module):
    """Frozen batch norm (see module docstring): a BatchNorm's variables, all constant.

    Args:
      num_features: C (by position).
      eps: added to the variance (torchvision's 1e-5); by position or keyword.
      affine: whether ``scale`` and ``bias`` exist (as in the BatchNorm it replaces).
      axis: the feature axis (-1 channels-last; 1 for NC...).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of the variables created here.
      scale_init, bias_init: initializers (a frozen module is usually loaded instead).
      bias, use_scale, use_bias, scale_metadata, bias_metadata: as
        :class:`jaxbn.nnx.BatchNorm`'s (which parameters exist, as in the BatchNorm it
        replaces).
      rngs: ``nnx.Rngs``, needed only by a random initializer.

    Call:
      ``bn(x, use_running_average=None, *, train=None, mask=None)``: the mode is accepted and
      ignored (the same in train and eval); ``x`` [N, ..., C] → ``y`` like ``x``.
    """

    #: input ranks accepted (None: any): a frozen BatchNorm2d keeps its rank check.
    expected_ranks: ClassVar[tuple[int, ...] | None] = None
    rank_message: ClassVar[str] = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        axis: int = -1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Initializer = nn.initializers.ones,
        bias_init: Initializer = nn.initializers.zeros,
        bias: bool = True,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        rngs: nnx.Rngs | None = None,
    ) -> None:
        logic.check_feature_count(num_features, "num_features", allow_none=False)
        logic.check_variant_fields(num_features, eps, axis, scale_init, bias_init)
        logic.learned_params(affine, bias, use_scale, use_bias)
        self.num_features = int(num_features)
        self.eps = eps
        self.axis = axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        init_variables(
            self,
            affine=bool(affine),
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            bias=bias,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            param_type=FrozenParam,
        )
        #: what :func:`jaxbn.nnx.unfreeze_batch_norm` turns this module back into (the graph
        #: definition of the module it froze), or None: a FrozenBatchNorm built as one.
        self.unfrozen = None

    def __call__(
        self,
        x: jax.Array,
        use_running_average: Any = None,
        *,
        train: Any = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``(x − mean)·rsqrt(var + eps)·scale + bias``, the same in train and eval.

        Args:
          x: [N, ..., C], the features at ``axis``.
          use_running_average: accepted and ignored (uniform model code).
          train: accepted and ignored; nothing is updated.
          mask: optional boolean, broadcastable to ``x``: False elements output 0.

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          RuntimeError: an input whose channel count is not ``num_features``.

        Example:
            >>> import jax.numpy as jnp, jaxbn.nnx
            >>> bn = jaxbn.nnx.FrozenBatchNorm(3)
            >>> bn(jnp.ones((2, 3))).shape
            (2, 3)
        """
        del use_running_average, train  # the same in train and eval
        x, features = logic.input_features(self, x)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        mean, var = self.mean[...], self.var[...]
        if self.num_batches_tracked is not None:
            stats = logic.RunningStats(mean, var, self.num_batches_tracked[...])
            logic.check_running_stats(type(self).__name__, stats, features)
        y = frozen_batch_norm(x, mean, var, scale, bias, self.eps, axis=self.axis, mask=mask)
        return logic.output_dtype(self, y)
