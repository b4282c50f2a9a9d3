"""Flax NNX module ``BatchRenorm``: Batch Renormalization (Ioffe 2017), the twin of
:class:`jaxbn.BatchRenorm` (same fields, same numbers bit for bit; see that module for the
formulas, the warm-up and the Keras table).

Per feature c, with the running ``μ_c`` and ``σ_c = sqrt(var_c + eps)``::

    train:  r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
            d = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max))
            y = (x − μ_B) / σ_B · (scale · r) + (scale · d + bias)
    eval:   y = (x − μ) / σ · scale + bias                      (BatchNorm's eval)

Variables: a :class:`jaxbn.nnx.BatchNorm`'s (``scale``, ``bias``: ``nnx.Param``; ``mean``,
``var``, ``num_batches_tracked``: ``nnx.BatchStat``). The mode is NNX's: ``model.train()`` /
``model.eval()`` / ``nnx.view``, or ``train=`` per call; none by default (the first call then
raises, as :class:`jaxbn.nnx.BatchNorm`).

Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> bn = jaxbn.nnx.BatchRenorm(8, r_max=3.0, d_max=5.0, warmup_steps=5000)
    >>> x = jnp.ones((4, 8)) * jnp.arange(4.0)[:, None]                    # [N, C]
    >>> bn.train(); y = bn(x)
    >>> step = bn.num_batches_tracked[...]                   # 1: still warming up
    >>> r_max, d_max = jaxbn.renorm_schedule(step)                 # the paper's relaxation
    >>> y = bn(x, r_max=r_max, d_max=d_max)
    >>> y.shape
    (4, 8)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn.nnx.batch_norm import (
    Initializer,
    call_inputs,
    init_variables,
    set_mode_view,
    static_axes,
)

__all__ = ["BatchRenorm"]


class BatchRenorm(nnx.Module):
    """Batch Renormalization with PyTorch-style fields (see the module docstring).

    Args:
      num_features: C (by position); every other argument by keyword.
      eps: added to the variances (PyTorch's 1e-5; Keras's is 1e-3).
      momentum: weight of the new batch in the running averages; None = cumulative average.
      affine: learn ``scale`` (init 1) and ``bias`` (init 0).
      axis: the feature axis (-1 channels-last; 1 for NC...).
      axis_name: mapped axis to merge the batch statistics over (training only).
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale``, ``bias`` and the running statistics.
      r_max, d_max: the clipping of ``r`` (``[1/r_max, r_max]``) and ``d`` (``[−d_max, d_max]``).
      warmup_steps: training calls (by ``num_batches_tracked``) with ``r_max=1, d_max=0``.
      update_rule: ``"torch"`` (PyTorch's running update) or ``"keras"`` (Keras 3's).
      scale_init, bias_init: initializers ``(key, shape, dtype)``.
      bias, use_scale, use_bias, scale_metadata, bias_metadata: as
        :class:`jaxbn.nnx.BatchNorm`'s (``bias=False``: ``scale`` only).
      use_running_average: the mode (None: none yet; ``.train()`` / ``.eval()`` set it).
      momentum_convention_checked: silences the warning a momentum above 0.5 gets.
      rngs: ``nnx.Rngs``, needed only by a random initializer.

    Call:
      ``bn(x, use_running_average=None, *, train=None, mask=None, r_max=None, d_max=None)``:
      ``x`` [N, ..., C]; ``r_max``/``d_max`` this call's clipping (floats or traced scalars),
      replacing the fields and the warm-up. Returns ``y`` like ``x``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        axis: int = -1,
        axis_name: str | Sequence[str] | None = None,
        axis_index_groups: Any = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        update_rule: str = "torch",
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
        logic.check_feature_count(num_features, "num_features", allow_none=False)
        logic.check_renorm_fields(r_max, d_max, warmup_steps, update_rule)
        logic.check_momentum(momentum)
        logic.check_variant_fields(num_features, eps, axis, scale_init, bias_init)
        logic.learned_params(affine, bias, use_scale, use_bias)
        if use_running_average is not None:
            logic.train_flag(use_running_average, "use_running_average")
        message = logic.momentum_convention_message(
            f"nnx.{type(self).__name__}",
            momentum,
            momentum_convention_checked,
            example="Keras's momentum=0.99 is jaxbn's 0.01",
            alternative="",
        )
        if message:
            logic.warn_momentum_convention(message)
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.axis = axis
        self.axis_name, self.axis_index_groups = static_axes(axis_name, axis_index_groups)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = int(warmup_steps)
        self.update_rule = update_rule
        self.use_running_average = use_running_average
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
        )

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        train: bool | None = None,
        mask: jax.Array | None = None,
        r_max: float | jax.Array | None = None,
        d_max: float | jax.Array | None = None,
    ) -> jax.Array:
        """Batch renormalization in training (statistics updated in place), batch norm's eval
        with the running statistics in eval.

        Args:
          x: [N, ..., C], the features at ``axis``.
          use_running_average: ``flax.nnx.BatchNorm``'s per-call mode (True: eval).
          train: keyword: this call's mode, overriding the module's; None uses the module's.
          mask: optional boolean, broadcastable to ``x``, as :class:`jaxbn.nnx.BatchNorm`'s.
          r_max: this call's clipping of ``r`` (float or traced scalar), replacing the field
            and the warm-up; None: the field.
          d_max: the same for ``d``.

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          TypeError: no mode (neither an argument nor ``.train()`` / ``.eval()``).
          ValueError: one value per channel in training.

        Example:
            >>> import jax.numpy as jnp, jaxbn.nnx
            >>> bn = jaxbn.nnx.BatchRenorm(3)
            >>> bn(jnp.arange(12.0).reshape(4, 3), train=True, r_max=2.0, d_max=1.0).shape
            (4, 3)
        """
        training, x, weight, bias, stats = call_inputs(self, x, train, use_running_average)
        if training and logic.sync_axis(self)[0] is None:
            logic.check_vmapped_update(f"jaxbn.nnx.{type(self).__name__}", x, stats)
        y, new = logic.batch_renorm_call(
            self, x, weight, bias, stats, train=training, mask=mask, r_max=r_max, d_max=d_max
        )
        if new is not None:
            self.mean[...], self.var[...], self.num_batches_tracked[...] = new
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)`` (and ``nnx.view_info``).

        Args:
          use_running_average: True: eval (running statistics); False: training (batch
            statistics, running statistics updated); None: unchanged.
        """
        set_mode_view(self, use_running_average)
