"""Stable per-channel moments, optionally masked and merged across devices.

Every normalization in jaxbn reduces to one question: over a set of elements (the reduction
axes, a mask, and possibly the devices of a mapped axis), what are the count, the mean and the
sum of squared deviations (M2)? This module answers it without cancellation:

* locally two passes — mean first, then Σ(x-mean)² — so ``randn + 1e4`` in float32 has var ≈ 1;
* across devices Chan's parallel merge of (count, mean, M2) — exact for uneven shards and
  empty devices — using a single ``all_gather`` of a ``[3, ...]`` array.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

AxisIndexGroups = tuple[tuple[int, ...], ...] | None


def local_moments(
    x: jax.Array, mask: jax.Array | None, reduce_axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Count, mean and M2 of ``x`` over ``reduce_axes`` (kept as size-1 dims).

    Args:
      x: [...] floating array (float32 or float64).
      mask: None or a boolean array of ``x.shape``; False elements are ignored, even NaN.
      reduce_axes: axes to reduce over.

    Returns:
      ``(count, mean, m2)``, each of ``x.shape`` with ``reduce_axes`` set to 1. ``count`` is
      float; the mean of an empty set is 0 and its M2 is 0.
    """
    if mask is None:
        n = float(np.prod([x.shape[a] for a in reduce_axes], dtype=np.int64))
        count = jnp.full(_kept_shape(x.shape, reduce_axes), n, x.dtype)
        mean = jnp.sum(x, reduce_axes, keepdims=True) / max(n, 1.0)
        m2 = jnp.sum(jnp.square(x - mean), reduce_axes, keepdims=True)
        return count, mean, m2
    count = jnp.sum(mask, reduce_axes, keepdims=True, dtype=x.dtype)
    # where, not multiply: a masked NaN times zero is still NaN.
    mean = jnp.sum(jnp.where(mask, x, 0), reduce_axes, keepdims=True) / jnp.maximum(count, 1)
    m2 = jnp.sum(jnp.where(mask, jnp.square(x - mean), 0), reduce_axes, keepdims=True)
    return count, mean, m2


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
    stacked = jnp.stack([count, mean, m2])
    if axis_index_groups is None:
        # Invariant result: shard_map can then return the merged statistics replicated.
        gathered = jax.lax.all_gather(stacked, axis_name, to="invarying")
    else:
        gathered = jax.lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups)
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = jnp.sum(counts, axis=0)
    merged_mean = jnp.sum(counts * means, axis=0) / jnp.maximum(total, 1)
    merged_m2 = jnp.sum(m2s + counts * jnp.square(means - merged_mean), axis=0)
    return total, merged_mean, merged_m2


def moments(
    x: jax.Array,
    mask: jax.Array | None,
    reduce_axes: tuple[int, ...],
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: AxisIndexGroups = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Count, mean and M2 over ``reduce_axes`` and, with ``axis_name``, over the devices."""
    count, mean, m2 = local_moments(x, mask, reduce_axes)
    if axis_name is not None:
        count, mean, m2 = merge_moments(count, mean, m2, axis_name, axis_index_groups)
    return count, mean, m2


def _kept_shape(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in reduce_axes else d for i, d in enumerate(shape))
