"""Pure-function normalizations with PyTorch's semantics: batch, group and layer norm.

Each function validates shapes at trace time (shapes are static in JAX) with PyTorch's error
wording, computes in float32 (float64 stays float64), returns the input's dtype, and
differentiates through the private core's (``jaxbn._core.normalize``) hand-written rule.

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
    check_clipping,
    check_floating_input,
    check_momentum,
    check_running_stat,
    is_real,
    train_flag,
)
from jaxbn._core.normalize import normalize
from jaxbn._core.running import BatchMoments, update_running
from jaxbn._core.shapes import as_shape, compute_dtype, feature_axis

__all__ = [
    "BatchMoments",
    "batch_norm",
    "batch_norm_with_moments",
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "layer_norm",
]


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
      ValueError: one value per channel in training ("Expected more than 1 value per channel
        when training, got input size ..."), ``eps`` ≤ 0 in training, only one of the two
        running statistics given, a bad ``axis`` or ``mask`` shape.
      RuntimeError: eval without running statistics ("running_mean must be defined in
        evaluation mode"), statistics or parameters of the wrong size ("running_mean should
        contain 5 elements not 3").
      TypeError: a non-float ``eps``, a non-boolean ``mask``, an integer input.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(8.0).reshape(4, 2)                           # [N, C]
        >>> y, rm, rv = F.batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True)
        >>> print(np.asarray(rv).round(4))         # 0.9·1 + 0.1·(unbiased var 20/3)
        [1.5667 1.5667]
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

    Args:
      x: [N, ..., C] with the feature axis at ``axis`` (as :func:`batch_norm`).
      running_mean: [C] or None (no tracking: then ``training`` must be True).
      running_var: [C] or None, together with ``running_mean``.
      weight: [C] scale γ, or None for ones.
      bias: [C] shift β, or None for zeros.
      training: use (and report) the batch statistics and update the running ones.
      momentum: weight of the new batch in the running average (PyTorch's meaning).
      eps: added to the variance.
      check_count: False lets a single value per channel through (module initialization,
        whose statistics are never kept).
      **kw: :func:`batch_norm`'s keyword-only arguments (``axis``, ``axis_name``,
        ``axis_index_groups``, ``mask``).

    Returns:
      ``(y, new_running_mean, new_running_var, moments)``: the first three as
      :func:`batch_norm` returns them; ``moments`` a :class:`BatchMoments` (``count``,
      ``mean`` and biased ``var``, each [C], merged over ``axis_name``) in training, None in
      eval.

    Raises:
      ValueError: one value per channel in training with ``check_count=True`` ("Expected
        more than 1 value per channel when training, got input size (1, 2)"), and the other
        errors of :func:`batch_norm`.
      RuntimeError: eval without running statistics ("running_mean must be defined in
        evaluation mode"), statistics of the wrong size ("running_mean should contain 2
        elements not 3").
      TypeError: a keyword that :func:`batch_norm` does not take ("_batch_norm_options() got
        an unexpected keyword argument 'foo'"), and the type errors of :func:`batch_norm`.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(8.0).reshape(4, 2)                           # [N, C]
        >>> y, rm, rv, moments = F.batch_norm_with_moments(
        ...     x, jnp.zeros(2), jnp.ones(2), None, None, True, 0.1, 1e-5
        ... )
        >>> moments
        BatchMoments(count=Array([4., 4.], dtype=float32), mean=Array([3., 4.], dtype=float32),
                     var=Array([5., 5.], dtype=float32))
        >>> print(F.batch_norm_with_moments(x, rm, rv, None, None, False, 0.1, 1e-5)[3])
        None
    """
    axis, axis_name, axis_index_groups, mask = _batch_norm_options(**kw)
    x = jnp.asarray(x)
    check_floating_input(x, "batch_norm")
    training = train_flag(training, "training")
    ax = feature_axis(axis, x.ndim)
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
    if not reduce_axes:
        # A [C] input: one example (Equinox's per-example call inside a named jax.vmap, whose
        # members are the batch). The core reduces over at least one axis: give it [1, C].
        y, new_mean, new_var, moments = batch_norm_with_moments(
            x[None],
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            check_count=False,
            axis=-1,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            mask=None if mask is None else mask[None],
        )
        return y[0], new_mean, new_var, moments
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

    Raises:
      ValueError: ``num_groups`` does not divide C ("num_channels (6) must be divisible by
        num_groups (4)"), one value per group, or ``axis`` 0 (the batch axis).
      RuntimeError: fewer than 2 dims, or ``weight``/``bias`` not of size C.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(8.0).reshape(1, 2, 4)                        # [N, L, C]
        >>> print(np.asarray(F.group_norm(x, num_groups=2)).round(2))   # groups {0,1}, {2,3}
        [[[-1.21 -0.73 -1.21 -0.73]
          [ 0.73  1.21  0.73  1.21]]]
    """
    x = jnp.asarray(x)
    check_floating_input(x, "group_norm")
    if x.ndim < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {x.ndim}")
    ax = feature_axis(axis, x.ndim)
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
      x: ``[*, *normalized_shape]``.
      normalized_shape: the trailing shape to normalize over.
      weight: normalized_shape-shaped scale or None. bias: same, shift or None.
      eps: added to the (biased) variance.

    Returns:
      y: like ``x``, in ``x``'s dtype.

    Raises:
      RuntimeError: trailing dims of ``x`` other than ``normalized_shape`` (``Given
        normalized_shape=[3], expected input with shape [*, 3], but got input of size[2, 4]``),
        or ``weight``/``bias`` not shaped ``normalized_shape``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(6.0).reshape(2, 3)                           # [N, D]
        >>> print(np.asarray(F.layer_norm(x, 3)).round(2))
        [[-1.22  0.    1.22]
         [-1.22  0.    1.22]]
    """
    x = jnp.asarray(x)
    check_floating_input(x, "layer_norm")
    shape = as_shape(normalized_shape)
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


# --- variants: batch renormalization, ghost batch norm -------------------------------------


def batch_renorm(
    x: jax.Array,
    running_mean: jax.Array,
    running_var: jax.Array,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    training: bool = False,
    momentum: float | jax.Array = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float | jax.Array = 3.0,
    d_max: float | jax.Array = 5.0,
    axis: int = -1,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    update_rule: str = "torch",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch Renormalization (Ioffe 2017): batch norm whose training output is corrected
    towards the running statistics, so that training and eval compute the same function.

    With the running ``σ = sqrt(running_var + eps)`` and the batch's ``μ_B``,
    ``σ_B = sqrt(σ²_B + eps)`` (biased variance), in training::

        r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
        d = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max))
        y = x̂ · (weight · r) + (weight · d + bias)          x̂ = (x − μ_B) / σ_B

    ``x̂`` and the batch moments come from :func:`batch_norm_with_moments` (the same core and
    derivative as :func:`batch_norm`; gradients flow through ``μ_B`` and ``σ_B`` but not
    through ``r``, ``d``). In eval ``y = (x − μ)/σ · weight + bias``: :func:`batch_norm` in eval.
    ``r_max=1, d_max=0`` is :func:`batch_norm` exactly (the paper's warm-up).

    Running statistics (``update_rule``):
      * ``"torch"`` (default): :func:`batch_norm`'s update, ``mean ← (1−m)·mean + m·μ_B``,
        ``var ← (1−m)·var + m·σ²_B·n/(n−1)``; the paper's single pair (μ, σ) serves both the
        correction and eval, and the variables are a ``BatchNorm``'s.
      * ``"keras"``: Keras 3's ``BatchNormalization(renorm=True)`` — the mean as above, the
        **standard deviation** ``sqrt(var + eps)`` averaged with the biased ``σ_B``, stored as
        ``var = max(std² − eps, 0)`` (Keras's ``moving_variance``). With
        ``renorm_momentum == momentum`` (Keras's default) Keras's ``renorm_mean/renorm_stddev``
        equal its ``moving_mean/moving_stddev``, so this one pair reproduces all four.

    Keras's spelling → this: ``momentum_keras = 1 − momentum``, ``epsilon`` (1e-3) = ``eps``,
    ``renorm_clipping={"rmax": R, "rmin": 1/R, "dmax": D}`` = ``r_max=R, d_max=D``
    (``float("inf")`` for a missing key), ``moving_mean/moving_variance`` = ``running_mean/var``.

    Args:
      x: [N, ..., C] with the feature axis at ``axis``.
      running_mean, running_var: [C] (required: ``r`` and ``d`` compare the batch with them).
      weight, bias: [C] or None (ones / zeros).
      training: correct the batch statistics and update the running ones.
      momentum: weight of the new batch (PyTorch's meaning); may be a traced scalar.
      eps: added to both variances.
      r_max: ``r`` is clipped to ``[1/r_max, r_max]``; ≥ 1, may be a traced scalar (schedules).
      d_max: ``d`` is clipped to ``[−d_max, d_max]``; ≥ 0, may be a traced scalar.
      axis, axis_name, axis_index_groups, mask: as in :func:`batch_norm`; with ``axis_name``
        the batch moments, hence ``r`` and ``d``, are global (identical on every device).
      update_rule: ``"torch"`` or ``"keras"`` (see above).

    Returns:
      ``(y, new_running_mean, new_running_var)``, ``y`` like ``x`` in ``x``'s dtype.

    Raises:
      ValueError: running statistics not given (they are required), an ``update_rule`` other
        than ``"torch"``/``"keras"``, or any of :func:`batch_norm`'s cases.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(8.0).reshape(4, 2)                           # [N, C]
        >>> y, rm, rv = F.batch_renorm(
        ...     x, jnp.zeros(2), jnp.ones(2), training=True, r_max=3.0, d_max=5.0)
        >>> rm                                                   # batch_norm's update
        Array([0.3, 0.4], dtype=float32)
        >>> print(np.asarray(y[:, 0]).round(2))      # r, d unclipped: eval's (x − 0) / 1
        [0. 2. 4. 6.]
    """
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm needs running_mean and running_var: r and d compare the batch "
            "statistics with them"
        )
    if update_rule not in ("torch", "keras"):
        raise ValueError(f"update_rule must be 'torch' or 'keras', got {update_rule!r}")
    check_clipping(r_max, d_max)
    options = {"axis": axis, "mask": mask}
    x = jnp.asarray(x)
    if not train_flag(training, "training"):
        y, _, _, _ = batch_norm_with_moments(
            x, running_mean, running_var, weight, bias, False, momentum, eps, **options
        )
        return y, running_mean, running_var
    check_floating_input(x, "batch_renorm")
    ax = feature_axis(axis, x.ndim)
    _check_numel(x.shape[ax], weight=weight, bias=bias)
    # x̂ in float32: a half-precision x̂ would be rounded before the correction is applied.
    dtype = compute_dtype(x.dtype)
    xhat, new_mean, new_var, moments = batch_norm_with_moments(
        x.astype(dtype) if x.dtype != dtype else x,
        running_mean,
        running_var,
        None,
        None,
        True,
        momentum,
        eps,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
    )
    _, mu_b, var_b = (jax.lax.stop_gradient(a) for a in moments)
    sigma = jnp.sqrt(running_var.astype(dtype) + eps)
    r = jnp.clip(jnp.sqrt(var_b + eps) / sigma, 1 / r_max, r_max)
    d = jnp.clip((mu_b - running_mean.astype(dtype)) / sigma, -d_max, d_max)
    r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
    gamma = r if weight is None else jnp.reshape(weight, r.shape).astype(dtype) * r
    beta = d if weight is None else jnp.reshape(weight, d.shape).astype(dtype) * d
    if bias is not None:
        beta = beta + jnp.reshape(bias, d.shape).astype(dtype)
    stat_shape = tuple(x.shape[ax] if i == ax else 1 for i in range(x.ndim))
    y = _affine(xhat, gamma, beta, stat_shape, _broadcast_mask(mask, x.shape), dtype)
    if update_rule == "keras":
        new_mean, new_var = _keras_running(running_mean, running_var, moments, momentum, eps)
    return y.astype(_output_dtype(x.dtype)), new_mean, new_var


def ghost_batch_norm(
    x: jax.Array,
    running_mean: jax.Array | None,
    running_var: jax.Array | None,
    *,
    virtual_batch_size: int,
    training: bool = False,
    momentum: float | jax.Array = 0.1,
    eps: float = 1e-5,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    axis: int = -1,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Ghost (virtual) batch norm (Hoffer et al. 2017): :func:`batch_norm` on each run of
    ``virtual_batch_size`` examples of the batch (axis 0) in turn, outputs concatenated.
    ``x`` and the running statistics go by position, everything else by keyword (there is no
    PyTorch function whose argument order to mirror).

    In training each virtual batch is normalized with its own mean and biased variance, and the
    running statistics are updated once per virtual batch, in order — exactly what
    ``torch.cat([bn(s) for s in x.split(virtual_batch_size)])`` does to ``bn``'s buffers. In
    eval the running statistics are used and the batch may have any size (as
    :func:`batch_norm`). Without running statistics eval also splits, like torch would.
    Statistics never cross devices: there is no ``axis_name``.

    Args:
      x: [N, ..., C], the batch on axis 0, the features at ``axis`` (not 0).
      running_mean, running_var: [C] or None.
      weight, bias: [C] or None.
      training: batch statistics per virtual batch, running statistics updated.
      momentum: the new batch's weight, the same for every virtual batch (a scalar), or one
        per virtual batch (shape [N / virtual_batch_size]; e.g. ``1/(n + k)`` for the
        cumulative average).
      eps: added to the variance.
      virtual_batch_size: examples per virtual batch; must divide N where batch statistics
        are used.
      axis: the feature axis. mask: as in :func:`batch_norm`.

    Returns:
      ``(y, new_running_mean, new_running_var)``.

    Raises:
      ValueError: a ``virtual_batch_size`` < 1 or one that does not divide N where batch
        statistics are used, a per-batch ``momentum`` of the wrong length, ``axis`` 0, or any
        of :func:`batch_norm`'s cases.
      TypeError: a ``virtual_batch_size`` that is not an int.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(16.0).reshape(8, 2)                          # [N, C]
        >>> y, rm, rv = F.ghost_batch_norm(
        ...     x, jnp.zeros(2), jnp.ones(2), training=True, virtual_batch_size=4)
        >>> print(np.asarray(y[:, 0]).round(2))     # each run of 4 normalized on its own
        [-1.34 -0.45  0.45  1.34 -1.34 -0.45  0.45  1.34]
    """
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int | np.integer):
        raise TypeError(
            f"virtual_batch_size must be an int, not {type(virtual_batch_size).__name__} "
            f"({virtual_batch_size!r})"
        )
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")
    x = jnp.asarray(x)
    training = train_flag(training, "training")
    if not training and running_mean is not None:
        return batch_norm(
            x, running_mean, running_var, weight, bias, False, momentum, eps, axis=axis, mask=mask
        )
    if x.ndim < 2 or feature_axis(axis, x.ndim) == 0:
        raise ValueError(
            f"ghost_batch_norm splits the batch on axis 0, which must not be the feature axis "
            f"(axis={axis}, input of shape {tuple(x.shape)})"
        )
    n = x.shape[0]
    if n % virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} does not divide the batch of {n} "
            f"examples (input of shape {tuple(x.shape)}); pass a batch size that is a multiple "
            "of it (e.g. drop the last partial batch)"
        )
    splits = n // virtual_batch_size
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked: use "
            "jaxbn GhostBatchNorm, or pass one momentum per virtual batch, 1/(n + k)"
        )
    per_split = jnp.shape(momentum) != ()
    if per_split and jnp.shape(momentum) != (splits,):
        raise ValueError(
            f"momentum of shape {jnp.shape(momentum)} given for {splits} virtual batches: "
            f"pass a scalar or one value per virtual batch ({splits},)"
        )
    if running_mean is not None and not per_split and not isinstance(momentum, jax.Array):
        check_momentum(momentum)
    grouped = x.reshape(splits, virtual_batch_size, *x.shape[1:])
    masks = _broadcast_mask(mask, x.shape)
    masks = None if masks is None else masks.reshape(grouped.shape)

    def one(xs, ms):
        y, _, _, moments = batch_norm_with_moments(
            xs, None, None, weight, bias, True, 0.0, eps, axis=axis, mask=ms
        )
        return y, moments

    ys, moments = jax.vmap(one, in_axes=(0, None if masks is None else 0))(grouped, masks)
    y = ys.reshape(x.shape)
    if running_mean is None or not training:
        return y, running_mean, running_var
    _check_numel(x.shape[axis], running_mean=running_mean, running_var=running_var)
    check_running_stat(running_mean, "running_mean", x.shape[axis])
    check_running_stat(running_var, "running_var", x.shape[axis])
    factors = jnp.broadcast_to(jnp.asarray(momentum), (splits,))

    def update(stats, step):
        split_moments, factor = step
        return update_running(*stats, split_moments, factor), None

    (new_mean, new_var), _ = jax.lax.scan(update, (running_mean, running_var), (moments, factors))
    return y, new_mean, new_var


def _keras_running(running_mean, running_var, moments, momentum, eps):
    """Keras 3's renorm update on (mean, var): the standard deviation is what is averaged."""
    count, mean, var = (jax.lax.stop_gradient(a) for a in moments)
    dtype = mean.dtype
    std = (1 - momentum) * jnp.sqrt(running_var.astype(dtype) + eps) + momentum * jnp.sqrt(
        var + eps
    )
    new_var = jnp.maximum(std * std - eps, 0)
    new_mean = (1 - momentum) * running_mean.astype(dtype) + momentum * mean
    new_mean = jnp.where(count > 0, new_mean, running_mean).astype(running_mean.dtype)
    new_var = jnp.where(count > 0, new_var, running_var).astype(running_var.dtype)
    return new_mean, new_var
