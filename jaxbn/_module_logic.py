"""What a batch norm *module* does around :func:`jaxbn.functional.batch_norm_with_moments`,
written once for the Linen and the NNX modules.

A module holds variables; everything else is here: the checks of its fields, the rank and
feature checks of its input, the ``momentum=None`` factor (cumulative average), which mapped
axis it syncs over (its own ``axis_name`` or the :func:`jaxbn.sync_batch_norm` switch), when it
checks for one value per channel, and the saturating ``num_batches_tracked``. The group and
layer norm field checks are here for the same reason.

The functions read the module's fields by name (``num_features, eps, momentum, affine,
track_running_stats, axis, axis_name, axis_index_groups, dtype, expected_ranks,
rank_message``), which both module families define with the same meaning.
"""

from __future__ import annotations

import inspect
import numbers
import os
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import flax
import flax.linen
import flax.nnx
import flax.nnx.pytreelib
import jax
import jax.numpy as jnp

from jaxbn import functional

# The argument checks are the core's; the modules take them from here (with the rest of what a
# module does), so that a module file reaches the core only through this room and functional.
from jaxbn._core.checks import (
    check_axis,
    check_clipping,
    check_eps,
    check_feature_count,
    check_momentum,
    check_running_stat,
    check_shape,
    is_real,
    train_flag,
)
from jaxbn._core.running import BatchMoments
from jaxbn._core.shapes import as_shape, feature_axis
from jaxbn.sync import current_sync

__all__ = [
    "MomentumConventionWarning",
    "Ranks1d",
    "Ranks2d",
    "Ranks3d",
    "RunningStats",
    "as_shape",
    "batch_moments",
    "batch_norm_call",
    "batch_renorm_call",
    "check_axis",
    "check_batch_norm_fields",
    "check_clipping",
    "check_eps",
    "check_feature_count",
    "check_group_norm_fields",
    "check_initializer",
    "check_initializers",
    "check_layer_norm_fields",
    "check_momentum",
    "check_renorm_fields",
    "check_running_stats",
    "check_variant_fields",
    "check_virtual_batch_size",
    "check_vmapped_update",
    "cumulative_momentum",
    "ghost_batch_norm_call",
    "group_norm_channels",
    "input_features",
    "is_real",
    "learned_params",
    "masked_statistics_call",
    "momentum_convention_message",
    "next_count",
    "output_dtype",
    "rank_variants",
    "renorm_clipping",
    "sync_axis",
    "train_flag",
    "warn_momentum_convention",
]


class RunningStats(NamedTuple):
    """A batch norm's running statistics: ``mean``, ``var`` [C] floats and an integer
    scalar ``num_batches_tracked``."""

    mean: jax.Array
    var: jax.Array
    num_batches_tracked: jax.Array


# --- the momentum convention warning -----------------------------------------------------


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


_JAXBN_DIR = os.path.dirname(__file__) + os.sep
_FLAX_DIR = os.path.dirname(flax.__file__) + os.sep
_JAX_DIR = os.path.dirname(jax.__file__) + os.sep
# the file of NNX's metaclass, whose frames sit between a module's __init__ and its builder
_NNX_CONSTRUCTION = os.path.splitext(flax.nnx.pytreelib.__file__)[0]


def _user_frame() -> tuple[int, Any] | None:
    """``(stacklevel, builder)``: the level of the first frame outside jaxbn, Flax and JAX, and
    the frame that built the module (the user's, or a jaxbn model's line); None when Flax built
    it (a clone of a module the user built)."""
    frame, level = sys._getframe(2), 2  # 2: warn_momentum_convention's caller
    internal = (_JAXBN_DIR, _FLAX_DIR)

    def constructing(frame) -> bool:
        # __post_init__ (jaxbn's), the generated dataclass __init__, Flax's kw-only wrapper.
        # The generated __init__ is compiled from a string ("<string>"), as is the code of
        # ``python -c``: only an __init__ of a Linen module there is the dataclass's.
        name, file = frame.f_code.co_name, frame.f_code.co_filename
        if file == "<string>":
            return name == "__init__" and isinstance(frame.f_locals.get("self"), flax.linen.Module)
        if file.startswith(_NNX_CONSTRUCTION):  # NNX's metaclass calls __init__
            return True
        if name == "__init__" and file.startswith(_JAXBN_DIR):  # an NNX module's own
            return isinstance(frame.f_locals.get("self"), flax.nnx.Module)
        return name in ("__post_init__", "init_wrapper") and file.startswith(internal)

    while frame is not None and constructing(frame):
        frame, level = frame.f_back, level + 1
    if frame is None or frame.f_code.co_filename.startswith(_FLAX_DIR):
        return None
    builder = frame
    # built by jaxbn's own code (a model's norm): name the user's line that led there
    while frame is not None and frame.f_code.co_filename.startswith((*internal, _JAX_DIR)):
        frame, level = frame.f_back, level + 1
    return None if frame is None else (level, builder)


# --- BatchNorm1d/2d/3d: PyTorch's rank checks, mixed into both module families ------------


class Ranks1d:
    """``torch.nn.BatchNorm1d``: input [N, C] or [N, L, C] (``axis=1``: [N, C] or [N, C, L])."""

    expected_ranks: ClassVar[tuple[int, ...]] = (2, 3)
    rank_message: ClassVar[str] = "expected 2D or 3D input (got {ndim}D input)"


class Ranks2d:
    """``torch.nn.BatchNorm2d``: input [N, H, W, C] (``axis=1``: [N, C, H, W])."""

    expected_ranks: ClassVar[tuple[int, ...]] = (4,)
    rank_message: ClassVar[str] = "expected 4D input (got {ndim}D input)"


class Ranks3d:
    """``torch.nn.BatchNorm3d``: input [N, D, H, W, C] (``axis=1``: [N, C, D, H, W])."""

    expected_ranks: ClassVar[tuple[int, ...]] = (5,)
    rank_message: ClassVar[str] = "expected 5D input (got {ndim}D input)"


def rank_doc(ranks: type, base: type) -> str:
    """A rank class's docstring: its own line (torch's class, the input shapes) and then the
    base's text after its summary (fields, example), so that ``help()`` starts with jaxbn's
    reference rather than with the inherited Flax text."""
    _, _, body = inspect.cleandoc(base.__doc__ or "").partition("\n")
    return f"{ranks.__doc__}\n{body}"


def rank_variants(base: type) -> tuple[type, type, type]:
    """``<base>1d``, ``<base>2d``, ``<base>3d``: ``base`` with the input-rank check of
    ``torch.nn.BatchNorm1d/2d/3d``, defined in ``base``'s module (where the caller binds them, so
    that they pickle by name). Linen's and NNX's ``BatchNorm`` both take theirs from here."""

    def variant(ranks: type) -> type:
        name = base.__name__ + ranks.__name__[-2:]
        namespace = {
            "__doc__": rank_doc(ranks, base),
            "__module__": base.__module__,
            "__qualname__": name,
        }
        # types.new_class, not type(): it runs the metaclass (NNX's) as a class statement does
        return types.new_class(name, (ranks, base), exec_body=lambda ns: ns.update(namespace))

    return variant(Ranks1d), variant(Ranks2d), variant(Ranks3d)


# --- fields (construction time) --------------------------------------------------------------


def check_batch_norm_fields(num_features: Any, eps: Any, momentum: Any, axis: Any) -> None:
    """The checks of a batch norm's constructor arguments (``num_features`` may be None)."""
    check_feature_count(num_features, "num_features")
    check_eps(eps)
    check_momentum(momentum)
    check_axis(axis)


def check_initializer(init: Any, name: str) -> None:
    if not callable(init):
        raise TypeError(
            f"{name} must be an initializer (key, shape, dtype) -> array, such as "
            f"flax.linen.initializers.zeros_init(), got {init!r}"
        )


#: what the momentum warning of :class:`jaxbn.BatchNorm` offers besides the converted value.
FLAX_SPELLING = " or use jaxbn.flax_compat.BatchNorm (Flax's spelling)"
#: the same for :class:`jaxbn.nnx.BatchNorm`: the NNX class with ``flax.nnx.BatchNorm``'s spelling.
NNX_FLAX_SPELLING = " or use jaxbn.nnx.flax_compat.BatchNorm (flax.nnx.BatchNorm's spelling)"
#: the other convention's usual value, as ``flax.nnx.BatchNorm``'s users know it.
NNX_FLAX_EXAMPLE = "flax.nnx.BatchNorm's momentum=0.99 is jaxbn's 0.01"


def momentum_convention_message(
    cls_name: str,
    momentum: Any,
    checked: bool,
    *,
    example: str = "Flax's momentum=0.9 is jaxbn's 0.1",
    alternative: str = FLAX_SPELLING,
) -> str | None:
    """The warning text for a momentum that reads like Flax's or Keras's convention (> 0.5),
    or None. ``example``: the other convention's usual value, as the users of this module
    know it; ``alternative``: another way out, appended to the converted value."""
    if momentum is None or momentum <= 0.5 or checked:
        return None
    m = momentum
    return (
        f"jaxbn.{cls_name}(momentum={m}): jaxbn follows PyTorch, where "
        f"momentum is the weight of the new batch (running = (1 - momentum) * running "
        f"+ momentum * batch; default 0.1), so {m} keeps only {1 - m:.3g} of the old "
        f"value. Flax and Keras use the weight of the old value ({example}). If you meant "
        f"their convention pass momentum={1 - m:.6g}{alternative}; if {m} is meant, pass "
        f"momentum_convention_checked=True."
    )


def check_initializers(scale_init: Any, bias_init: Any) -> None:
    check_initializer(scale_init, "scale_init")
    check_initializer(bias_init, "bias_init")


def learned_params(
    affine: Any, bias: Any = True, use_scale: Any = True, use_bias: Any = True
) -> tuple[bool, bool]:
    """Which of ``(scale, bias)`` a batch norm learns, from its switches.

    ``affine`` (PyTorch's) switches both; with it, PyTorch 2.13's ``bias=False`` leaves out
    ``bias`` (scale only; without ``affine`` it changes nothing, as in torch), and Flax's
    ``use_scale``/``use_bias`` each leave out one. The three are checked as Python bools (a
    traced or non-bool switch is a TypeError naming it); ``affine`` is read as truthy, as before.
    """
    for name, flag in (("bias", bias), ("use_scale", use_scale), ("use_bias", use_bias)):
        train_flag(flag, name)
    return bool(affine and use_scale), bool(affine and bias and use_bias)


def check_variant_fields(
    num_features: Any, eps: Any, axis: Any, scale_init: Any, bias_init: Any
) -> None:
    """The fields every batch norm variant (frozen, ghost, renorm) shares, checked as
    :class:`jaxbn.linen.variant_fields.VariantFields` checks them."""
    check_feature_count(num_features, "num_features")
    check_eps(eps)
    check_axis(axis)
    check_initializers(scale_init, bias_init)


def check_renorm_fields(r_max: Any, d_max: Any, warmup_steps: Any, update_rule: Any) -> None:
    """:class:`jaxbn.BatchRenorm`'s own fields."""
    check_clipping(r_max, d_max)
    check_feature_count(warmup_steps, "warmup_steps", allow_none=False)
    if update_rule not in ("torch", "keras"):
        raise ValueError(f"update_rule must be 'torch' or 'keras', got {update_rule!r}")


def check_virtual_batch_size(virtual_batch_size: Any) -> None:
    """:class:`jaxbn.GhostBatchNorm`'s examples per virtual batch."""
    if virtual_batch_size is None:
        raise TypeError("GhostBatchNorm needs virtual_batch_size (examples per virtual batch)")
    check_feature_count(virtual_batch_size, "virtual_batch_size", allow_none=False)
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")


def renorm_clipping(module: Any, r_max: Any, d_max: Any, count: jax.Array) -> tuple[Any, Any]:
    """A :class:`BatchRenorm` call's ``(r_max, d_max)``: the call's values, else the module's
    fields after its ``warmup_steps`` (counted by ``count``, ``r_max=1, d_max=0`` before)."""
    for name, value in (("r_max", r_max), ("d_max", d_max)):
        if value is not None and not isinstance(value, jax.core.Tracer) and not is_real(value):
            raise TypeError(f"{name} must be a float, not {type(value).__name__}")
    if r_max is not None or d_max is not None:
        return (
            module.r_max if r_max is None else r_max,
            module.d_max if d_max is None else d_max,
        )
    if not module.warmup_steps:
        return module.r_max, module.d_max
    warm = count >= module.warmup_steps
    return jnp.where(warm, module.r_max, 1.0), jnp.where(warm, module.d_max, 0.0)


def cumulative_momentum(
    momentum: Any, count: jax.Array, dtype: Any, steps: int | None = None
) -> Any:
    """``momentum``, or for ``None`` (the cumulative average) the factor ``1/(count + 1)`` of
    one update, or with ``steps`` the [steps] factors ``1/(count + k)``, k = 1..steps, of the
    updates of one call (a ghost batch norm's splits). In float: an int32 count + 1 could wrap
    at 2**31 - 1."""
    if momentum is not None:
        return momentum
    if steps is None:
        return 1.0 / (count.astype(dtype) + 1)
    return 1.0 / (count.astype(dtype) + jnp.arange(1, steps + 1, dtype=dtype))


def check_group_norm_fields(num_groups: Any, num_channels: Any, eps: Any, axis: Any) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(
            f"num_groups must be an int, not {type(num_groups).__name__} ({num_groups!r})"
        )
    if num_groups <= 0:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    check_feature_count(num_channels, "num_channels")
    if num_channels is not None and num_channels % num_groups:
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
        )
    check_eps(eps)
    check_axis(axis)


def check_layer_norm_fields(normalized_shape: Any, eps: Any) -> None:
    shape = normalized_shape
    check_shape((shape,) if isinstance(shape, numbers.Integral) else shape, "normalized_shape")
    check_eps(eps)


# --- inputs and variables (trace time) -------------------------------------------------------


def input_features(
    module: Any, x: jax.Array, *, affine: bool | None = None
) -> tuple[jax.Array, int]:
    """``(x as an array, C)``: the rank check of BatchNorm1d/2d/3d, C from the field or ``x``.

    Without parameters nor statistics nothing else would notice a wrong C: checked here.
    ``affine``: whether the module has a parameter (default: its ``affine`` field; a module
    whose ``use_scale``/``use_bias`` leave both out passes False).
    """
    x = jnp.asarray(x)
    ranks = getattr(module, "expected_ranks", None)  # set by the 1d/2d/3d classes
    if ranks is not None and x.ndim not in ranks:
        raise ValueError(module.rank_message.format(ndim=x.ndim))
    ax = feature_axis(module.axis, x.ndim)
    features = module.num_features if module.num_features is not None else x.shape[ax]
    tracking = getattr(module, "track_running_stats", True)
    if affine is None:
        affine = module.affine
    if not (affine or tracking) and x.shape[ax] != features:
        raise ValueError(
            f"expected {features} features on axis {module.axis}, "
            f"got input of shape {tuple(x.shape)}"
        )
    return x, features


def check_running_stats(where: str, stats: RunningStats, features: int) -> None:
    """Shapes and dtypes of loaded statistics; ``where`` names them (``batch_stats/bn1``)."""
    check_running_stat(stats.mean, f"{where}/mean", features)
    check_running_stat(stats.var, f"{where}/var", features)
    count = stats.num_batches_tracked
    dtype = jnp.result_type(count)
    if jnp.shape(count) != () or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where}/num_batches_tracked must be an integer scalar, got shape "
            f"{jnp.shape(count)} and dtype {dtype}"
        )


def group_norm_channels(num_channels: int | None, affine: bool, axis: int, x: jax.Array) -> int:
    """C of a group norm: the field, else the input's; checked against ``x`` without affine
    parameters (with them, :func:`jaxbn.functional.group_norm` checks their size)."""
    x = jnp.asarray(x)
    if num_channels is None:
        return x.shape[feature_axis(axis, max(x.ndim, 1))]
    if not affine and x.ndim >= 2 and x.shape[axis] != num_channels:
        raise ValueError(f"expected {num_channels} channels, got input of shape {x.shape}")
    return num_channels


# --- the call ---------------------------------------------------------------------------------


def batch_norm_call(
    module: Any,
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    stats: RunningStats | None,
    *,
    train: bool,
    initializing: bool = False,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, RunningStats | None, BatchMoments | None]:
    """One batch norm call of ``module`` on ``x`` (already through :func:`input_features`).

    Args:
      module: the module (its fields are read).
      x: the input. weight, bias: [C] or None.
      stats: the running statistics, or None (``track_running_stats=False``).
      train: the mode, a Python bool.
      initializing: Linen's init: no sync (variables are created outside any mapped axis), no
        one-value check (init runs on whatever slice is at hand), nothing updated.
      mask: boolean, broadcastable to ``x``.

    Returns:
      ``(y, new_stats, moments)``: ``y`` in ``module.dtype`` (or the input's); ``new_stats``
      when the running statistics are to be replaced (training, tracking, not initializing),
      else None; the batch's moments when the statistics were updated, else None.
    """
    updating = train and stats is not None and not initializing
    momentum = module.momentum
    if updating and momentum is None:
        # In float: an int32 count + 1 could wrap at 2**31 - 1.
        momentum = 1.0 / (stats.num_batches_tracked.astype(stats.mean.dtype) + 1)
    elif momentum is None:
        momentum = 0.0  # unused: nothing is updated
    axis_name, axis_index_groups = sync_axis(module, synced=train and not initializing)
    y, new_mean, new_var, moments = functional.batch_norm_with_moments(
        x,
        None if stats is None else stats.mean,
        None if stats is None else stats.var,
        weight,
        bias,
        # As in PyTorch: without running statistics, batch statistics are used in eval too.
        training=train or stats is None,
        momentum=momentum,
        eps=module.eps,
        axis=module.axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        check_count=not initializing,
    )
    y = output_dtype(module, y)
    if not updating:
        return y, None, None
    return y, RunningStats(new_mean, new_var, next_count(stats.num_batches_tracked)), moments


def output_dtype(module: Any, y: jax.Array) -> jax.Array:
    """``y`` in the module's ``dtype``, or as it is when that is None (the input's)."""
    return y if module.dtype is None else y.astype(module.dtype)


def batch_moments(
    module: Any,
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    synced: bool = True,
    check_count: bool = True,
) -> BatchMoments:
    """The moments (count, mean, biased var per channel) of the batch ``x`` over every axis but
    ``module.axis``, merged over the module's :func:`sync_axis` when ``synced``: what a
    variant reports for ``jaxbn.update_bn`` (its update's own statistics, as a BatchNorm's).
    The moments are differentiable. ``check_count=False``: no one-value-per-channel check (a
    caller that has checked it already)."""
    axis_name, axis_index_groups = sync_axis(module, synced=synced)
    return functional.batch_norm_with_moments(
        x,
        None,
        None,
        None,
        None,
        True,
        0.0,
        module.eps,
        axis=module.axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        check_count=check_count,
    )[3]


def batch_renorm_call(
    module: Any,
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    stats: RunningStats,
    *,
    train: bool,
    mask: jax.Array | None = None,
    r_max: Any = None,
    d_max: Any = None,
) -> tuple[jax.Array, RunningStats | None]:
    """One call of a batch renorm ``module`` (Linen's or NNX's; fields ``momentum, eps, axis,
    axis_name, axis_index_groups, r_max, d_max, warmup_steps, update_rule, dtype``).

    Eval (``train=False``) is BatchNorm's eval; training clips with this call's ``r_max``/
    ``d_max`` or the fields after warm-up (:func:`renorm_clipping`), syncs over
    :func:`sync_axis` and updates the statistics by ``update_rule``.

    Returns:
      ``(y, new_stats)``: ``y`` in the output dtype; ``new_stats`` None in eval.
    """
    if not train:
        y = functional.batch_renorm(
            x, stats.mean, stats.var, weight, bias, False, 0.0, module.eps, axis=module.axis
        )[0]
        return output_dtype(module, y), None
    count = stats.num_batches_tracked
    momentum = cumulative_momentum(module.momentum, count, stats.mean.dtype)
    r_max, d_max = renorm_clipping(module, r_max, d_max, count)
    axis_name, axis_index_groups = sync_axis(module)
    y, mean, var = functional.batch_renorm(
        x,
        stats.mean,
        stats.var,
        weight,
        bias,
        True,
        momentum,
        module.eps,
        r_max=r_max,
        d_max=d_max,
        axis=module.axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        update_rule=module.update_rule,
    )
    return output_dtype(module, y), RunningStats(mean, var, next_count(count))


def ghost_batch_norm_call(
    module: Any,
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    stats: RunningStats | None,
    *,
    train: bool,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, RunningStats | None]:
    """One call of a ghost batch norm ``module`` (fields ``virtual_batch_size, momentum, eps,
    axis, dtype``): in training each virtual batch of axis 0 is normalized with its own
    statistics and updates the running ones in turn (the counter grows by the number of
    splits); eval is BatchNorm's (batch statistics, split, without ``stats``).

    Returns:
      ``(y, new_stats)``: ``y`` in the output dtype; ``new_stats`` None unless training with
      running statistics.
    """
    updating = train and stats is not None
    splits = x.shape[0] // module.virtual_batch_size
    momentum = 0.0 if module.momentum is None else module.momentum  # 0.0: unused
    if updating:
        # torch: split k of this call averages with factor 1/(num_batches_tracked + k)
        momentum = cumulative_momentum(
            module.momentum, stats.num_batches_tracked, stats.mean.dtype, steps=splits
        )
    y, mean, var = functional.ghost_batch_norm(
        x,
        None if stats is None else stats.mean,
        None if stats is None else stats.var,
        virtual_batch_size=module.virtual_batch_size,
        weight=weight,
        bias=bias,
        training=train,
        momentum=momentum,
        eps=module.eps,
        axis=module.axis,
        mask=mask,
    )
    if not updating:
        return output_dtype(module, y), None
    count = next_count(stats.num_batches_tracked, splits)
    return output_dtype(module, y), RunningStats(mean, var, count)


def check_vmapped_update(name: str, x: jax.Array, stats: Sequence[jax.Array | None]) -> None:
    """Refuses a training update of unmapped running statistics from a vmapped batch.

    Under ``nnx.vmap`` with the module's state not mapped (``in_axes=None`` or
    ``nnx.StateAxes({...: None})``) and no ``axis_name``, each member would compute its own
    statistics and write them into the one shared copy: JAX then fails at the transform's output
    with ``got axis spec None but output was batched``. This says what to do instead. Called only
    when the module updates its statistics and does not sync (no axis name).

    Args:
      name: the module's name for the message (``jaxbn.nnx.BatchNorm2d``).
      x: the call's input; stats: the running statistics' values (None ones are skipped).
    """
    try:  # BatchTracer has no public name; without it the check is skipped (JAX then says)
        from jax._src.interpreters.batching import BatchTracer

        BatchTracer._trace  # noqa: B018 (the attribute this check reads)
    except (ImportError, AttributeError):
        return

    def mapped_traces(value) -> set[int]:
        # the vmaps that map ``value`` (nested ones too): ids of their traces
        found = set()
        while isinstance(value, jax.core.Tracer):
            if isinstance(value, BatchTracer):
                if value.batch_dim is not None:  # None: not mapped by this vmap
                    found.add(id(value._trace))
                value = value.val
            elif hasattr(value, "primal"):  # a JVP tracer (grad inside vmap)
                value = value.primal
            else:
                break
        return found

    batched = mapped_traces(x)
    for stat in stats:
        if stat is not None and batched - mapped_traces(stat):
            raise ValueError(
                f"{name} is training under vmap (nnx.vmap) with running statistics that are not "
                f"mapped, and no axis_name: every member would write its own batch statistics "
                f"into the one shared copy. To compute the statistics over all members (as one "
                f"batch, synced), give the vmap an axis_name and the batch norm the same "
                f"axis_name=...; for per-member statistics, map the model's state too "
                f"(nnx.vmap(..., in_axes=0, out_axes=0) over a model with a leading members "
                f"axis, e.g. created under nnx.vmap)"
            )


def masked_statistics_call(
    module: Any,
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    stats: RunningStats,
    *,
    mask: jax.Array,
) -> tuple[jax.Array, RunningStats | None, BatchMoments | None]:
    """A training call with Flax's meaning of ``mask``: the statistics (and the running
    update) come from the True elements, and *every* element is normalized with them.

    jaxbn's own modules give the masked-out elements 0 instead (:func:`batch_norm_call`); the
    Flax-spelled modules take Flax's meaning. Gradients flow through the batch statistics as in
    training (the moments are differentiable, merged over devices when synced).

    Returns:
      ``(y, new_stats, moments)`` as :func:`batch_norm_call`'s.
    """
    _, new, moments = batch_norm_call(module, x, weight, bias, stats, train=True, mask=mask)
    y, _, _ = functional.batch_norm(
        x, moments.mean, moments.var, weight, bias, False, 0.0, module.eps, axis=module.axis
    )
    # A channel with no selected element has no statistics: NaN, as Flax's empty mean (not
    # x·rsqrt(eps) from the zero placeholder; its running statistics are kept).
    ax = feature_axis(module.axis, y.ndim)
    selected = jnp.reshape(
        moments.count > 0, [y.shape[ax] if i == ax else 1 for i in range(y.ndim)]
    )
    y = jnp.where(selected, y, jnp.nan).astype(y.dtype)
    return output_dtype(module, y), new, moments


def next_count(count: jax.Array, steps: int = 1) -> jax.Array:
    """``count + steps``, saturating instead of wrapping (int32 unless jax_enable_x64)."""
    top = jnp.iinfo(count.dtype).max
    return jnp.where(count > top - steps, top, count + steps).astype(count.dtype)


def sync_axis(module: Any, *, synced: bool = True) -> tuple[Any, Sequence[Sequence[int]] | None]:
    """The module's own ``axis_name`` or else the :func:`jaxbn.sync_batch_norm` switch's; like
    SyncBatchNorm, only training syncs, so eval needs no mapped axis."""
    if not synced:
        return None, None
    axis_name, axis_index_groups = module.axis_name, module.axis_index_groups
    sync = current_sync()
    if axis_name is None and sync is not None:
        axis_name, axis_index_groups = sync
    return axis_name, axis_index_groups
