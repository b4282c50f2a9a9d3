"""Flax NNX modules ``BatchNorm`` and the rank-checked ``BatchNorm1d/2d/3d``.

The same numbers as :class:`jaxbn.linen.BatchNorm` (and PyTorch), per feature c::

    y = (x - mean_c) / sqrt(var_c + eps) * scale_c + bias_c

* training: ``mean_c``/``var_c`` are the batch's mean and **biased** variance over every axis
  but the feature axis; ``mean ← (1-momentum)·mean + momentum·μ_B``, ``var ←
  (1-momentum)·var + momentum·σ²_B·n/(n-1)`` (the **unbiased** variance) and
  ``num_batches_tracked`` grows by one (saturating). ``momentum=None`` is the cumulative
  average (factor ``1/num_batches_tracked``).
* eval: the running statistics are used, nothing changes — unless
  ``track_running_stats=False``, in which case there are none and batch statistics are used.

Variables: ``scale``, ``bias`` are ``nnx.Param`` (PyTorch ``weight``, ``bias``); ``mean``,
``var``, ``num_batches_tracked`` are ``nnx.BatchStat`` (PyTorch ``running_mean``,
``running_var``, ``num_batches_tracked``; the counter an int32 scalar).

Mode, in NNX's idiom: ``model.train()`` / ``model.eval()`` set ``use_running_average`` on every
module that has it (``nnx.view(model, use_running_average=...)`` makes a view), and a call
may override it with ``train=True/False`` (jaxbn's spelling) or ``use_running_average=``
(``flax.nnx.BatchNorm``'s). Unlike ``flax.nnx.BatchNorm``, whose ``use_running_average``
defaults to False (a model never switched to eval silently normalizes inference batches with
their own statistics), the default here is *no mode*: the first call of a model that was
never put in a mode nor given one raises. The mode is a static attribute, so ``nnx.jit``
traces each mode once and never reuses one mode's trace for the other.

Relation to ``flax.nnx.BatchNorm``: Flax's ``momentum`` (weight of the old value, 0.99) is
``1 - momentum`` here (weight of the new batch, PyTorch's 0.1); Flax stores the biased
running variance, jaxbn the unbiased one and a counter; Flax's ``epsilon`` is ``eps``;
``affine`` switches both parameters, and ``use_scale``/``use_bias`` (Flax's) or ``bias=False``
(PyTorch 2.13's) each one; Flax averages per-device means with equal weight, jaxbn merges counts
(uneven shards and masks exact); a masked-out element outputs 0 (Flax normalizes it too); a
batch with one value per channel is an error, not a silent ``bias``. ``rngs`` is optional; given,
each parameter takes its own ``rngs.params()`` key, as in Flax. For ``flax.nnx.BatchNorm``'s
exact spelling (the one-line switch) use :class:`jaxbn.nnx.flax_compat.BatchNorm`.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbn.nnx
    >>> bn = jaxbn.nnx.BatchNorm2d(16)
    >>> x = jnp.ones((8, 6, 6, 16))                           # [N, H, W, C]
    >>> bn.train(); y = bn(x)                                 # updates mean/var/counter
    >>> bn.eval(); y = bn(x)                                  # running statistics
    >>> y = bn(x, train=True)                                 # per-call override
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn._module_logic import check_feature_count, train_flag, warn_momentum_convention

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "affine_params",
    "call_inputs",
    "init_variables",
    "resolve_mode",
    "running_stats",
    "set_mode_view",
    "static_axes",
    "stats_of",
]

Initializer = Callable[..., jax.Array]

#: The collection a training batch norm sows its batch moments to when ``_report_moments`` is
#: set (``jaxbn.nnx.update_bn`` sets it on a copy of the model); the Linen name.
MOMENTS_NAME = "moments"


def resolve_mode(module: nnx.Module, train: Any, use_running_average: Any, attribute: Any) -> bool:
    """The training flag of one call: the per-call ``train`` / ``use_running_average``, else
    the module's ``use_running_average`` attribute (set by ``.train()`` / ``.eval()``)."""
    per_call = None
    if train is not None:
        per_call = train_flag(train, "train")
    if use_running_average is not None:
        other = not train_flag(use_running_average, "use_running_average")
        if per_call is not None and per_call != other:
            raise ValueError(
                f"train={train} and use_running_average={use_running_average} disagree: "
                "pass one of them"
            )
        per_call = other
    if per_call is not None:
        return per_call
    if attribute is None:
        name = type(module).__name__
        raise TypeError(
            f"jaxbn.nnx.{name} was called without a mode (train): call model.train() or "
            f"model.eval() first (or use nnx.view(model, use_running_average=...)), or pass "
            f"train=True/False to the call. jaxbn has no default mode, so that a model never "
            f"switched to eval cannot silently use batch statistics at inference "
            f"(flax.nnx.BatchNorm defaults to use_running_average=False, i.e. training)"
        )
    return not train_flag(attribute, "use_running_average")


def affine_params(
    affine: bool,
    shape: tuple[int, ...],
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Any,
    rngs: nnx.Rngs | None,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    param_type: type[nnx.Param] = nnx.Param,
) -> tuple[Any, Any]:
    """``(scale, bias)`` as ``param_type`` (``nnx.Param``) of ``shape`` (each absent,
    ``nnx.data(None)``, without ``affine`` or its ``use_*``), with their metadata (e.g.
    sharding names).

    Like ``flax.nnx.BatchNorm``, each parameter created takes its own ``rngs.params()`` key,
    scale first: a model keeps the random stream of the Flax layer it replaces.
    """

    def param(used: bool, init: Initializer, metadata: Mapping[str, Any]) -> Any:
        if not (affine and used):
            return nnx.data(None)
        key = None if rngs is None else rngs.params()
        return param_type(init(key, shape, param_dtype), **metadata)

    scale = param(use_scale, scale_init, scale_metadata)
    return scale, param(use_bias, bias_init, bias_metadata)


def running_stats(features: int, param_dtype: Any) -> tuple[Any, Any, Any]:
    """``(mean, var, num_batches_tracked)`` as ``nnx.BatchStat``: zeros, ones (``param_dtype``)
    and an int32 0, PyTorch's initial statistics."""
    return (
        nnx.BatchStat(jnp.zeros((features,), param_dtype)),
        nnx.BatchStat(jnp.ones((features,), param_dtype)),
        nnx.BatchStat(jnp.zeros((), jnp.int32)),
    )


def init_variables(
    module: nnx.Module,
    *,
    affine: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Any,
    rngs: nnx.Rngs | None,
    bias: bool = True,
    use_scale: bool = True,
    use_bias: bool = True,
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    track_running_stats: bool = True,
    param_type: type[nnx.Param] = nnx.Param,
) -> None:
    """A jaxbn NNX batch norm's variables, set on ``module`` (``module.num_features`` set):
    ``scale``/``bias`` (:func:`affine_params`; None where its switches leave it out),
    ``affine`` (whether either exists: the input checks rely on it) and ``mean``/``var``/
    ``num_batches_tracked`` (:func:`running_stats`; None without ``track_running_stats``)."""
    module.scale, module.bias = affine_params(
        affine,
        (module.num_features,),
        scale_init,
        bias_init,
        param_dtype,
        rngs,
        use_scale=use_scale,
        use_bias=bias and use_bias,
        scale_metadata=scale_metadata,
        bias_metadata=bias_metadata,
        param_type=param_type,
    )
    module.affine = module.scale is not None or module.bias is not None
    if track_running_stats:
        stats = running_stats(module.num_features, param_dtype)
        module.mean, module.var, module.num_batches_tracked = stats
    else:
        module.mean = module.var = module.num_batches_tracked = nnx.data(None)


def static_axes(axis_name: Any, axis_index_groups: Any) -> tuple[Any, Any]:
    """``(axis_name, axis_index_groups)`` in hashable forms: static attributes are part of the
    graph definition."""
    if not (axis_name is None or isinstance(axis_name, str)):
        axis_name = tuple(axis_name)
    if axis_index_groups is not None:
        axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    return axis_name, axis_index_groups


def call_inputs(
    module: nnx.Module, x: jax.Array, train: Any, use_running_average: Any
) -> tuple[bool, jax.Array, Any, Any, logic.RunningStats | None]:
    """What a call of a jaxbn NNX batch norm starts with: ``(training, x, weight, bias,
    stats)`` — the mode (:func:`resolve_mode`), ``x`` through the input checks, the
    parameters' values (None where absent) and the checked running statistics (or None)."""
    training = resolve_mode(module, train, use_running_average, module.use_running_average)
    x, features = logic.input_features(module, x)
    weight = None if module.scale is None else module.scale[...]
    bias = None if module.bias is None else module.bias[...]
    return training, x, weight, bias, stats_of(module, features)


def stats_of(module: nnx.Module, features: int) -> logic.RunningStats | None:
    """The module's running statistics (checked against C), or None without them."""
    if module.mean is None:
        return None
    stats = logic.RunningStats(module.mean[...], module.var[...], module.num_batches_tracked[...])
    logic.check_running_stats(type(module).__name__, stats, features)
    return stats


def set_mode_view(module: nnx.Module, use_running_average: bool | None) -> None:
    """What ``set_view`` does for every jaxbn NNX batch norm (checked like the field)."""
    if use_running_average is not None:
        module.use_running_average = train_flag(use_running_average, "use_running_average")


class BatchNorm(nnx.Module):
    """Batch normalization with PyTorch's semantics over any input rank (see module docstring).

    Args:
      num_features: C, the size of the feature axis.
      eps: added to the variance.
      momentum: weight of the new batch in the running average; None = cumulative average.
      affine: learn ``scale`` (init 1) and ``bias`` (init 0); False: neither.
      track_running_stats: keep ``mean``/``var``/``num_batches_tracked``; if False, eval uses
        batch statistics too.
      axis: the feature axis (-1 channels-last; 1 for PyTorch's NC... layout).
      axis_name: mapped axis (``nnx.vmap`` / ``nnx.shard_map`` / ``nnx.pmap``) to sync
        statistics over, count-weighted (training only). Unset: ``jaxbn.sync_batch_norm``
        decides.
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var``.
      scale_init, bias_init: initializers ``(key, shape, dtype)``; default ones / zeros.
      bias: with ``affine``, learn ``bias`` (PyTorch 2.13's ``BatchNorm2d(C, bias=False)``:
        ``scale`` only).
      use_scale, use_bias: ``flax.nnx.BatchNorm``'s switches, each parameter apart (with
        ``affine``; ``use_bias=False`` is ``bias=False``).
      scale_metadata, bias_metadata: metadata of the ``nnx.Param`` (e.g.
        ``{"sharding_names": ("model",)}``), as in ``flax.nnx.BatchNorm``.
      use_running_average: the mode: None (default: none yet, the first call needs one),
        True (eval) or False (train); ``.train()`` / ``.eval()`` set it.
      momentum_convention_checked: silences the warning a momentum above 0.5 gets.
      rngs: ``nnx.Rngs``, needed only by a random ``scale_init`` / ``bias_init``.

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> bn = jaxbn.nnx.BatchNorm(2)
        >>> bn.train(); y = bn(jnp.arange(8.0).reshape(4, 2))                 # [N, C]
        >>> bn.mean[...]                                         # 0.9·0 + 0.1·[3, 4]
        Array([0.3, 0.4], dtype=float32)
    """

    #: input ranks accepted (None: any) and the message when not; set by the 1d/2d/3d classes.
    expected_ranks: ClassVar[tuple[int, ...] | None] = None
    rank_message: ClassVar[str] = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = -1,
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        scale_init: Initializer = nn.initializers.ones,
        bias_init: Initializer = nn.initializers.zeros,
        bias: bool = True,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        use_running_average: bool | None = None,
        momentum_convention_checked: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        check_feature_count(num_features, "num_features", allow_none=False)
        logic.check_batch_norm_fields(num_features, eps, momentum, axis)
        logic.check_initializers(scale_init, bias_init)
        logic.learned_params(affine, bias, use_scale, use_bias)
        if use_running_average is not None:
            train_flag(use_running_average, "use_running_average")
        message = logic.momentum_convention_message(
            f"nnx.{type(self).__name__}",
            momentum,
            momentum_convention_checked,
            example=logic.NNX_FLAX_EXAMPLE,
            alternative=logic.NNX_FLAX_SPELLING,
        )
        if message is not None:
            warn_momentum_convention(message)
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.axis_name, self.axis_index_groups = static_axes(axis_name, axis_index_groups)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_running_average = use_running_average
        self._report_moments = False
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
            track_running_stats=self.track_running_stats,
        )

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        train: bool | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``: batch statistics in training (and updates ``mean``/``var``/
        ``num_batches_tracked`` in place), the running statistics in eval.

        Args:
          x: [N, ..., C], the features at ``axis`` (1d/2d/3d classes: the rank of
            ``torch.nn.BatchNorm1d/2d/3d``'s input).
          use_running_average: ``flax.nnx.BatchNorm``'s per-call mode (True: eval); None
            uses ``train`` or the module's mode.
          train: keyword: this call's mode (True: training), overriding the module's
            (``.train()`` / ``.eval()``); None uses the module's.
          mask: optional boolean, broadcastable to ``x``: False elements do not count in the
            statistics (they may hold anything, NaN included) and output 0.

        Returns:
          ``y``, shaped like ``x``, in ``dtype`` (default: ``x``'s dtype).

        Raises:
          TypeError: no mode: neither ``train``/``use_running_average`` nor ``.train()`` /
            ``.eval()`` set one (jaxbn has no default mode).
          ValueError: an input of the wrong rank for a 1d/2d/3d class ("expected 4D input (got
            2D input)"), or one value per channel in training ("Expected more than 1 value per
            channel when training, got input size ...").
          RuntimeError: an input whose channel count is not ``num_features``.

        Example:
            >>> import jax.numpy as jnp, jaxbn.nnx
            >>> bn = jaxbn.nnx.BatchNorm2d(3)
            >>> x = jnp.ones((2, 4, 4, 3))                           # [N, H, W, C]
            >>> bn(x, train=False).shape
            (2, 4, 4, 3)
        """
        training, x, weight, bias, stats = call_inputs(self, x, train, use_running_average)
        if stats is not None and training and logic.sync_axis(self)[0] is None:
            logic.check_vmapped_update(f"jaxbn.nnx.{type(self).__name__}", x, stats)
        y, new, moments = logic.batch_norm_call(
            self, x, weight, bias, stats, train=training, mask=mask
        )
        if new is not None:
            self.mean[...] = new.mean
            self.var[...] = new.var
            self.num_batches_tracked[...] = new.num_batches_tracked
            if self._report_moments:
                self.sow(nnx.Intermediate, MOMENTS_NAME, dict(moments._asdict()))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)`` (and ``nnx.view_info``).

        Args:
          use_running_average: True: eval (running statistics); False: training (batch
            statistics, running statistics updated); None: unchanged.
        """
        set_mode_view(self, use_running_average)


#: ``BatchNorm`` with ``torch.nn.BatchNorm1d/2d/3d``'s input-rank check.
BatchNorm1d, BatchNorm2d, BatchNorm3d = logic.rank_variants(BatchNorm)
