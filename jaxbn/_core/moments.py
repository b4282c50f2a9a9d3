"""Stable per-channel moments, optionally masked and merged across devices.

Every normalization in jaxbn reduces to one question: over a set of elements (the reduction
axes, a mask, and possibly the devices of a mapped axis), what are the count, the mean and the
sum of squared deviations (M2)? This module answers it without cancellation:

* locally (masked inputs, GroupNorm, LayerNorm) two passes — mean first, then Σ(x-mean)² — so
  ``randn + 1e4`` in float32 has var ≈ 1 (the centered array is returned too: normalization and
  its derivative reuse it). Unmasked batch norm takes its local moments from
  :func:`jaxbn._cpu_kernels.channel_moments` instead (one shifted pass on the CPU);
* across devices Chan's parallel merge of (count, mean, M2) — exact for uneven shards and
  empty devices — using a single ``all_gather`` of a ``[3, ...]`` array.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxbn._core.shapes import kept_shape, reduced_count, varying_axes

AxisIndexGroups = tuple[tuple[int, ...], ...] | None


def merge_moments(
    count: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    axis_name: str | Sequence[str],
    axis_index_groups: AxisIndexGroups = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chan's parallel merge of per-device ``(count, mean, m2)`` over a mapped axis.

    One collective: the three arrays are stacked and all-gathered together. Devices with a
    count of zero contribute nothing.
    """
    names = {axis_name} if isinstance(axis_name, str) else set(axis_name)
    if len(names) > 1 and axis_index_groups is None:
        # all_gather over several vmap axes is refused by JAX; psum takes any set of axes.
        return _merge_by_sums(count, mean, m2, tuple(names))
    stacked = jnp.stack([count, mean, m2])
    if axis_index_groups is None and names <= varying_axes(stacked):
        # Under shard_map an invariant result lets it return the merged statistics
        # replicated; vmap and pmap track no varying axes (and refuse the conversion).
        gathered = jax.lax.all_gather(stacked, axis_name, to="invarying")
    else:
        gathered = jax.lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = jnp.sum(counts, axis=0)
    merged_mean = jnp.sum(counts * means, axis=0) / jnp.maximum(total, 1)
    merged_m2 = jnp.sum(m2s + counts * jnp.square(means - merged_mean), axis=0)
    return total, merged_mean, merged_m2


def _merge_by_sums(count, mean, m2, axis_names):
    """Chan's merge with two psums: the global mean first, then each device's M2 around it
    (stable: no E[x²] − E[x]² between devices)."""
    total = jax.lax.psum(count, axis_names)
    merged_mean = jax.lax.psum(count * mean, axis_names) / jnp.maximum(total, 1)
    merged_m2 = jax.lax.psum(m2 + count * jnp.square(mean - merged_mean), axis_names)
    return total, merged_mean, merged_m2


def centered_moments(
    x: jax.Array,
    mask: jax.Array | None,
    reduce_axes: tuple[int, ...],
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: AxisIndexGroups = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(count, mean, biased var, x − mean)``; the centered array is 0 where masked.

    The centered array is what the variance is computed from (two-pass), so callers that also
    need it (the normalization itself, its derivative) get it without another pass. Synced
    over ``axis_name``, it is centered on the global mean.
    """
    count, mean, m2, centered = two_pass_moments(x, mask, reduce_axes)
    if axis_name is not None:
        count, mean, m2 = merge_moments(count, mean, m2, axis_name, axis_index_groups)
        centered = center(x, mean, mask)
    return count, mean, m2 / jnp.maximum(count, 1), centered


def center(x: jax.Array, mean: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x − mean``, 0 where ``mask`` is False."""
    centered = x - mean
    # where, not multiply: a masked NaN times zero is still NaN.
    return centered if mask is None else jnp.where(mask, centered, 0)


SHIFT_SAMPLE = 32  # values per channel whose mean is the shift (as the CPU kernel)


def shifted_moments(x: jax.Array, reduce_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(mean, M2)`` of an unmasked ``x`` (compute dtype) in one pass over the data.

    Σ(x − s) and Σ(x − s)² around a per-channel shift ``s`` are sibling reductions that XLA
    fuses into one read of ``x`` (the two-pass form reads it twice: the second sum needs the
    mean). ``s`` is the mean of the first finite values along the first reduced axis, so it
    lies near the data; M2 = Σ(x − s)² − (Σ(x − s))²/n then loses digits only in proportion to
    ((mean − s)/σ)². Where a channel's shift lands more than 3σ from its mean (pathological
    data), M2 is taken again around the mean (a second pass, only then: ``lax.cond``).
    """
    n = reduced_count(x.shape, reduce_axes)
    first = reduce_axes[0]
    sample = jax.lax.slice_in_dim(x, 0, min(SHIFT_SAMPLE, x.shape[first]), axis=first)
    rest = tuple(a for a in reduce_axes if a != first)
    sample = jax.lax.slice(
        sample, (0,) * x.ndim, tuple(1 if a in rest else d for a, d in enumerate(sample.shape))
    )
    finite = jnp.isfinite(sample)
    shift = jnp.sum(jnp.where(finite, sample, 0), reduce_axes, keepdims=True) / jnp.maximum(
        jnp.sum(finite, reduce_axes, keepdims=True, dtype=x.dtype), 1
    )
    shift = jax.lax.stop_gradient(shift)
    centered = x - shift
    s1 = jnp.sum(centered, reduce_axes, keepdims=True)
    s2 = jnp.sum(jnp.square(centered), reduce_axes, keepdims=True)
    offset = s1 / max(n, 1)
    mean = shift + offset
    m2 = jnp.maximum(s2 - s1 * offset, 0)
    far = jnp.any(jnp.square(offset) * n > 9 * m2)  # |mean − shift| > 3σ somewhere

    def around_the_mean(m2):
        return jnp.sum(jnp.square(x - mean), reduce_axes, keepdims=True)

    return mean, jax.lax.cond(far, around_the_mean, lambda m2: m2, m2)


def two_pass_moments(
    x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Local ``(count, mean, M2, x − mean)``: the mean first, then Σ(x − mean)², which does
    not cancel the way Σx² − n·mean² does. ``x`` in the compute dtype; 0 where masked."""
    if mask is None:
        n = float(reduced_count(x.shape, reduce_axes))
        count = jnp.full(kept_shape(x.shape, reduce_axes), n, x.dtype)
        mean = jnp.sum(x, reduce_axes, keepdims=True) / max(n, 1.0)
    else:
        count = jnp.sum(mask, reduce_axes, keepdims=True, dtype=x.dtype)
        total = jnp.sum(jnp.where(mask, x, 0), reduce_axes, keepdims=True)
        mean = total / jnp.maximum(count, 1)
    centered = center(x, mean, mask)
    return count, mean, jnp.sum(jnp.square(centered), reduce_axes, keepdims=True), centered
