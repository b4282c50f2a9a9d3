"""``flax.nnx.BatchNorm``'s spelling with jaxbn's numbers: the one-line switch for Flax NNX code.

Replace the import and nothing else (the Flax NNX MNIST tutorial's CNN, for example)::

    from jaxbn.nnx.flax_compat import BatchNorm     # was: from flax.nnx import BatchNorm
    self.batch_norm1 = BatchNorm(32, rngs=rngs)      # unchanged

Every argument, attribute and the call take ``flax.nnx.BatchNorm``'s names, defaults and
meanings: ``use_running_average`` (default False: training; ``model.train()`` /
``model.eval()`` / ``nnx.view`` / a per-call value set it), ``momentum`` as the weight of the
**old** value (0.99; jaxbn's and PyTorch's ``momentum`` is ``1 - momentum``), ``epsilon``,
``use_scale``, ``use_bias``, ``scale_init``, ``bias_init``, ``scale_metadata``,
``bias_metadata``, ``dtype``, ``param_dtype``, ``promote_dtype``, ``axis``, ``axis_name``,
``axis_index_groups``, ``rngs`` — and the variables and the random stream are Flax's:
``scale``, ``bias`` (``nnx.Param``, each created from its own ``rngs.params()`` key, scale
first) and ``mean``, ``var`` (``nnx.BatchStat``, float32), so the same seed gives the same
parameters, in this layer and in every layer after it. The numbers are jaxbn's (PyTorch's):

* the running variance is the **unbiased** one (``σ²·n/(n-1)``; Flax keeps the biased one);
  the running mean is the same;
* a third ``nnx.BatchStat``, ``num_batches_tracked`` (int32 scalar), counts the training calls
  (Flax has none); PyTorch's ``state_dict`` and jaxbn's tools read it;
* the variance is always computed stably (``use_fast_variance`` is accepted and changes
  nothing; Flax's fast one gives ``var ≈ 40`` instead of 1 for ``randn + 1e4`` in float32), and
  the statistics are reduced in float32;
* with ``axis_name``, statistics are merged count-weighted over the members (exact with uneven
  shards and masks; Flax averages the members' means with equal weight);
* training on one value per channel raises PyTorch's error instead of returning ``bias``;
* ``mask`` has Flax's meaning (training: the statistics come from the selected elements and
  every element is normalized with them; eval ignores it); a channel with no selected element
  outputs NaN as in Flax, but keeps its running statistics (Flax's become NaN); the mask must
  be boolean, as Flax's ``jnp.mean(where=)`` requires;
* ``axis`` is one int (Flax also takes a tuple of axes);
* ``promote_dtype`` is applied to the input and the parameters (the output dtype is Flax's);
  the running statistics stay float32 and are never cast to a lower ``dtype``.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx.flax_compat import BatchNorm
    >>> bn = BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(8.0).reshape(4, 2))                   # [N, C]; training by default
    >>> bn.mean[...]                                            # 0.9·0 + 0.1·[3, 4]
    Array([0.3, 0.4], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxbn import _module_logic as logic
from jaxbn._module_logic import check_eps, check_feature_count, train_flag
from jaxbn.flax_compat import momentum_from_flax
from jaxbn.nnx.batch_norm import MOMENTS_NAME, affine_params, set_mode_view

__all__ = ["BatchNorm"]

Initializer = Callable[..., jax.Array]

#: flax.nnx.BatchNorm's default initializers (the same objects' values: zeros, ones).
ZEROS, ONES = initializers.zeros_init(), initializers.ones_init()


class _Fields(NamedTuple):
    """The fields :mod:`jaxbn._module_logic` reads, in jaxbn's meanings."""

    num_features: int
    eps: float
    momentum: float
    affine: bool
    axis: int
    axis_name: Any
    axis_index_groups: Any
    dtype: Any
    track_running_stats: bool = True
    expected_ranks: None = None


class BatchNorm(nnx.Module):
    """``flax.nnx.BatchNorm``'s signature over jaxbn's numbers (see the module docstring).

    Args:
      num_features: C, the size of the feature axis.
      use_running_average: True: eval (running statistics); False (default, Flax's): training
        (batch statistics, running statistics updated); None: the call must say.
      axis: the feature axis (one int).
      momentum: Flax's meaning, the weight of the old value: ``running = momentum * running +
        (1 - momentum) * batch`` (PyTorch's ``momentum`` is ``1 - momentum``).
      epsilon: added to the variance.
      dtype: output (and computation) dtype, through ``promote_dtype``; None: promoted from
        the input and the parameters.
      param_dtype: dtype of ``scale`` and ``bias`` (``mean``/``var`` are float32, as Flax's).
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: initializers ``(key, shape, dtype)``; default zeros / ones.
      axis_name: mapped axis to merge the batch statistics over (count-weighted; training
        only).
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      use_fast_variance: accepted for Flax's signature; the variance is always the stable one.
      promote_dtype: ``(x, mean, var, scale, bias), dtype=`` → promoted arrays; applied to the
        input and the parameters.
      rngs: ``nnx.Rngs``; one ``params`` key per parameter created, as in Flax.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param`` (e.g. sharding names).
      momentum_convention_checked: silences the warning a momentum below 0.5 gets.

    Call:
      ``bn(x, use_running_average=None, *, mask=None)``: ``x`` [N, ..., C] (C at ``axis``);
      ``mask`` boolean, broadcastable to ``x``: Flax's meaning, the statistics come from the
      True elements and every element is normalized. Returns ``y`` shaped like ``x``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = ZEROS,
        scale_init: Initializer = ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        momentum_convention_checked: bool = False,
    ) -> None:
        check_feature_count(num_features, "num_features", allow_none=False)
        if use_running_average is not None:
            train_flag(use_running_average, "use_running_average")
        m = momentum_from_flax(momentum)  # checks the type
        logic.check_momentum(m)
        check_eps(epsilon)
        logic.check_axis(axis)
        logic.check_initializers(scale_init, bias_init)
        for name, flag in (("use_bias", use_bias), ("use_scale", use_scale)):
            train_flag(flag, name)
        if not callable(promote_dtype):
            raise TypeError(f"promote_dtype must be callable, got {promote_dtype!r}")
        if momentum < 0.5 and not momentum_convention_checked:
            logic.warn_momentum_convention(
                f"jaxbn.nnx.flax_compat.BatchNorm(momentum={momentum}): this class takes "
                f"flax.nnx.BatchNorm's convention, where momentum is the weight of the old "
                f"value (running = momentum * running + (1 - momentum) * batch; Flax's default "
                f"0.99), so {momentum} keeps only {momentum} of the old value. PyTorch and "
                f"jaxbn.nnx.BatchNorm use the weight of the new batch (PyTorch's 0.1 is Flax's "
                f"0.9). If you meant PyTorch's convention pass momentum={m:.6g} or use "
                f"jaxbn.nnx.BatchNorm; if {momentum} is meant, pass "
                f"momentum_convention_checked=True."
            )
        feature_shape = (int(num_features),)
        # Flax's order: statistics, then scale and bias, each with its own key
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.scale, self.bias = affine_params(
            True,
            feature_shape,
            scale_init,
            bias_init,
            param_dtype,
            rngs,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        self.num_features = int(num_features)
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = bool(use_bias)
        self.use_scale = bool(use_scale)
        # static attributes are part of the graph definition: hashable forms
        self.axis_name = axis_name
        self.axis_index_groups = (
            None
            if axis_index_groups is None
            else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
        )
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self._report_moments = False

    @property
    def eps(self) -> float:
        """``epsilon`` under jaxbn's (PyTorch's) name, for code that reads every batch norm."""
        return self.epsilon

    @property
    def torch_momentum(self) -> float:
        """``momentum`` in PyTorch's (and :class:`jaxbn.nnx.BatchNorm`'s) meaning:
        ``1 - momentum``, the weight of the new batch."""
        return momentum_from_flax(self.momentum)

    def _fields(self) -> _Fields:
        return _Fields(
            num_features=self.num_features,
            eps=self.epsilon,
            momentum=self.torch_momentum,
            affine=self.use_scale or self.use_bias,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            dtype=self.dtype,
        )

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` [N, ..., C] → ``y`` like ``x``; ``use_running_average`` overrides the
        attribute for this call."""
        mode = self.use_running_average if use_running_average is None else use_running_average
        if mode is None:
            raise ValueError(
                "No `use_running_average` argument was provided to BatchNorm: pass it to the "
                "constructor (BatchNorm(..., use_running_average=True/False)) or to the call "
                "(bn(x, use_running_average=True/False)), or use "
                "nnx.view(model, use_running_average=True/False)"
            )
        training = not train_flag(mode, "use_running_average")
        fields = self._fields()
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        # Flax's dtype rule: the input and the parameters promoted together (the statistics
        # take part in the promotion, as in Flax, but stay float32 here)
        x, _, _, scale, bias = self.promote_dtype(
            (jnp.asarray(x), self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        x, features = logic.input_features(fields, x)
        stats = logic.RunningStats(self.mean[...], self.var[...], self.num_batches_tracked[...])
        logic.check_running_stats(type(self).__name__, stats, features)
        if training and logic.sync_axis(fields)[0] is None:
            logic.check_vmapped_update("jaxbn.nnx.flax_compat.BatchNorm", x, stats)
        if mask is not None and training:
            y, new, moments = logic.masked_statistics_call(fields, x, scale, bias, stats, mask=mask)
        else:
            # eval: Flax's mask selects the statistics' elements, and eval computes none
            y, new, moments = logic.batch_norm_call(fields, x, scale, bias, stats, train=training)
        if new is not None:
            self.mean[...] = new.mean
            self.var[...] = new.var
            self.num_batches_tracked[...] = new.num_batches_tracked
            if self._report_moments:  # jaxbn.nnx.update_bn asks, as of jaxbn.nnx.BatchNorm
                self.sow(nnx.Intermediate, MOMENTS_NAME, dict(moments._asdict()))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)`` (and ``nnx.view_info``).

        Args:
          use_running_average: if True, the stored batch statistics will be used instead of
            computing the batch statistics on the input.
        """
        set_mode_view(self, use_running_average)
