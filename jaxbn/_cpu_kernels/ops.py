"""Per-channel reductions and their transpose, as JAX primitives with native CPU kernels.

Batch norm's statistics and derivatives are made of three operations on an activation ``x``
([...], reduced over ``reduce_axes``; per-channel values have ``x``'s rank with those axes 1):

* ``channel_moments(x)`` → ``(mean, m2)``, ``m2 = Σ(x − mean)²``;
* ``channel_dot(g, x, mean)`` → ``(Σg·(x − mean), Σg)`` — linear in ``g``;
* ``channel_affine(b, c, x, mean, addend)`` → ``(x − mean)·b + c + addend`` — linear in
  ``(b, c, addend)``, computed in float32 (or float64) and rounded once to ``out_dtype``.

``channel_dot`` and ``channel_affine`` are each other's transpose, so reverse mode turns every
reduction back into a ``channel_dot``. On the CPU the two reductions run as the single-pass
C++ kernels of :mod:`.build` when ``x`` (and ``g``) are float32, bfloat16 or float16 —
read in their own dtype, no float32 copy — and the kept axes are contiguous; everywhere else
(float64, GPU, ``vmap``, ``jax.export``, no compiler) they lower to the plain-JAX reference
below, which they must agree with. Each primitive has a JVP, so derivatives of any order work.

Why primitives and not the public ``jax.custom_jvp`` / ``jax.custom_vjp`` around
``jax.ffi.ffi_call`` (which the CPU lowering does use): reverse mode must call the ``channel_dot``
kernel, and only a primitive can declare that ``channel_dot`` and ``channel_affine`` are each
other's transpose. A ``custom_jvp`` rule would be transposed through the plain-JAX reference
(the backward pass would lose the kernel), and a ``custom_vjp`` would give up forward mode
(``jax.jvp``, ``jacfwd``, ``grad`` of ``grad``), which jaxbn supports and tests. So the
extension APIs below are the only way to get both; they are used nowhere else in jaxbn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive  # a primitive: the only way to declare a transpose
from jax.interpreters import (
    ad,  # JVP and transpose rules of the primitives
    batching,  # vmap rule: lower to the reference per batch
    mlir,  # lowering: the FFI kernel on CPU, the reference elsewhere
)

from jaxbn._core.moments import shifted_moments
from jaxbn._core.shapes import Axes, compute_dtype, kept_shape, reduced_count, varying_axes
from jaxbn._cpu_kernels import build as native

NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --- the public operations -----------------------------------------------------------------


def channel_moments(x: jax.Array, reduce_axes: Axes) -> tuple[jax.Array, jax.Array]:
    """``(mean, Σ(x − mean)²)`` over ``reduce_axes``; both keep ``x``'s rank."""
    return tuple(moments_p.bind(x, reduce_axes=reduce_axes))


def channel_dot(
    g: jax.Array, x: jax.Array, mean: jax.Array, reduce_axes: Axes
) -> tuple[jax.Array, jax.Array]:
    """``(Σ g·(x − mean), Σ g)`` over ``reduce_axes``; ``g`` and ``x`` have one shape."""
    g, x, mean = _same_vma(g, x, mean)
    return tuple(dot_p.bind(g, x, mean, reduce_axes=reduce_axes))


def channel_affine(
    b: jax.Array,
    c: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    reduce_axes: Axes,
    addend: jax.Array | None = None,
    out_dtype=None,
) -> jax.Array:
    """``(x − mean)·b + c (+ addend)`` with per-channel ``b``, ``c``, ``mean``.

    Computed in float32 (float64 if any operand is) and rounded once to ``out_dtype`` (default:
    that compute dtype). ``addend`` has ``x``'s shape.
    """
    operands = (b, c, x, mean) if addend is None else (b, c, x, mean, addend)
    out_dtype = np.dtype(out_dtype or compute_dtype(*operands))
    return affine_p.bind(*_same_vma(*operands), reduce_axes=reduce_axes, out_dtype=out_dtype)


def _same_vma(*arrays):
    # Inside shard_map a primitive's operands must vary over the same mesh axes; the merged
    # statistics are replicated while activations vary, so cast the former to varying.
    vmas = [varying_axes(a) for a in arrays]
    union = frozenset().union(*vmas)
    return tuple(
        a if vma == union else jax.lax.pcast(a, tuple(union - vma), to="varying")
        for a, vma in zip(arrays, vmas, strict=True)
    )


# --- references (plain JAX; also the lowering off the fast path) -----------------------------


def moments_reference(x, *, reduce_axes):
    # One fused pass on GPUs too (the CPU kernel's shifted form, in plain JAX).
    return shifted_moments(x.astype(compute_dtype(x)), reduce_axes)


def dot_reference(g, x, mean, *, reduce_axes):
    dtype = compute_dtype(g, x, mean)
    g = g.astype(dtype)
    centered = x.astype(dtype) - mean.astype(dtype)
    return (
        jnp.sum(g * centered, reduce_axes, keepdims=True),
        jnp.sum(g, reduce_axes, keepdims=True),
    )


def affine_reference(b, c, x, mean, *addend, reduce_axes, out_dtype):
    del reduce_axes
    dtype = compute_dtype(b, c, x, mean, *addend)
    y = (x.astype(dtype) - mean.astype(dtype)) * b.astype(dtype) + c.astype(dtype)
    y = y + addend[0].astype(dtype) if addend else y
    return y.astype(out_dtype)


# --- native lowering -------------------------------------------------------------------------


def _channel_view(shape: tuple[int, ...], reduce_axes: Axes) -> tuple[int, int, int] | None:
    """``(outer, C, inner)`` when the kept axes are one contiguous block, else None."""
    kept = [i for i in range(len(shape)) if i not in reduce_axes]
    if not kept or kept != list(range(kept[0], kept[-1] + 1)):
        return None
    size = lambda axes: int(np.prod([shape[i] for i in axes], dtype=np.int64))
    return size(range(kept[0])), size(kept), size(range(kept[-1] + 1, len(shape)))


def _native_view(reduce_axes, *arrays):
    """The kernel's 3-D view of the activations, or None when the kernels cannot take them."""
    x = arrays[-1]
    if x.dtype not in NATIVE_DTYPES or any(a.dtype != x.dtype for a in arrays) or x.size == 0:
        return None
    view = _channel_view(x.shape, reduce_axes)
    return view if view is not None and native.load() else None


def _view_attributes(view):
    # Flat operands with the view as attributes: a 3-D operand can make XLA insert a copy to
    # meet the custom call's row-major layout (it does for bfloat16 [n, C, 1]).
    outer, channels, inner = (np.int64(d) for d in view)
    return {"outer": outer, "channels": channels, "inner": inner}


def _per_channel(view, shape, reduce_axes):
    return jax.ShapeDtypeStruct((view[1],), jnp.float32), kept_shape(shape, reduce_axes)


def moments_cpu(x, *, reduce_axes):
    view = _native_view(reduce_axes, x)
    if view is None:
        return moments_reference(x, reduce_axes=reduce_axes)
    result, kept = _per_channel(view, x.shape, reduce_axes)
    call = jax.ffi.ffi_call("jaxbn_channel_moments", (result, result))
    mean, m2 = call(x.reshape(-1), **_view_attributes(view))
    return mean.reshape(kept), m2.reshape(kept)


def dot_cpu(g, x, mean, *, reduce_axes):
    view = _native_view(reduce_axes, g, x)
    if view is None or mean.dtype != jnp.float32:
        return dot_reference(g, x, mean, reduce_axes=reduce_axes)
    result, kept = _per_channel(view, x.shape, reduce_axes)
    call = jax.ffi.ffi_call("jaxbn_channel_dot", (result, result))
    sum_gx, sum_g = call(g.reshape(-1), x.reshape(-1), mean.reshape(-1), **_view_attributes(view))
    return sum_gx.reshape(kept), sum_g.reshape(kept)


# --- primitives ----------------------------------------------------------------------------


def _per_channel_aval(x_aval, reduce_axes, *others):
    dtype = compute_dtype(x_aval.dtype, *(a.dtype for a in others))
    return x_aval.update(shape=kept_shape(x_aval.shape, reduce_axes), dtype=dtype)


def _primitive(name, reference, cpu, multiple_results, abstract_eval):
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_abstract_eval(abstract_eval)
    prim.def_impl(lambda *args, **params: _jitted(prim, **params)(*args))
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results))

    def lower_cpu(ctx, *args, **params):
        # jax.export refuses custom calls without a compatibility guarantee; exported code
        # takes the reference (it may also run where these kernels were never built).
        exporting = ctx.module_context.lowering_parameters.for_export
        return mlir.lower_fun(reference if exporting else cpu, multiple_results)(
            ctx, *args, **params
        )

    mlir.register_lowering(prim, lower_cpu, platform="cpu")

    def batch(args, dims, **params):
        # vmap (jacfwd, jacrev, per-example work) takes the reference path.
        out = jax.vmap(functools.partial(reference, **params), in_axes=dims)(*args)
        return out, ((0,) * len(out) if multiple_results else 0)

    batching.primitive_batchers[prim] = batch
    return prim


@functools.cache
def _jitted(prim, **params):
    return jax.jit(functools.partial(prim.bind, **params))


moments_p = _primitive(
    "jaxbn_channel_moments",
    moments_reference,
    moments_cpu,
    True,
    lambda x, *, reduce_axes: (_per_channel_aval(x, reduce_axes),) * 2,
)
dot_p = _primitive(
    "jaxbn_channel_dot",
    dot_reference,
    dot_cpu,
    True,
    lambda g, x, mean, *, reduce_axes: (_per_channel_aval(x, reduce_axes, g, mean),) * 2,
)
affine_p = _primitive(
    "jaxbn_channel_affine",
    affine_reference,
    affine_reference,
    False,
    lambda b, c, x, mean, *addend, reduce_axes, out_dtype: x.update(dtype=out_dtype),
)


# --- derivatives ---------------------------------------------------------------------------


def _nonzero(tangent) -> bool:
    return type(tangent) is not ad.Zero


def _moments_jvp(primals, tangents, *, reduce_axes):
    (x,), (dx,) = primals, tangents
    mean, m2 = channel_moments(x, reduce_axes)
    if not _nonzero(dx):
        return (mean, m2), (jnp.zeros_like(mean), jnp.zeros_like(m2))
    # dmean = mean(dx); dm2 = 2·Σ(x − mean)·(dx − dmean) = 2·Σ(x − mean)·dx.
    sum_dx_centered, sum_dx = channel_dot(dx, x, mean, reduce_axes)
    n = max(reduced_count(x.shape, reduce_axes), 1)
    return (mean, m2), (sum_dx / n, 2 * sum_dx_centered)


def _dot_jvp(primals, tangents, *, reduce_axes):
    (g, x, mean), (dg, dx, dmean) = primals, tangents
    sum_gx, sum_g = channel_dot(g, x, mean, reduce_axes)
    t_gx, t_g = jnp.zeros_like(sum_gx), jnp.zeros_like(sum_g)
    if _nonzero(dg):
        t_gx, t_g = channel_dot(dg, x, mean, reduce_axes)
    if _nonzero(dx):  # Σ g·dx
        t_gx = t_gx + channel_dot(dx, g, jnp.zeros_like(mean), reduce_axes)[0]
    if _nonzero(dmean):
        t_gx = t_gx - dmean * sum_g
    return (sum_gx, sum_g), (t_gx, t_g)


def _affine_jvp(primals, tangents, *, reduce_axes, out_dtype):
    (b, c, x, mean, *addend), (db, dc, dx, dmean, *daddend) = primals, tangents
    y = channel_affine(b, c, x, mean, reduce_axes, *addend, out_dtype=out_dtype)
    # Everything but db and dc goes into one addend, so the tangent is rounded once too.
    dtype = compute_dtype(b, c, x, mean, *addend)
    extra = [t.astype(dtype) for t in daddend if _nonzero(t)]
    if _nonzero(dx):
        extra.append(dx.astype(dtype) * b)
    if _nonzero(dmean):
        extra.append(jnp.broadcast_to(-dmean * b, x.shape))
    if not (_nonzero(db) or _nonzero(dc) or extra):
        return y, jnp.zeros_like(y)
    db, dc = ad.instantiate_zeros(db), ad.instantiate_zeros(dc)
    total = functools.reduce(jnp.add, extra) if extra else None
    return y, channel_affine(db, dc, x, mean, reduce_axes, total, out_dtype)


def _dot_transpose(cts, g, x, mean, *, reduce_axes):
    if not ad.is_undefined_primal(g) or ad.is_undefined_primal(x):
        raise NotImplementedError("channel_dot is linear in its first operand only")
    ct_gx, ct_g = (ad.instantiate_zeros(ct) for ct in cts)
    return channel_affine(ct_gx, ct_g, x, mean, reduce_axes, out_dtype=g.aval.dtype), None, None


def _affine_transpose(ct, b, c, x, mean, *addend, reduce_axes, out_dtype):
    if ad.is_undefined_primal(x) or ad.is_undefined_primal(mean):
        raise NotImplementedError("channel_affine is linear in its scale, shift and addend only")
    cts = [None] * (4 + len(addend))
    if type(ct) is ad.Zero:
        return cts
    if ad.is_undefined_primal(b) or ad.is_undefined_primal(c):
        sum_gx, sum_g = channel_dot(ct, x, mean, reduce_axes)
        cts[0] = sum_gx.astype(b.aval.dtype) if ad.is_undefined_primal(b) else None
        cts[1] = sum_g.astype(c.aval.dtype) if ad.is_undefined_primal(c) else None
    if addend and ad.is_undefined_primal(addend[0]):
        cts[4] = ct.astype(addend[0].aval.dtype)
    return cts


ad.primitive_jvps[moments_p] = _moments_jvp
ad.primitive_jvps[dot_p] = _dot_jvp
ad.primitive_jvps[affine_p] = _affine_jvp
ad.primitive_transposes[dot_p] = _dot_transpose
ad.primitive_transposes[affine_p] = _affine_transpose
