"""Pure-function normalizations with PyTorch's semantics: batch, group and layer norm.

Each function validates shapes at trace time (shapes are static in JAX) with PyTorch's error
wording, computes in float32 (float64 stays float64), returns the input's dtype, and
differentiates through :func:`jaxbn._core.normalize.normalize`'s hand-written rule.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxbn import functional as F
    >>> x = jnp.arange(8.0).reshape(4, 2)                  # [N, C]
    >>> y, rm, rv = F.batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True)
    >>> rm                                                   # 0.9·0 + 0.1·[3, 4]
    Array([0.3, 0.4], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._core.checks import (
    check_axis,
    check_floating_input,
    check_momentum,
    check_running_stat,
    is_real,
    train_flag,
)
from jaxbn._core.normalize import normalize
from jaxbn._core.running import BatchMoments, update_running
from jaxbn._core.shapes import compute_dtype

__all__ = ["BatchMoments", "batch_norm", "batch_norm_with_moments", "group_norm", "layer_norm"]


def batch_norm(
    x: jax.Array,
    running_mean: jax.Array | None,
    running_var: jax.Array | None,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    training: bool = False,
    momentum: float | jax.Array = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = -1,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Batch normalization, ``torch.nn.functional.batch_norm`` with a return value.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per feature. In training, ``mean`` and
    ``var`` are the batch's mean and **biased** variance over every axis but ``axis``, and the
    running statistics are updated as ``(1 - momentum) * old + momentum * new`` with the
    **unbiased** variance ``var * n / (n - 1)``. In eval the running statistics are used and
    returned unchanged.

    Args:
      x: [N, ..., C] with the feature axis at ``axis`` (default last; ``axis=1`` for NCHW).
      running_mean: [C] or None (no tracking: then ``training`` must be True).
      running_var: [C] or None, together with ``running_mean``.
      weight: [C] scale γ, or None for ones.
      bias: [C] shift β, or None for zeros.
      training: use batch statistics and update the running ones.
      momentum: weight of the new batch in the running average (PyTorch's meaning; Flax's
        ``momentum`` is ``1 - momentum``). May be a traced scalar, e.g. ``1/num_batches_tracked``.
      eps: added to the variance.
      axis: the feature axis.
      axis_name: mapped axis (pmap / shard_map) to sync statistics over, count-weighted.
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      mask: boolean, broadcastable to ``x``; False elements do not count in the statistics,
        may hold anything (NaN included) and get output 0.

    Returns:
      ``(y, new_running_mean, new_running_var)``: ``y`` like ``x`` (in ``x``'s dtype), the
      stats [C] float (None where given as None). Statistics of a channel with no selected
      element are not updated, nor is the running variance of a channel with one.

    Raises:
      ValueError / RuntimeError / TypeError with PyTorch's wording, at trace time.
    """
    options = {"axis": axis, "axis_name": axis_name, "axis_index_groups": axis_index_groups}
    y, new_mean, new_var, _ = batch_norm_with_moments(
        x, running_mean, running_var, weight, bias, training, momentum, eps, mask=mask, **options
    )
    return y, new_mean, new_var


def batch_norm_with_moments(
    x, running_mean, running_var, weight, bias, training, momentum, eps, *, check_count=True, **kw
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, BatchMoments | None]:
    """:func:`batch_norm`, and also the batch's :class:`BatchMoments` (None in eval).

    What ``jaxbn.update_bn`` averages: the modules report these moments when asked.
    ``check_count=False`` lets a single value per channel through (module initialization,
    whose statistics are never kept). ``kw``: :func:`batch_norm`'s keyword-only arguments.
    """
    axis, axis_name, axis_index_groups, mask = _batch_norm_options(**kw)
    x = jnp.asarray(x)
    check_floating_input(x, "batch_norm")
    training = train_flag(training, "training")
    ax = _feature_axis(axis, x.ndim)
    channels = x.shape[ax]
    _check_numel(
        channels,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    check_running_stat(running_mean, "running_mean", channels)
    check_running_stat(running_var, "running_var", channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked: use jaxbn.BatchNorm, "
            "or pass momentum=1/num_batches_tracked"
        )
    if not isinstance(momentum, jax.Array):
        check_momentum(momentum)
    _check_eps(eps, training)
    mask = _broadcast_mask(mask, x.shape)
    stat_shape = tuple(channels if i == ax else 1 for i in range(x.ndim))
    dtype = compute_dtype(x.dtype)
    x32 = x.astype(dtype)

    if not training:
        mean = jnp.reshape(running_mean, stat_shape).astype(dtype)
        var = jnp.reshape(running_var, stat_shape).astype(dtype)
        xhat = (x32 - mean) * jax.lax.rsqrt(var + eps)
        y = _affine(xhat, weight, bias, stat_shape, mask, _output_dtype(x.dtype))
        return y, running_mean, running_var, None

    reduce_axes = tuple(i for i in range(x.ndim) if i != ax)
    groups = _groups(axis_index_groups)
    values = int(np.prod([x.shape[i] for i in reduce_axes], dtype=np.int64))
    if check_count and values * _num_devices(axis_name, groups) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    # Floating x goes in as it is: normalize reads half precision without a float32 copy.
    y, count, mean, var = normalize(
        x if jnp.issubdtype(x.dtype, jnp.floating) else x32,
        _as_stat(weight, stat_shape, dtype),
        _as_stat(bias, stat_shape, dtype),
        mask,
        reduce_axes,
        eps,
        axis_name,
        groups,
    )
    y = y.astype(_output_dtype(x.dtype))
    moments = BatchMoments(*(jnp.reshape(a, (channels,)) for a in (count, mean, var)))
    if running_mean is None:
        return y, None, None, moments
    new_mean, new_var = update_running(running_mean, running_var, moments, momentum)
    return y, new_mean, new_var, moments


def group_norm(
    x: jax.Array,
    num_groups: int,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    eps: float = 1e-5,
    *,
    axis: int = -1,
) -> jax.Array:
    """Group normalization, ``torch.nn.functional.group_norm`` on a channels-``axis`` layout.

    Channels are split into ``num_groups`` groups of ``C / num_groups``; each example is
    normalized per group over its channels and spatial positions (biased variance), then
    scaled and shifted per channel. Independent of the batch, the same in train and eval.

    Args:
      x: [N, ..., C] (feature axis ``axis``; batch axis 0).
      num_groups: number of groups; must divide C.
      weight: [C] or None (ones). bias: [C] or None (zeros).
      eps: added to the variance.
      axis: the channel axis.

    Returns:
      y: like ``x``, in ``x``'s dtype.
    """
    x = jnp.asarray(x)
    check_floating_input(x, "group_norm")
    if x.ndim < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {x.ndim}")
    ax = _feature_axis(axis, x.ndim)
    if ax == 0:
        raise ValueError("group_norm: axis 0 is the batch axis, the channel axis must differ")
    channels = x.shape[ax]
    if channels % num_groups != 0:
        raise ValueError(
            f"num_channels ({channels}) must be divisible by num_groups ({num_groups})"
        )
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and jnp.size(value) != channels:
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in "
                f"input, but got {name} of shape {list(jnp.shape(value))} and input of shape "
                f"{list(x.shape)}"
            )
    spatial = int(np.prod([d for i, d in enumerate(x.shape) if i not in (0, ax)]))
    if spatial * (channels // num_groups) == 1:
        raise ValueError(
            f"Expected more than 1 value per group, got input size {list(x.shape)} "
            f"with num_groups={num_groups}"
        )
    # [N, S..., C] -> [N, S..., G, C/G]; reduce over everything but N and G.
    moved = jnp.moveaxis(x.astype(compute_dtype(x.dtype)), ax, -1)
    grouped = moved.reshape((*moved.shape[:-1], num_groups, channels // num_groups))
    reduce_axes = (*range(1, grouped.ndim - 2), grouped.ndim - 1)
    param_shape = (1,) * (grouped.ndim - 2) + grouped.shape[-2:]  # [1, ..., G, C/G]
    y = normalize(
        grouped,
        _as_stat(weight, param_shape, grouped.dtype),
        _as_stat(bias, param_shape, grouped.dtype),
        None,
        reduce_axes,
        eps,
    )[0]
    return jnp.moveaxis(y.reshape(moved.shape), -1, ax).astype(_output_dtype(x.dtype))


def layer_norm(
    x: jax.Array,
    normalized_shape: int | Sequence[int],
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    eps: float = 1e-5,
) -> jax.Array:
    """Layer normalization over the trailing dims, ``torch.nn.functional.layer_norm``.

    Args:
      x: [*, *normalized_shape].
      normalized_shape: the trailing shape to normalize over.
      weight: normalized_shape-shaped scale or None. bias: same, shift or None.
      eps: added to the (biased) variance.

    Returns:
      y: like ``x``, in ``x``'s dtype.
    """
    x = jnp.asarray(x)
    check_floating_input(x, "layer_norm")
    shape = _as_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[*, {', '.join(map(str, shape))}], but got input of size{list(x.shape)}"
        )
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and tuple(jnp.shape(value)) != shape:
            raise RuntimeError(
                f"Expected {name} of shape {list(shape)}, but got {list(jnp.shape(value))}"
            )
    reduce_axes = tuple(range(x.ndim - k, x.ndim))
    dtype = compute_dtype(x.dtype)
    stat_shape = (1,) * (x.ndim - k) + shape
    y = normalize(
        x.astype(dtype),
        _as_stat(weight, stat_shape, dtype),
        _as_stat(bias, stat_shape, dtype),
        None,
        reduce_axes,
        eps,
    )[0]
    return y.astype(_output_dtype(x.dtype))


# --- helpers -------------------------------------------------------------------------------


def _batch_norm_options(*, axis=-1, axis_name=None, axis_index_groups=None, mask=None):
    return axis, axis_name, axis_index_groups, mask


def _feature_axis(axis: int, ndim: int) -> int:
    check_axis(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}D input")
    return axis % ndim


def _check_numel(channels: int, **arrays: jax.Array | None) -> None:
    for name, value in arrays.items():
        if value is not None and jnp.size(value) != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {jnp.size(value)}")


def _check_eps(eps: float, training: bool) -> None:
    if isinstance(eps, jax.core.Tracer):
        return  # a traced eps cannot be checked at trace time
    if not is_real(eps):
        raise TypeError(f"eps must be float, not {type(eps).__name__} ({eps!r})")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _broadcast_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    try:
        return jnp.broadcast_to(mask, shape)
    except ValueError as err:
        raise ValueError(
            f"mask of shape {mask.shape} is not broadcastable to the input shape {shape}"
        ) from err


def _groups(groups: Sequence[Sequence[int]] | None) -> tuple[tuple[int, ...], ...] | None:
    return None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)


def _num_devices(axis_name, groups) -> int:
    if axis_name is None:
        return 1
    if groups is not None:
        return len(groups[0])
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as err:
        raise NameError(
            f"batch norm syncs over axis_name={axis_name!r} in training, but no mapped axis of "
            "that name is bound here: run training inside jax.pmap / jax.shard_map / "
            "jax.vmap with that axis_name (eval and init need none)"
        ) from err


def _output_dtype(dtype) -> jnp.dtype:
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(d) for d in shape)


def _as_stat(value, shape, dtype) -> jax.Array | None:
    return None if value is None else jnp.reshape(value, shape).astype(dtype)


def _affine(xhat, weight, bias, stat_shape, mask, out_dtype) -> jax.Array:
    y = xhat
    if weight is not None:
        y = y * jnp.reshape(weight, stat_shape).astype(xhat.dtype)
    if bias is not None:
        y = y + jnp.reshape(bias, stat_shape).astype(xhat.dtype)
    if mask is not None:
        y = jnp.where(mask, y, 0)
    return y.astype(out_dtype)
