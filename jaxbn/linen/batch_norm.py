"""Flax modules ``BatchNorm`` and the rank-checked ``BatchNorm1d/2d/3d``.

The formula, per feature c::

    y = (x - mean_c) / sqrt(var_c + eps) * scale_c + bias_c

* ``train=True``: ``mean_c``/``var_c`` are the batch's mean and **biased** variance over every
  axis but the feature axis; the running statistics become
  ``mean ← (1-momentum)·mean + momentum·μ_B`` and ``var ← (1-momentum)·var + momentum·σ²_B·n/(n-1)``
  (the **unbiased** variance), and ``num_batches_tracked`` grows by one.
  ``momentum=None`` is the cumulative average (factor ``1/num_batches_tracked``).
* ``train=False``: the running statistics are used, nothing changes — unless
  ``track_running_stats=False``, in which case there are none and batch statistics are used.

Relation to PyTorch: the same fields with the same meaning as ``torch.nn.BatchNorm*`` (momentum
is the weight of the new batch) and the same numbers; variables are named the Flax way —
``params: scale, bias`` (PyTorch ``weight, bias``) and ``batch_stats: mean, var,
num_batches_tracked`` (``running_mean, running_var, num_batches_tracked``). Layout is channels
last by default (``axis=-1``); ``axis=1`` takes PyTorch's NCHW.

Relation to ``flax.linen.BatchNorm``: Flax's ``momentum`` is ``1 - momentum`` here, Flax stores
the biased running variance (jaxbn and PyTorch the unbiased one), Flax's ``use_running_average``
is ``not train`` here and ``train`` is required, so forgetting eval mode cannot happen silently.
Flax averages per-device means with equal weight; jaxbn merges counts, so uneven shards and
masks are exact.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x, *, train: bool):
    ...         x = nn.Conv(16, (3, 3))(x)                   # x: [N, H, W, C]
    ...         return nn.relu(jaxbn.BatchNorm2d(16)(x, train=train))
    >>> x = jnp.ones((8, 6, 6, 3))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    >>> y_eval = Net().apply({**variables, **updates}, x, train=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import functional
from jaxbn._core.checks import (
    check_axis,
    check_eps,
    check_feature_count,
    check_momentum,
    check_running_stat,
    train_flag,
)
from jaxbn.sync import current_sync

__all__ = ["MOMENTS_COLLECTION", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

#: The collection a training batch norm reports its batch statistics to (count, mean, biased
#: var per channel, one entry per call) when the caller names it in ``mutable`` — how
#: ``jaxbn.update_bn`` learns them as data instead of switching the modules' behaviour.
MOMENTS_COLLECTION = "batch_moments"


class BatchNorm(nn.Module):
    """Batch normalization with PyTorch's semantics over any input rank (see module docstring).

    Attributes:
      num_features: C, the size of the feature axis; inferred from the input when None.
      eps: added to the variance.
      momentum: weight of the new batch in the running average; None = cumulative average.
      affine: learn ``scale`` (init 1) and ``bias`` (init 0).
      track_running_stats: keep ``batch_stats``; if False, eval uses batch statistics too.
      axis: the feature axis (-1 channels-last; 1 for PyTorch's NC... layout).
      axis_name: mapped axis (pmap / shard_map) to sync statistics over, count-weighted
        (training only; eval needs no collective). Unset: ``jaxbn.sync_batch_norm`` decides.
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var`` (float32
        also for half-precision inputs; float64 for float64 work).

    Call:
      ``x``: [N, ..., C] (C at ``axis``); ``train`` (keyword, required); optional ``mask``
      (boolean, broadcastable to ``x``: False elements do not count and output 0).
      Returns ``y`` shaped like ``x``.
    """

    num_features: int | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    axis: int = -1
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    #: input ranks accepted (None: any) and the message when not; set by the 1d/2d/3d classes.
    expected_ranks: ClassVar[tuple[int, ...] | None] = None
    rank_message: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_feature_count(self.num_features, "num_features")
        check_eps(self.eps)
        check_momentum(self.momentum)
        check_axis(self.axis)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        train = train_flag(train)
        x = jnp.asarray(x)
        if self.expected_ranks is not None and x.ndim not in self.expected_ranks:
            raise ValueError(self.rank_message.format(ndim=x.ndim))
        ax = functional._feature_axis(self.axis, x.ndim)
        features = self.num_features if self.num_features is not None else x.shape[ax]
        if not (self.affine or self.track_running_stats) and x.shape[ax] != features:
            raise ValueError(
                f"expected {features} features on axis {self.axis}, "
                f"got input of shape {tuple(x.shape)}"
            )

        weight = bias = None
        if self.affine:
            weight = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
            bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)

        running_mean = running_var = None
        if self.track_running_stats:
            mean_v = self.variable(
                "batch_stats", "mean", lambda: jnp.zeros((features,), self.param_dtype)
            )
            var_v = self.variable(
                "batch_stats", "var", lambda: jnp.ones((features,), self.param_dtype)
            )
            count_v = self.variable(
                "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
            )
            running_mean, running_var = mean_v.value, var_v.value
            self._check_batch_stats(running_mean, running_var, count_v.value, features)

        # As in PyTorch: without running statistics, batch statistics are used in eval too.
        use_batch_stats = train or not self.track_running_stats
        initializing = self.is_initializing()
        updating = train and self.track_running_stats and not initializing
        momentum = self.momentum
        if updating and momentum is None:
            # In float: an int32 count + 1 could wrap at 2**31 - 1.
            momentum = 1.0 / (count_v.value.astype(running_mean.dtype) + 1)
        elif momentum is None:
            momentum = 0.0  # unused: nothing is updated

        axis_name, axis_index_groups = self.axis_name, self.axis_index_groups
        sync = current_sync()
        if axis_name is None and sync is not None:
            axis_name, axis_index_groups = sync
        # Like SyncBatchNorm: only training syncs, so eval needs no mapped axis. Like Flax,
        # init skips the collective: variables are created outside any mapped axis.
        synced = train and not initializing
        y, new_mean, new_var, moments = functional.batch_norm_with_moments(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training=use_batch_stats,
            momentum=momentum,
            eps=self.eps,
            axis=self.axis,
            axis_name=axis_name if synced else None,
            axis_index_groups=axis_index_groups if synced else None,
            mask=mask,
            # init runs on whatever slice of the data is at hand (one row per device of a
            # synced model); its statistics are never kept.
            check_count=not initializing,
        )
        if updating:
            mean_v.value, var_v.value = new_mean, new_var
            count = count_v.value
            # Saturates instead of wrapping (int32 unless jax_enable_x64).
            count_v.value = jnp.where(count == jnp.iinfo(count.dtype).max, count, count + 1)
            if self._reporting_moments():
                self.sow(MOMENTS_COLLECTION, "moments", dict(moments._asdict()))
        return y.astype(self.dtype) if self.dtype is not None else y

    def _reporting_moments(self) -> bool:
        # Only when the caller names the collection (jaxbn.update_bn does): with mutable=True
        # the report would be merged back into the variables and grow at every step.
        requested = self.scope.mutable
        return requested is not True and self.is_mutable_collection(MOMENTS_COLLECTION)

    def _check_batch_stats(self, mean, var, count, features: int) -> None:
        where = "/".join(("batch_stats", *self.path))
        check_running_stat(mean, f"{where}/mean", features)
        check_running_stat(var, f"{where}/var", features)
        dtype = jnp.result_type(count)
        if jnp.shape(count) != () or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{where}/num_batches_tracked must be an integer scalar, got shape "
                f"{jnp.shape(count)} and dtype {dtype}"
            )


class BatchNorm1d(BatchNorm):
    """``torch.nn.BatchNorm1d``: input [N, C] or [N, L, C] (``axis=1``: [N, C] or [N, C, L])."""

    expected_ranks: ClassVar[tuple[int, ...]] = (2, 3)
    rank_message: ClassVar[str] = "expected 2D or 3D input (got {ndim}D input)"


class BatchNorm2d(BatchNorm):
    """``torch.nn.BatchNorm2d``: input [N, H, W, C] (``axis=1``: [N, C, H, W])."""

    expected_ranks: ClassVar[tuple[int, ...]] = (4,)
    rank_message: ClassVar[str] = "expected 4D input (got {ndim}D input)"


class BatchNorm3d(BatchNorm):
    """``torch.nn.BatchNorm3d``: input [N, D, H, W, C] (``axis=1``: [N, C, D, H, W])."""

    expected_ranks: ClassVar[tuple[int, ...]] = (5,)
    rank_message: ClassVar[str] = "expected 5D input (got {ndim}D input)"
