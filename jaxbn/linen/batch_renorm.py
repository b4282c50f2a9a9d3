"""Flax module ``BatchRenorm``: Batch Renormalization (Ioffe 2017) over any input rank.

Per feature c, with the running ``μ_c`` and ``σ_c = sqrt(var_c + eps)``::

    train:  r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
            d = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max))
            y = (x − μ_B) / σ_B · (scale · r) + (scale · d + bias)      σ_B = sqrt(σ²_B + eps)
    eval:   y = (x − μ) / σ · scale + bias                              (BatchNorm's eval)

``μ_B`` and ``σ²_B`` are the batch's mean and biased variance (merged over devices with
``axis_name``, so ``r`` and ``d`` are the same on every device). Gradients flow through the
batch statistics as in batch norm, not through ``r`` and ``d``. Training therefore computes the
eval function up to the clipping: with small or non-i.i.d. batches the model does not learn to
depend on the batch. ``r_max=1, d_max=0`` is :class:`jaxbn.BatchNorm` exactly; the paper trains
that way for a warm-up (``warmup_steps``, counted by ``num_batches_tracked``) and then relaxes
the clipping (:func:`renorm_schedule`, or any per-call ``r_max=``/``d_max=``, traced values
welcome: no retrace when they change).

Variables: a ``BatchNorm``'s tree (``params: scale, bias``; ``batch_stats: mean, var,
num_batches_tracked``), so checkpoints, ``fold_batch_norm``, ``update_bn``, interop and
``freeze_batch_norm`` treat it as one. With ``update_rule="torch"`` (default) the running
statistics follow PyTorch's BatchNorm rule (mean and **unbiased** variance, ``momentum`` the
weight of the new batch); the paper's single pair (μ, σ) drives both the correction and eval.

Relation to Keras 3 ``BatchNormalization(renorm=True)``, which is reproduced exactly (outputs,
gradients, moving statistics) with ``update_rule="keras"``:

================================  ===================================================
Keras                             jaxbn
================================  ===================================================
``momentum=0.99`` (old weight)    ``momentum=0.01`` (new weight): ``1 − momentum``
``renorm_momentum``               must equal ``momentum`` (Keras's default): jaxbn keeps one
                                  pair; Keras's ``renorm_mean/renorm_stddev`` are then its
                                  ``moving_mean/moving_stddev``
``epsilon=1e-3``                  ``eps`` (default 1e-5, PyTorch's): pass ``eps=1e-3``
``renorm_clipping`` rmax/rmin/dmax ``r_max=R`` is ``{"rmax": R, "rmin": 1/R}``; ``d_max`` is
                                  ``"dmax"``; a missing key is ``float("inf")``
moving stddev averaged, biased    ``update_rule="keras"``: ``sqrt(var + eps)`` averaged with
                                  ``σ_B``, stored as ``var = std² − eps`` (Keras's
                                  ``moving_variance``); ``"torch"`` averages the unbiased var
``moving_stddev`` starts at 1     ``var`` starts at 1: Keras's first ``σ`` is ``1``, jaxbn's
                                  ``sqrt(1 + eps)``; set ``var = 1 − eps`` to follow it bit
                                  for bit (only the first steps differ, by O(eps))
``gamma, beta``                   ``scale, bias``
================================  ===================================================

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> bn = jaxbn.BatchRenorm(8, r_max=3.0, d_max=5.0, warmup_steps=5000)
    >>> x = jnp.ones((4, 8))                                           # [N, C]
    >>> variables = bn.init(jax.random.key(0), x, train=False)
    >>> y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> step = updates["batch_stats"]["num_batches_tracked"]          # 1: still warming up
    >>> r_max, d_max = jaxbn.renorm_schedule(step)                    # the paper's relaxation
    >>> y, updates = bn.apply(variables, x, train=True, r_max=r_max, d_max=d_max,
    ...                       mutable=["batch_stats"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn._module_logic import train_flag
from jaxbn.linen.batch_norm import (
    affine_params,
    has_params,
    report_moments,
    reports_moments,
    running_stats,
)
from jaxbn.linen.variant_fields import UpdatingVariantFields

__all__ = ["BatchRenorm", "renorm_schedule"]


def renorm_schedule(
    step: int | jax.Array,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_steps: int = 40000,
    d_max_steps: int = 25000,
) -> tuple[jax.Array, jax.Array]:
    """The paper's clipping schedule: ``(r_max, d_max)`` at training step ``step``.

    ``r_max = 1, d_max = 0`` (plain batch norm) for the first ``warmup_steps`` steps, then
    linearly relaxed to reach ``r_max`` at step ``r_max_steps`` and ``d_max`` at
    ``d_max_steps`` (Ioffe 2017, §4: 5000, 40k and 25k steps for 3 and 5). ``step`` may be
    traced (e.g. an optimizer's step count, or ``num_batches_tracked``).

    Args:
      step: the training step, a Python int or a (traced) scalar.
      r_max: the final ``r_max`` (≥ 1).
      d_max: the final ``d_max`` (≥ 0).
      warmup_steps: steps of plain batch norm (``r_max=1, d_max=0``) before relaxing.
      r_max_steps: the step at which ``r_max`` is reached.
      d_max_steps: the step at which ``d_max`` is reached.

    Returns:
      ``(r_max, d_max)`` at ``step``: two float32 scalars, to pass to a ``BatchRenorm`` call.

    Raises:
      ValueError: a ``step`` that is not a number or a numeric array (a string).

    Example:
        >>> import jaxbn
        >>> [float(v) for v in jaxbn.renorm_schedule(22_500)]    # r half-way, d 7/8
        [2.0, 4.375]
    """
    step = jnp.asarray(step, jnp.float32)

    def ramp(final: float, start_value: float, end: int) -> jax.Array:
        span = max(end - warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
        return start_value + (final - start_value) * progress

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


class BatchRenorm(UpdatingVariantFields):
    """Batch Renormalization with PyTorch-style fields (see the module docstring).

    ``num_features`` goes by position or keyword, the rest by keyword only (the fields shared
    with the other variants are in ``jaxbn.linen.variant_fields``).

    Attributes:
      num_features: C, the size of the feature axis; inferred from the input when None.
      eps: added to the variances (PyTorch's 1e-5; Keras's is 1e-3).
      momentum: weight of the new batch in the running averages (PyTorch's meaning; Keras's
        ``momentum`` is ``1 − momentum``); None = cumulative average.
      affine: learn ``scale`` (init 1) and ``bias`` (init 0).
      axis: the feature axis (-1 channels-last; 1 for NC...).
      axis_name: mapped axis to merge the batch statistics over (training only), count-weighted
        like :class:`jaxbn.BatchNorm`. Unset: ``jaxbn.sync_batch_norm`` decides.
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale``, ``bias`` and the running statistics.
      r_max: ``r`` is clipped to ``[1/r_max, r_max]`` (≥ 1; paper's final value 3).
      d_max: ``d`` is clipped to ``[−d_max, d_max]`` (≥ 0; paper's final value 5).
      warmup_steps: the first ``warmup_steps`` training steps (by ``num_batches_tracked``)
        use ``r_max=1, d_max=0``: plain batch norm while the running statistics settle.
      update_rule: ``"torch"`` (PyTorch's running update) or ``"keras"`` (Keras 3's).
      scale_init, bias_init: Flax initializers ``(key, shape, dtype)``.
      bias, use_scale, use_bias, scale_metadata, bias_metadata: as :class:`jaxbn.BatchNorm`'s
        (``bias=False``: ``scale`` only).
      momentum_convention_checked: silences the warning a momentum above 0.5 gets.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jaxbn
        >>> bn = jaxbn.BatchRenorm(2, r_max=3.0, d_max=5.0)
        >>> x = jnp.arange(8.0).reshape(4, 2)                        # [N, C]
        >>> variables = bn.init(jax.random.key(0), x, train=False)
        >>> y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> print(np.asarray(y[:, 0]).round(2))      # r, d unclipped: eval's (x − 0) / 1
        [0. 2. 4. 6.]
    """

    _: dataclasses.KW_ONLY
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Any = None
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    update_rule: str = "torch"

    momentum_example: ClassVar[str] = "Keras's momentum=0.99 is jaxbn's 0.01"
    #: what jaxbn's tools read (``jaxbn.tools.layers.kind_of``); also the key of its reports.
    batch_norm_kind: ClassVar[str] = "renorm"

    def __post_init__(self) -> None:
        logic.check_renorm_fields(self.r_max, self.d_max, self.warmup_steps, self.update_rule)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        mask: jax.Array | None = None,
        r_max: float | jax.Array | None = None,
        d_max: float | jax.Array | None = None,
    ) -> jax.Array:
        """Batch renormalization of ``x`` in training (running statistics updated), batch
        norm's eval with the running statistics in eval.

        Args:
          x: [N, ..., C], the features at ``axis``.
          train: keyword, required: True corrects the batch statistics and updates
            ``batch_stats`` (``mutable=["batch_stats"]``); False uses the running statistics.
          mask: optional boolean, broadcastable to ``x``, as :class:`jaxbn.BatchNorm`'s.
          r_max: this call's clipping of ``r`` (a float or a traced scalar, e.g. from
            :func:`renorm_schedule`), replacing the field and the warm-up; None: the field.
          d_max: the same for ``d``.

        Returns:
          ``y``, shaped like ``x``, in ``dtype`` (default: ``x``'s dtype).

        Raises:
          ValueError: one value per channel in training ("Expected more than 1 value per
            channel when training, got input size ..."), or ``r_max`` < 1 / ``d_max`` < 0.
          RuntimeError: an input whose channel count is not the variables'.

        Example:
            >>> import jax, jax.numpy as jnp, jaxbn
            >>> bn = jaxbn.BatchRenorm(3)
            >>> x = jnp.ones((2, 3))
            >>> variables = bn.init(jax.random.key(0), x, train=False)
            >>> bn.apply(variables, x, train=False, r_max=2.0, d_max=1.0).shape
            (2, 3)
        """
        train = train_flag(train)
        x, features = logic.input_features(self, x, affine=has_params(self))
        weight, bias = affine_params(self, features)
        mean_v, var_v, count_v = running_stats(self, features)
        stats = logic.RunningStats(mean_v.value, var_v.value, count_v.value)
        # init: variables are created outside any mapped axis, on whatever slice is at hand;
        # its statistics are never kept, so eval's formula serves.
        train = train and not self.is_initializing()
        y, new = logic.batch_renorm_call(
            self, x, weight, bias, stats, train=train, mask=mask, r_max=r_max, d_max=d_max
        )
        if new is not None:
            mean_v.value, var_v.value, count_v.value = new
            if reports_moments(self):
                # the batch's own moments (merged over devices like the correction's): what
                # jaxbn.update_bn averages, as for a BatchNorm
                report_moments(self, [logic.batch_moments(self, x, mask)])
        return y
