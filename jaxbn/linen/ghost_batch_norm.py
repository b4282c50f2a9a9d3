"""Flax module ``GhostBatchNorm``: batch norm over virtual batches (Hoffer et al. 2017).

In training, the batch (axis 0) is cut into runs of ``virtual_batch_size`` examples and each
is normalized with its own statistics — the noise of a small batch (its regularizing effect)
with the throughput of a large one::

    train:  y[k] = (x[k] − μ_k) / sqrt(σ²_k + eps) · scale + bias      k-th virtual batch
    eval:   y    = (x − mean) / sqrt(var + eps) · scale + bias           (BatchNorm's eval)

The running statistics are updated once per virtual batch, in order, and
``num_batches_tracked`` counts virtual batches: exactly what PyTorch's buffers hold after
``torch.cat([bn(s) for s in x.split(virtual_batch_size)])`` (``momentum=None`` too). A batch
size that ``virtual_batch_size`` does not divide is refused in training (drop the last
partial batch); eval takes any size. ``virtual_batch_size = N`` is :class:`jaxbn.BatchNorm`.

Devices: virtual batches are local by design — there is no ``axis_name`` and the
``jaxbn.sync_batch_norm`` switch is ignored; each device normalizes its own virtual batches,
as Keras 2/TF's ``virtual_batch_size`` did per replica. The running statistics then differ per
device (like PyTorch DDP without SyncBatchNorm): average them with ``jaxbn.sync_batch_stats``
(or keep device 0's) before eval or checkpointing.

Variables: a ``BatchNorm``'s tree, so checkpoints and tools treat it as one.

Relation to Keras 2 / TF1 ``BatchNormalization(virtual_batch_size=v)``: the same
normalization; its moving averages are updated once per batch with the virtual batches'
averaged statistics, here once per virtual batch (PyTorch's rule, as split by split).

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> bn = jaxbn.GhostBatchNorm(8, virtual_batch_size=32)
    >>> x = jnp.ones((128, 8))                              # 4 virtual batches of 32
    >>> variables = bn.init(jax.random.key(0), x, train=False)
    >>> y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn.linen import batch_norm as linen_bn
from jaxbn.linen.variant_fields import UpdatingVariantFields

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(UpdatingVariantFields):
    """Batch norm with statistics over virtual batches in training (see module docstring).

    ``num_features`` and ``virtual_batch_size`` go by position or keyword, the rest by keyword
    only (the fields shared with the other variants are in ``jaxbn.linen.variant_fields``).

    Attributes:
      num_features: C; inferred from the input when None.
      virtual_batch_size: examples per virtual batch (required); must divide the batch size
        in training.
      eps: added to the variance.
      momentum: weight of each virtual batch in the running average; None = cumulative.
      affine: learn ``scale`` and ``bias``.
      track_running_stats: keep ``batch_stats``; if False, eval splits and uses batch
        statistics too (as PyTorch would, split by split).
      axis: the feature axis (not 0, the batch axis).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of the parameters and running statistics.
      scale_init, bias_init: Flax initializers.
      bias, use_scale, use_bias, scale_metadata, bias_metadata: as :class:`jaxbn.BatchNorm`'s
        (``bias=False``: ``scale`` only).
      momentum_convention_checked: silences the warning a momentum above 0.5 gets.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jaxbn
        >>> bn = jaxbn.GhostBatchNorm(2, virtual_batch_size=4)
        >>> x = jnp.arange(16.0).reshape(8, 2)                       # [N, C]
        >>> variables = bn.init(jax.random.key(0), x, train=False)
        >>> y, _ = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> print(np.asarray(y[:, 0]).round(2))     # each run of 4 normalized on its own
        [-1.34 -0.45  0.45  1.34 -1.34 -0.45  0.45  1.34]
    """

    virtual_batch_size: int | None = None
    _: dataclasses.KW_ONLY
    track_running_stats: bool = True

    #: what jaxbn's tools read (``jaxbn.tools.layers.kind_of``); also the key of its reports.
    batch_norm_kind: ClassVar[str] = "ghost"

    def __post_init__(self) -> None:
        logic.check_virtual_batch_size(self.virtual_batch_size)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Batch norm of each run of ``virtual_batch_size`` examples in training; the running
        statistics in eval.

        Args:
          x: [N, ..., C], the batch on axis 0, the features at ``axis``.
          train: keyword, required: True normalizes per virtual batch and updates
            ``batch_stats`` once per virtual batch (``mutable=["batch_stats"]``).
          mask: optional boolean, broadcastable to ``x``, as :class:`jaxbn.BatchNorm`'s.

        Returns:
          ``y``, shaped like ``x``, in ``dtype`` (default: ``x``'s dtype).

        Raises:
          ValueError: a batch size that ``virtual_batch_size`` does not divide where batch
            statistics are used, or one value per channel in a virtual batch.

        Example:
            >>> import jax, jax.numpy as jnp, jaxbn
            >>> bn = jaxbn.GhostBatchNorm(3, virtual_batch_size=2)
            >>> x = jnp.ones((4, 3))
            >>> variables = bn.init(jax.random.key(0), x, train=False)
            >>> bn.apply(variables, x, train=False).shape
            (4, 3)
        """
        train = logic.train_flag(train)
        x, features = logic.input_features(self, x, affine=linen_bn.has_params(self))
        weight, bias = linen_bn.affine_params(self, features)
        mean = var = count = None
        if self.track_running_stats:
            mean_v, var_v, count_v = linen_bn.running_stats(self, features)
            mean, var, count = mean_v.value, var_v.value, count_v.value

        if self.is_initializing():
            # init runs on whatever slice is at hand (any batch size); nothing is kept.
            y = functional.batch_norm_with_moments(
                x,
                mean,
                var,
                weight,
                bias,
                mean is None,
                0.0,
                self.eps,
                axis=self.axis,
                check_count=False,
            )[0]
            return logic.output_dtype(self, y)

        stats = None if mean is None else logic.RunningStats(mean, var, count)
        y, new = logic.ghost_batch_norm_call(self, x, weight, bias, stats, train=train, mask=mask)
        if new is not None:
            mean_v.value, var_v.value, count_v.value = new
            if linen_bn.reports_moments(self):
                splits = x.shape[0] // self.virtual_batch_size
                linen_bn.report_moments(self, self._split_moments(x, mask, splits))
        return y

    @nn.nowrap  # not a call of its own for nn.tabulate
    def _split_moments(self, x: jax.Array, mask: jax.Array | None, splits: int) -> list:
        """The moments of each virtual batch, in order: what each update of the running
        statistics averaged in (``jaxbn.update_bn`` re-estimates from them)."""
        if mask is not None:
            mask = jnp.broadcast_to(mask, x.shape)
        moments = []
        for k in range(splits):
            part = slice(k * self.virtual_batch_size, (k + 1) * self.virtual_batch_size)
            # local by design: no axis_name (module docstring)
            moments.append(
                logic.batch_moments(
                    self, x[part], None if mask is None else mask[part], synced=False
                )
            )
        return moments
