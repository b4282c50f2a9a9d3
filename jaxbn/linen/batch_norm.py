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
masks are exact. A momentum above 0.5 (likely Flax's convention) warns once per value with a
:class:`MomentumConventionWarning` unless ``momentum_convention_checked=True``;
``jaxbn.flax_compat.BatchNorm`` takes Flax's spelling, and ``jaxbn.from_flax_batch_norm``
converts Flax's variables (statistics without a counter are refused here, naming it).

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

import os
import sys
import warnings
from collections.abc import Callable, Sequence
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

__all__ = [
    "MOMENTS_COLLECTION",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "MomentumConventionWarning",
]

#: Flax's initializer signature: ``init(key, shape, dtype) -> array``.
Initializer = Callable[..., jax.Array]

#: The collection a training batch norm reports its batch statistics to (count, mean, biased
#: var per channel, one entry per call) when the caller names it in ``mutable`` — how
#: ``jaxbn.update_bn`` learns them as data instead of switching the modules' behaviour.
MOMENTS_COLLECTION = "batch_moments"


class MomentumConventionWarning(UserWarning):
    """A momentum that reads like the other convention (PyTorch's vs Flax's); see the message."""


# (message, file, line) of the warnings given: repeats stay silent. Changes no number.
_WARNED: set[tuple[str, str, int]] = set()


def warn_momentum_convention(message: str) -> None:
    """Issue a :class:`MomentumConventionWarning` from the user's line that built the module.

    Once per message (it holds the value) and line, whatever the warning filters: Flax's
    clones of a module at ``init``/``apply`` and later traces do not repeat it. Changes no
    number.
    """
    found = _user_frame()
    if found is None:
        return
    level, builder = found
    key = (message, builder.f_code.co_filename, builder.f_lineno)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, MomentumConventionWarning, stacklevel=level)


_JAXBN_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep
_FLAX_DIR = os.path.dirname(os.path.dirname(nn.__file__)) + os.sep
_JAX_DIR = os.path.dirname(jax.__file__) + os.sep


def _user_frame() -> tuple[int, Any] | None:
    """``(stacklevel, builder)``: the level of the first frame outside jaxbn, Flax and JAX, and
    the frame that built the module (the user's, or a jaxbn model's line); None when Flax built
    it (a clone of a module the user built)."""
    frame, level = sys._getframe(2), 2  # 2: warn_momentum_convention's caller
    internal = (_JAXBN_DIR, _FLAX_DIR)

    def constructing(frame) -> bool:
        # __post_init__ (jaxbn's), the generated dataclass __init__, Flax's kw-only wrapper
        name, file = frame.f_code.co_name, frame.f_code.co_filename
        return file == "<string>" or (
            name in ("__post_init__", "init_wrapper") and file.startswith(internal)
        )

    while frame is not None and constructing(frame):
        frame, level = frame.f_back, level + 1
    if frame is None or frame.f_code.co_filename.startswith(_FLAX_DIR):
        return None
    builder = frame
    # built by jaxbn's own code (a model's norm): name the user's line that led there
    while frame is not None and frame.f_code.co_filename.startswith((*internal, _JAX_DIR)):
        frame, level = frame.f_back, level + 1
    return None if frame is None else (level, builder)


def check_initializer(init: Any, name: str) -> None:
    if not callable(init):
        raise TypeError(
            f"{name} must be an initializer (key, shape, dtype) -> array, such as "
            f"flax.linen.initializers.zeros_init(), got {init!r}"
        )


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
      scale_init: initializer of ``scale``, Flax's signature ``(key, shape, dtype)``; default
        ones. ``nn.initializers.zeros_init()`` zero-initialises the last norm of a residual
        block (torchvision's ``zero_init_residual``).
      bias_init: initializer of ``bias``; default zeros.
      momentum_convention_checked: silences the :class:`MomentumConventionWarning` that a
        momentum above 0.5 gets (Flax's ``momentum=0.9`` is ``momentum=0.1`` here). Changes
        no number.

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
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    momentum_convention_checked: bool = False

    #: input ranks accepted (None: any) and the message when not; set by the 1d/2d/3d classes.
    expected_ranks: ClassVar[tuple[int, ...] | None] = None
    rank_message: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_feature_count(self.num_features, "num_features")
        check_eps(self.eps)
        check_momentum(self.momentum)
        check_axis(self.axis)
        check_initializer(self.scale_init, "scale_init")
        check_initializer(self.bias_init, "bias_init")
        if (
            self.momentum is not None
            and self.momentum > 0.5
            and not self.momentum_convention_checked
        ):
            m = self.momentum
            warn_momentum_convention(
                f"jaxbn.{type(self).__name__}(momentum={m}): jaxbn follows PyTorch, where "
                f"momentum is the weight of the new batch (running = (1 - momentum) * running "
                f"+ momentum * batch; default 0.1), so {m} keeps only {1 - m:.3g} of the old "
                f"value. Flax and Keras use the weight of the old value (Flax's momentum=0.9 "
                f"is jaxbn's 0.1). If you meant Flax's convention pass momentum={1 - m:.6g} "
                f"or use jaxbn.flax_compat.BatchNorm (Flax's spelling); if {m} is meant, pass "
                f"momentum_convention_checked=True."
            )
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

        weight, bias = self._affine_params(features)

        running_mean = running_var = None
        if self.track_running_stats:
            self._refuse_stats_without_counter()
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

    def _affine_params(self, features: int) -> tuple[jax.Array | None, jax.Array | None]:
        """``(scale, bias)``, each None when absent (``jaxbn.flax_compat`` leaves one out)."""
        if not self.affine:
            return None, None
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        return scale, bias

    def _refuse_stats_without_counter(self) -> None:
        # Statistics without a counter are flax.linen.BatchNorm's (biased variance, no
        # num_batches_tracked). Flax would create the counter at 0 in training and go on with
        # the wrong variance; a fresh tree (none of the three) is created as usual.
        names = ("mean", "var", "num_batches_tracked")
        present = [n for n in names if self.has_variable("batch_stats", n)]
        if present and len(present) < len(names):
            where = "/".join(("batch_stats", *self.path))
            missing = ", ".join(f"{where}/{n}" for n in names if n not in present)
            raise ValueError(
                f"{missing} missing next to {', '.join(present)}: these look like "
                "flax.linen.BatchNorm statistics (biased running variance, no counter). "
                "Convert them with jaxbn.from_flax_batch_norm(variables, batch_count=..., "
                "num_batches_tracked=..., flax_momentum=...), which states what it assumes"
            )

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
