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
made of JAX ops and primitives that have JVPs of their own, so it can be differentiated again
(``grad`` of ``grad``).

Memory traffic is the cost of batch norm. On the common path (per-channel weight and bias, no
mask) the statistics and the tangent reductions are :mod:`jaxbn._cpu_kernels` primitives: the
forward reads ``x`` once for the moments (one pass, native kernel on the CPU) and once for the
output; the backward reads the cotangent and ``x`` once for Σg and Σg·(x − mean) together, and
once more for the elementwise ``dx``. Nothing but ``x`` is kept for the backward. Masked
inputs, and GroupNorm/LayerNorm (whose weight spans the reduced axes), share the centered
array ``x − mean`` between the statistics, the output and the derivative instead.

Across devices (``axis_name``) the statistics are merged with one all-gather (see
:mod:`jaxbn._core.moments`) and the two tangent reductions are summed with one ``psum`` — in reverse
mode that is PyTorch SyncBatchNorm's all-reduce of Σdy and Σdy·x̂. The merge runs at the call,
outside the custom JVP, and enters it as an input: JAX may trace the rule after a named ``vmap``
has returned (``jax.checkpoint`` or ``jit`` around it), when only the ``psum`` can still be traced.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxbn._core.moments import AxisIndexGroups, center, centered_moments, merge_moments
from jaxbn._core.shapes import compute_dtype, kept_shape, reduced_count
from jaxbn._cpu_kernels import channel_affine, channel_dot, channel_moments

NormalizeOut = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


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
      x: [...] float16/bfloat16/float32/float64 array. Half precision is read as it is and
        computed in float32 (no float32 copy of ``x`` on the fast path).
      weight, bias: None or arrays broadcastable against ``x`` (e.g. [1, ..., C]), in the
        compute dtype (float32, or float64 for float64 ``x``).
      mask: None or boolean array of ``x.shape``; False elements are left out of the
        statistics and get y = 0 (whatever they hold, NaN included).
      reduce_axes: the axes the statistics are taken over.
      eps: added to the biased variance.
      axis_name: mapped axis (pmap / shard_map / named vmap) to merge statistics over, or None.
      axis_index_groups: optional device groups for ``axis_name`` (pmap only).

    Returns:
      ``(y, count, mean, var)``: y has ``x.shape`` and dtype, rounded once from the compute
      dtype; the others have ``x.shape`` with ``reduce_axes`` set to 1, in the compute dtype;
      ``var`` is the biased variance (M2 / count).
    """
    # The merge over devices happens here, at the call, and not inside the custom JVP rule:
    # JAX traces that rule lazily, when the call is differentiated. Where the call was staged
    # into a jaxpr inside a named jax.vmap (jax.checkpoint or jit around the vmap), that is
    # after the vmap has returned and its axis name is unbound: the merge's all_gather, which
    # needs the axis size, raised "unbound axis name". The rule only psums its two tangent
    # sums, which needs no axis size. Without axis_name the statistics stay inside the rule.
    merged = None
    if axis_name is not None:
        merged = _merged_statistics(
            x, weight, bias, mask, reduce_axes, axis_name, axis_index_groups
        )
    return _normalize(x, weight, bias, mask, merged, reduce_axes, eps, axis_name, axis_index_groups)


def _merged_statistics(x, weight, bias, mask, reduce_axes, axis_name, axis_index_groups):
    """``(count, mean, biased var)`` of ``x`` over ``reduce_axes`` and the devices of
    ``axis_name``, each of ``x.shape`` with ``reduce_axes`` set to 1, in the compute dtype."""
    if not _Statistics.is_fast(x, weight, bias, mask, reduce_axes):
        count, mean, var, _ = centered_moments(
            x.astype(compute_dtype(x.dtype)), mask, reduce_axes, axis_name, axis_index_groups
        )
        return count, mean, var
    mean, m2 = channel_moments(x, reduce_axes)
    count = jnp.full(mean.shape, reduced_count(x.shape, reduce_axes), mean.dtype)
    count, mean, m2 = merge_moments(count, mean, m2, axis_name, axis_index_groups)
    return count, mean, m2 / jnp.maximum(count, 1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8))
def _normalize(x, weight, bias, mask, merged, reduce_axes, eps, axis_name, axis_index_groups):
    """:func:`normalize`, with the statistics merged over ``axis_name`` given as ``merged``
    (``(count, mean, var)`` from :func:`_merged_statistics`), or None to take them here.

    The rule ignores ``merged``'s tangents: it derives the statistics' tangents from ``dx``
    (closed form, one psum). Higher derivatives still see the statistics as functions of
    ``x``: JAX differentiates the rule's body, where ``merged`` carries the derivative of
    :func:`_merged_statistics`.
    """
    del axis_name, axis_index_groups  # used by the rule: the statistics are merged already
    stats = _Statistics.of(x, weight, bias, mask, reduce_axes, merged)
    rstd = jax.lax.rsqrt(stats.var + eps)
    scale = rstd if weight is None else rstd * weight
    y = stats.affine(scale, jnp.zeros_like(stats.mean) if bias is None else bias)
    return y, stats.count, stats.mean, stats.var


class _Statistics(NamedTuple):
    """The statistics of ``x``, and the two ways ``x − mean`` enters the output and tangent.

    ``centered`` is None on the fast path (no mask, per-channel weight and bias): the
    :mod:`jaxbn._cpu_kernels` primitives then read ``x`` itself. Otherwise it is the masked
    ``x − mean`` in the compute dtype, shared by everything that needs it.
    """

    x: jax.Array
    mask: jax.Array | None
    reduce_axes: tuple[int, ...]
    count: jax.Array
    mean: jax.Array
    var: jax.Array
    centered: jax.Array | None

    @staticmethod
    def is_fast(x, weight, bias, mask, reduce_axes) -> bool:
        """No mask, and weight and bias per channel: the kernels' path."""
        kept = kept_shape(x.shape, reduce_axes)
        per_channel = all(p is None or tuple(p.shape) == kept for p in (weight, bias))
        return mask is None and per_channel

    @classmethod
    def of(cls, x, weight, bias, mask, reduce_axes, merged):
        """Local statistics, or ``merged`` ones (then only ``x − mean`` is computed here)."""
        fast = cls.is_fast(x, weight, bias, mask, reduce_axes)
        if merged is not None:
            count, mean, var = merged
            # The same x − mean as centered_moments took after the merge (XLA merges the two).
            centered = None if fast else center(x.astype(compute_dtype(x.dtype)), mean, mask)
            return cls(x, mask, reduce_axes, count, mean, var, centered)
        if not fast:
            count, mean, var, centered = centered_moments(
                x.astype(compute_dtype(x.dtype)), mask, reduce_axes
            )
            return cls(x, mask, reduce_axes, count, mean, var, centered)
        mean, m2 = channel_moments(x, reduce_axes)
        count = jnp.full(mean.shape, reduced_count(x.shape, reduce_axes), mean.dtype)
        var = m2 / jnp.maximum(count, 1)
        return cls(x, None, reduce_axes, count, mean, var, None)

    def affine(self, b: jax.Array, c: jax.Array, addend: jax.Array | None = None) -> jax.Array:
        """``(x − mean)·b + c (+ addend)`` in ``x``'s dtype, rounded once; 0 where masked."""
        if self.centered is None:
            return channel_affine(
                b, c, self.x, self.mean, self.reduce_axes, addend, out_dtype=self.x.dtype
            )
        y = self.centered * b + c
        y = y if addend is None else y + addend
        y = y if self.mask is None else jnp.where(self.mask, y, 0)
        return y.astype(self.x.dtype)

    def sums(self, dx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(Σ dx, Σ (x − mean)·dx)`` over the unmasked elements."""
        if self.centered is None:
            sum_centered, sum_dx = channel_dot(dx, self.x, self.mean, self.reduce_axes)
            return sum_dx, sum_centered
        if self.mask is not None:
            dx = jnp.where(self.mask, dx, 0)
        return (
            jnp.sum(dx, self.reduce_axes, keepdims=True),
            jnp.sum(self.centered * dx, self.reduce_axes, keepdims=True),
        )


@functools.partial(_normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(reduce_axes, eps, axis_name, axis_index_groups, primals, tangents):
    x, weight, bias, mask, merged = primals
    dx, dweight, dbias = tangents[:3]  # merged's tangents follow from dx
    stats = _Statistics.of(x, weight, bias, mask, reduce_axes, merged)
    count, mean, var = stats.count, stats.mean, stats.var
    rstd = jax.lax.rsqrt(var + eps)
    a = rstd if weight is None else rstd * weight
    y = stats.affine(a, jnp.zeros_like(mean) if bias is None else bias)
    n = jnp.maximum(count, 1)
    # dy = dx·a + (x − mean)·B + C with per-channel a, B, C. Written this way, the transpose
    # (the backward pass) needs only Σg and Σg·(x − mean) — one channel_dot — and one
    # elementwise pass for dx.
    per_channel = jnp.zeros_like(mean)
    B, C = per_channel, per_channel
    dmean = dvar = per_channel
    direct = None  # the dx·a term
    if not isinstance(dx, SymbolicZero):
        # One float32 (float64) tangent, so that reverse mode accumulates dx's two
        # contributions before rounding them to a half-precision x's dtype once.
        dx = dx.astype(mean.dtype)
        sums = stats.sums(dx)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
        dmean, proj = sums[0] / n, sums[1] / n  # proj = mean((x - mean) · dx)
        direct = dx * a
        B = B - proj * rstd * rstd * a
        C = C - dmean * a
        dvar = 2 * proj
    if weight is not None and not isinstance(dweight, SymbolicZero):
        B = B + rstd * dweight
    if bias is not None and not isinstance(dbias, SymbolicZero):
        C = C + dbias
    dy = stats.affine(B, C, direct)
    return (y, count, mean, var), (dy, jnp.zeros_like(count), dmean, dvar)
