"""``flax.linen.BatchNorm``'s spelling with jaxbn's numbers: the one-line switch for Flax code.

Replace ``nn.BatchNorm`` by ``jaxbn.flax_compat.BatchNorm`` and nothing else::

    norm = partial(jaxbn.flax_compat.BatchNorm,          # was: nn.BatchNorm
                   use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, axis_name="batch")
    y = norm(scale_init=nn.initializers.zeros_init())(y)

Every field and the call take Flax's names and meanings — ``use_running_average`` (field or
call argument), ``momentum`` as the weight of the **old** value (converted once, in
:func:`momentum_from_flax`: Flax's 0.9 is jaxbn's 0.1), ``epsilon``, ``use_scale``,
``use_bias``, ``scale_init``, ``bias_init``, ``dtype``, ``param_dtype``, ``axis``,
``axis_name``, ``axis_index_groups`` — and the module is a shell over :class:`jaxbn.BatchNorm`
(sharing its scope, so the variables sit where Flax's do). The numbers are jaxbn's:

* the running variance is PyTorch's **unbiased** one (``σ²·n/(n-1)``; Flax keeps the biased
  one), and ``batch_stats`` holds a ``num_batches_tracked`` counter next to ``mean`` and
  ``var`` (Flax has none). Variables: ``params: scale, bias``, ``batch_stats: mean, var,
  num_batches_tracked``; ``jaxbn.from_flax_batch_norm`` converts a Flax checkpoint, and Flax
  statistics without the counter are refused with a message that names it;
* with ``axis_name``, statistics are merged count-weighted over the devices (exact with uneven
  shards and masks) and the running statistics come out identical on every device;
* the variance is always computed stably (``use_fast_variance`` is accepted and changes
  nothing); statistics are reduced in float32 (``force_float32_reductions=False`` is refused);
* training on one value per channel raises PyTorch's error instead of returning ``bias``;
  ``init`` creates variables only: it never raises that error, never syncs, never counts;
* ``mask`` has Flax's meaning: in training the statistics come from the selected elements
  (merged count-weighted across devices, where Flax averages per-device means) and every
  element is normalized with them; eval ignores it. (:class:`jaxbn.BatchNorm`'s own ``mask``
  outputs 0 where masked.) A channel with no selected element gives NaN, as in Flax;
* ``dtype=None`` gives the input's dtype (Flax promotes with the parameters' dtype);
* ``axis`` is one int (Flax also takes a tuple of axes).

The mode is never implicit: without ``use_running_average`` (field or call) the call raises.
A ``momentum`` below 0.5 (likely PyTorch's convention) warns once per value with a
:class:`jaxbn.linen.batch_norm.MomentumConventionWarning` unless
``momentum_convention_checked=True``.

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> bn = jaxbn.flax_compat.BatchNorm(momentum=0.9)
    >>> x = jnp.arange(8.0).reshape(4, 2)                           # [N, C]
    >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> updates["batch_stats"]["mean"]                                # 0.9·0 + 0.1·[3, 4]
    Array([0.3, 0.4], dtype=float32)
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn._module_logic import check_axis, check_eps, train_flag
from jaxbn.linen.batch_norm import BatchNorm as _JaxbnBatchNorm
from jaxbn.linen.batch_norm import Initializer, check_initializer, warn_momentum_convention

__all__ = ["BatchNorm", "momentum_from_flax"]


def momentum_from_flax(momentum: float) -> float:
    """Flax's momentum (weight of the old value) as jaxbn's and PyTorch's (weight of the new
    batch): ``1 - momentum``, without the float noise of the subtraction (0.9 → 0.1, not
    0.09999999999999998)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be float, not {type(momentum).__name__} ({momentum!r})")
    return float(f"{1.0 - float(momentum):.15g}")


class _FlaxSpelledBatchNorm(_JaxbnBatchNorm):
    """jaxbn.BatchNorm with Flax's separate ``use_scale`` / ``use_bias`` (the shell's child)."""

    use_scale: bool = True
    use_bias: bool = True

    @nn.nowrap  # as the method it overrides: not a call of its own for nn.tabulate
    def _affine_params(self, features: int) -> tuple[jax.Array | None, jax.Array | None]:
        shape = (features,)
        scale = (
            self.param("scale", self.scale_init, shape, self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        )
        return scale, bias


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm``'s fields and call over :class:`jaxbn.BatchNorm` (module docstring).

    Attributes:
      use_running_average: True: eval (running statistics); False: training (batch statistics,
        running statistics updated). Here or at call time, exactly once.
      axis: the feature axis (one int).
      momentum: Flax's meaning, the weight of the old value: ``running = momentum * running +
        (1 - momentum) * batch`` (jaxbn's and PyTorch's ``momentum`` is ``1 - momentum``).
      epsilon: added to the variance.
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var``.
      use_bias: learn ``bias``.
      use_scale: learn ``scale``.
      bias_init: initializer of ``bias`` (Flax's signature ``(key, shape, dtype)``).
      scale_init: initializer of ``scale``; ``nn.initializers.zeros_init()`` for the last norm
        of a residual block.
      axis_name: mapped axis to merge batch statistics over (count-weighted; training only).
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      use_fast_variance: accepted for Flax's signature; the variance is always the stable one.
      force_float32_reductions: must be True: statistics are always reduced in float32.
      momentum_convention_checked: silences the warning a momentum below 0.5 gets.

    Call:
      ``x``: [N, ..., C] (C at ``axis``); ``use_running_average`` unless given as a field;
      optional keyword ``mask`` (broadcastable to ``x``; nonzero selects): in training the
      statistics come from the selected elements and every element is normalized; eval
      ignores it (Flax's meaning). Returns ``y`` like ``x``.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    momentum_convention_checked: bool = False

    def __post_init__(self) -> None:
        if self.use_running_average is not None:
            train_flag(self.use_running_average, "use_running_average")
        m = momentum_from_flax(self.momentum)  # checks the type
        check_eps(self.epsilon)
        check_axis(self.axis)
        check_initializer(self.scale_init, "scale_init")
        check_initializer(self.bias_init, "bias_init")
        if not self.force_float32_reductions:
            raise ValueError(
                "jaxbn.flax_compat.BatchNorm reduces statistics in float32 always; "
                "force_float32_reductions=False is not supported"
            )
        if self.momentum < 0.5 and not self.momentum_convention_checked:
            warn_momentum_convention(
                f"jaxbn.flax_compat.BatchNorm(momentum={self.momentum}): this class takes "
                f"Flax's convention, where momentum is the weight of the old value (running = "
                f"momentum * running + (1 - momentum) * batch; Flax's default 0.99), so "
                f"{self.momentum} keeps only {self.momentum} of the old value. PyTorch and "
                f"jaxbn.BatchNorm use the weight of the new batch (PyTorch's 0.1 is Flax's "
                f"0.9). If you meant PyTorch's convention pass momentum={m:.6g} or use "
                f"jaxbn.BatchNorm; if {self.momentum} is meant, pass "
                f"momentum_convention_checked=True."
            )
        super().__post_init__()

    def setup(self) -> None:
        self.norm = _FlaxSpelledBatchNorm(
            eps=self.epsilon,
            momentum=momentum_from_flax(self.momentum),
            affine=self.use_scale or self.use_bias,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=self.scale_init,
            bias_init=self.bias_init,
            momentum_convention_checked=True,  # this shell warns in Flax's terms
            use_scale=self.use_scale,
            use_bias=self.use_bias,
        )
        # The child's variables are this module's: the tree is flax.linen.BatchNorm's.
        nn.share_scope(self, self.norm)

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x``: [N, ..., C] → ``y`` like ``x``; ``use_running_average`` as in Flax."""
        if self.use_running_average is None and use_running_average is None:
            raise ValueError(
                "jaxbn.flax_compat.BatchNorm needs the mode: pass use_running_average=False "
                "(training: batch statistics, running statistics updated) or True (eval: "
                "running statistics) to the constructor, e.g. partial(BatchNorm, "
                "use_running_average=not train), or at call time; it is never implicit"
            )
        if self.use_running_average is not None and use_running_average is not None:
            raise ValueError(
                "use_running_average was passed to the constructor and at call time; pass it once"
            )
        mode = self.use_running_average if use_running_average is None else use_running_average
        train = not train_flag(mode, "use_running_average")
        if not train:
            # Flax's eval reads no mask: every element is normalized with the running statistics.
            return self.norm(x, train=False)
        if mask is not None:
            mask = jnp.asarray(mask, bool)  # as Flax reads it: any dtype, nonzero selects
        y = self.norm(x, train=True, mask=mask)  # updates the running statistics from the mask
        if mask is None:
            return y
        # Flax's meaning of the mask: it selects the elements the statistics come from, and
        # every element is normalized with them (jaxbn.BatchNorm outputs 0 where masked).
        return self._normalize_every_element(jnp.asarray(x), mask, y.dtype)

    @nn.nowrap  # not a call of its own for nn.tabulate (which would run it alone)
    def _normalize_every_element(self, x: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
        """``(x − μ)·rsqrt(σ² + ε)·scale + bias`` on every element of ``x`` ([N, ..., C]), with
        the batch's ``μ`` and biased ``σ²`` taken over the elements where ``mask`` is True
        (merged over ``axis_name`` as the child's are, so they equal the ones it stored)."""
        # The moments are differentiable outputs (their tangents are exact, masked and synced):
        # the gradient flows through μ and σ² from every element, as in Flax. The child's own
        # eps, axis and sync axis, so they equal the ones it stored; it has checked the count.
        moments = logic.batch_moments(
            self.norm, x, mask, synced=not self.is_initializing(), check_count=False
        )
        ax = self.axis % x.ndim
        stat_shape = tuple(x.shape[ax] if i == ax else 1 for i in range(x.ndim))
        compute = moments.mean.dtype
        mean, var = (jnp.reshape(a, stat_shape) for a in (moments.mean, moments.var))
        y = (x.astype(compute) - mean) * jax.lax.rsqrt(var + self.epsilon)
        params = self.norm.variables.get("params", {})
        if "scale" in params:
            y = y * jnp.reshape(params["scale"], stat_shape).astype(compute)
        if "bias" in params:
            y = y + jnp.reshape(params["bias"], stat_shape).astype(compute)
        # A channel with no selected element has no statistics: NaN, as Flax's empty mean
        # (not x·rsqrt(eps) from a zero placeholder).
        selected = jnp.reshape(moments.count, stat_shape) > 0
        return jnp.where(selected, y, jnp.nan).astype(dtype)
