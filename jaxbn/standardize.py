"""``standardize``: x̂ = (x - mean) / sqrt(var + eps) over some axes, with a hand-written JVP.

This is the one differentiable kernel behind batch, group and layer norm. Differentiating the
textbook formula makes XLA walk the activations many times; the closed form below needs two
per-channel reductions of the tangent (Σdx and Σx̂·dx) and one elementwise pass:

    dx̂ = rstd · (dx − mean(dx) − x̂ · mean(x̂·dx))

The rule is a JVP (not a VJP) so forward mode (``jax.jvp``, ``jax.jacfwd``) works, and reverse
mode comes from JAX transposing it — which yields exactly the classic batch-norm backward
``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``. The rule is made of ordinary JAX ops, so it can
be differentiated again (``grad`` of ``grad``).

Across devices (``axis_name``) the statistics are merged with one all-gather and the two tangent
reductions are summed with one ``psum`` — in reverse mode that is PyTorch SyncBatchNorm's
all-reduce of Σdy and Σdy·x̂.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxbn.moments import AxisIndexGroups, moments

StandardizeOut = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def standardize(
    x: jax.Array,
    mask: jax.Array | None,
    reduce_axes: tuple[int, ...],
    eps: float,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: AxisIndexGroups = None,
) -> StandardizeOut:
    """Standardizes ``x`` over ``reduce_axes`` (and the devices of ``axis_name``).

    Args:
      x: [...] float32/float64 array.
      mask: None or boolean array of ``x.shape``; False elements are excluded from the
        statistics and get x̂ = 0 (whatever they hold, NaN included).
      reduce_axes: the axes the statistics are taken over.
      eps: added to the biased variance.
      axis_name: mapped axis (pmap / shard_map) to merge statistics over, or None.
      axis_index_groups: optional device groups for ``axis_name`` (pmap only).

    Returns:
      ``(x̂, count, mean, var)``: x̂ has ``x.shape``; the others have ``x.shape`` with
      ``reduce_axes`` set to 1; ``var`` is the biased variance (M2 / count).
    """
    count, mean, m2 = moments(x, mask, reduce_axes, axis_name, axis_index_groups)
    var = m2 / jnp.maximum(count, 1)
    xhat = (x - mean) * jax.lax.rsqrt(var + eps)
    if mask is not None:
        xhat = jnp.where(mask, xhat, 0)
    return xhat, count, mean, var


@standardize.defjvp
def _standardize_jvp(reduce_axes, eps, axis_name, axis_index_groups, primals, tangents):
    x, mask = primals
    dx = tangents[0]
    xhat, count, mean, var = standardize(x, mask, reduce_axes, eps, axis_name, axis_index_groups)
    rstd = jax.lax.rsqrt(var + eps)
    if mask is not None:
        dx = jnp.where(mask, dx, 0)
    sums = jnp.stack(
        [
            jnp.sum(dx, reduce_axes, keepdims=True),
            jnp.sum(xhat * dx, reduce_axes, keepdims=True),
        ]
    )
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
    n = jnp.maximum(count, 1)
    dmean, proj = sums[0] / n, sums[1] / n
    dxhat = rstd * (dx - dmean - xhat * proj)
    if mask is not None:
        dxhat = jnp.where(mask, dxhat, 0)
    # d var = (2/n) Σ (x - mean) dx = 2 · proj / rstd
    dvar = 2 * proj / rstd
    return (xhat, count, mean, var), (dxhat, jnp.zeros_like(count), dmean, dvar)
