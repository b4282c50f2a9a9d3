"""``normalize``: y = (x - mean) / sqrt(var + eps) · weight + bias over some axes, with a
hand-written JVP. The one differentiable kernel behind batch, group and layer norm.

Differentiating the textbook formula makes XLA walk the activations many times and keep
intermediates alive. The closed form needs two per-channel reductions of the tangent
(Σdx and Σx̂·dx) and one elementwise pass:

    dx̂ = rstd · (dx − mean(dx) − x̂ · mean(x̂·dx))
    dy  = weight · dx̂ + x̂ · dweight + dbias

The rule is a JVP (not a VJP), so forward mode (``jax.jvp``, ``jax.jacfwd``) works, and reverse
mode comes from JAX transposing it — which gives exactly the classic batch-norm backward
(``dbias = Σg``, ``dweight = Σg·x̂``, ``dx = weight·rstd·(g − mean(g) − x̂·mean(g·x̂))``). It is
made of ordinary JAX ops, so it can be differentiated again (``grad`` of ``grad``).

Memory traffic is the cost of batch norm. The forward computes the centered input
``x − mean`` once (the two-pass variance needs it) and derives both the output and the saved
state from it: the backward reads only the cotangent and that centered array — Σg, Σg·(x−mean)
and one elementwise pass for ``dx`` — and ``x`` itself need not be kept.

Across devices (``axis_name``) the statistics are merged with one all-gather (see
:mod:`jaxbn.moments`) and the two tangent reductions are summed with one ``psum`` — in reverse
mode that is PyTorch SyncBatchNorm's all-reduce of Σdy and Σdy·x̂.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxbn.moments import AxisIndexGroups, centered_moments

NormalizeOut = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def normalize(
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    reduce_axes: tuple[int, ...],
    eps: float,
    axis_name: str | Sequence[str] | None = None,
    axis_index_groups: AxisIndexGroups = None,
) -> NormalizeOut:
    """Normalizes ``x`` over ``reduce_axes`` (and the devices of ``axis_name``), then scales.

    Args:
      x: [...] float32/float64 array.
      weight, bias: None or arrays broadcastable against ``x`` (e.g. [1, ..., C]).
      mask: None or boolean array of ``x.shape``; False elements are left out of the
        statistics and get y = 0 (whatever they hold, NaN included).
      reduce_axes: the axes the statistics are taken over.
      eps: added to the biased variance.
      axis_name: mapped axis (pmap / shard_map) to merge statistics over, or None.
      axis_index_groups: optional device groups for ``axis_name`` (pmap only).

    Returns:
      ``(y, count, mean, var)``: y has ``x.shape``; the others have ``x.shape`` with
      ``reduce_axes`` set to 1; ``var`` is the biased variance (M2 / count).
    """
    count, mean, var, centered = centered_moments(
        x, mask, reduce_axes, axis_name, axis_index_groups
    )
    rstd = jax.lax.rsqrt(var + eps)
    return _output(centered, rstd, weight, bias, mask), count, mean, var


def _output(centered, rstd, weight, bias, mask):
    scale = rstd if weight is None else rstd * weight
    y = centered * scale
    y = y if bias is None else y + bias
    return y if mask is None else jnp.where(mask, y, 0)


@functools.partial(normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(reduce_axes, eps, axis_name, axis_index_groups, primals, tangents):
    x, weight, bias, mask = primals
    dx, dweight, dbias, _ = tangents
    count, mean, var, centered = centered_moments(
        x, mask, reduce_axes, axis_name, axis_index_groups
    )
    rstd = jax.lax.rsqrt(var + eps)
    y = _output(centered, rstd, weight, bias, mask)
    n = jnp.maximum(count, 1)
    # dy = dx·a + centered·B + C with per-channel a, B, C. Written this way, the transpose (the
    # backward pass) needs only Σg and Σg·centered — reductions of arrays that exist anyway —
    # and one elementwise pass for dx.
    a = rstd if weight is None else rstd * weight
    per_channel = jnp.zeros_like(mean)
    B, C = per_channel, per_channel
    dy = jnp.zeros_like(x)
    dmean = dvar = per_channel
    if not isinstance(dx, SymbolicZero):
        if mask is not None:
            dx = jnp.where(mask, dx, 0)
        sums = (
            jnp.sum(dx, reduce_axes, keepdims=True),
            jnp.sum(centered * dx, reduce_axes, keepdims=True),
        )
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
        dmean, proj = sums[0] / n, sums[1] / n  # proj = mean((x - mean) · dx)
        dy = dx * a
        B = B - proj * rstd * rstd * a
        C = C - dmean * a
        dvar = 2 * proj
    if weight is not None and not isinstance(dweight, SymbolicZero):
        B = B + rstd * dweight
    if bias is not None and not isinstance(dbias, SymbolicZero):
        C = C + dbias
    dy = dy + centered * B + C
    if mask is not None:
        dy = jnp.where(mask, dy, 0)
    return (y, count, mean, var), (dy, jnp.zeros_like(count), dmean, dvar)
