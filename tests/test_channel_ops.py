"""The per-channel primitives and their native CPU kernels, against float64 numpy.

The kernels only take float32 on the CPU; float64 runs the plain-JAX reference. Both must give
the same statistics, and the primitives' JVP/transpose rules must be consistent with each other
(checked by JAX's numerical gradient checker and by the dot-product test).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxbn._cpu_kernels import build as native
from jaxbn._cpu_kernels import ops as channel_ops
from jaxbn._cpu_kernels.ops import channel_affine, channel_dot, channel_moments

# (shape, reduce_axes), chosen to reach every loop of the kernels: NHWC conv; dense with a
# partial vector of channels; NCL with short, long (unrolled) and very long (several float
# blocks) runs per channel; LayerNorm-like (one outer row); few channels with many rows (split
# by rows); many channels with few rows (split by channels, groups of 8 vectors).
LAYOUTS = [
    ((16, 5, 7, 24), (0, 1, 2)),
    ((300, 33), (0,)),
    ((40, 200), (0,)),
    ((6, 10, 37), (0, 2)),
    ((4, 3, 300), (0, 2)),
    ((2, 2, 5000), (0, 2)),
    ((3, 4, 50), (2,)),
    ((5000, 2), (0,)),
    ((3, 2000), (0,)),
]


def _numpy_moments(x, axes):
    x = np.asarray(x, np.float64)
    mean = x.mean(axes, keepdims=True)
    return mean, ((x - mean) ** 2).sum(axes, keepdims=True)


def _data(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3 + offset).astype(np.float32)


def test_native_kernels_are_built_and_used():
    # CI has a compiler: a float32 batch norm must run on the kernels, forward and backward.
    assert native.load()
    x = jnp.asarray(_data((8, 4, 4, 16)))

    def loss(x):
        mean, m2 = channel_moments(x, (0, 1, 2))
        return jnp.sum(channel_affine(m2, mean, x, mean, (0, 1, 2)) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(x).as_text()
    assert "jaxbn_channel_moments" in hlo
    assert "jaxbn_channel_dot" in hlo


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_moments_match_numpy(shape, axes):
    x = _data(shape, offset=5.0)
    mean, m2 = jax.jit(lambda x: channel_moments(x, axes))(x)
    want_mean, want_m2 = _numpy_moments(x, axes)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(m2, want_m2, rtol=2e-6)


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_dot_matches_numpy(shape, axes):
    x, g = _data(shape, 1, offset=-2.0), _data(shape, 2)
    mean = _numpy_moments(x, axes)[0].astype(np.float32)
    sum_gx, sum_g = jax.jit(lambda g, x, m: channel_dot(g, x, m, axes))(g, x, mean)
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    scale = np.sqrt(np.prod([shape[a] for a in axes])) * 10  # error grows like √n
    np.testing.assert_allclose(sum_g, g64.sum(axes, keepdims=True), atol=1e-6 * scale)
    np.testing.assert_allclose(
        sum_gx, (g64 * (x64 - mean)).sum(axes, keepdims=True), atol=1e-6 * scale * 3
    )


def test_one_pass_moments_do_not_cancel():
    # randn + 1e4 in float32: Σx² − n·mean² would lose every digit of the variance.
    x = (np.random.default_rng(3).standard_normal((4096, 8)) + 1e4).astype(np.float32)
    mean, m2 = jax.jit(lambda x: channel_moments(x, (0,)))(x)
    want_mean, want_m2 = _numpy_moments(x, (0,))
    np.testing.assert_allclose(m2 / 4096, want_m2 / 4096, rtol=1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-7)


def test_nan_propagates_to_its_channel_only():
    x = _data((64, 4))
    x[10, 2] = np.nan
    mean, m2 = jax.jit(lambda x: channel_moments(x, (0,)))(x)
    assert np.isnan(mean[0, 2]) and np.isnan(m2[0, 2])
    assert np.all(np.isfinite(np.delete(np.asarray(m2), 2)))


@jax.enable_x64(True)
def test_dot_and_affine_are_each_others_transpose():
    # <channel_dot(g), (b, c)> == <g, channel_affine(b, c)> for all g, b, c.
    axes = (0, 2)
    x, g = _data((4, 3, 5), 4).astype(np.float64), _data((4, 3, 5), 5).astype(np.float64)
    mean = _numpy_moments(x, axes)[0]
    b, c = np.array([[[1.5], [-2.0], [0.5]]]), np.array([[[0.3], [0.1], [-1.0]]])
    sum_gx, sum_g = channel_dot(g, x, mean, axes)
    left = np.sum(sum_gx * b) + np.sum(sum_g * c)
    right = np.sum(g * channel_affine(b, c, x, mean, axes))
    np.testing.assert_allclose(left, right, rtol=1e-12)
    transposed = jax.linear_transpose(lambda g: channel_dot(g, x, mean, axes), g)((b, c))[0]
    np.testing.assert_allclose(transposed, channel_affine(b, c, x, mean, axes), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@jax.enable_x64(True)
def test_derivatives_to_second_order(dtype):
    # Numerical check of every rule (JVP and its transpose), through a batch-norm-like chain.
    axes = (0, 1)
    x = _data((5, 3, 4), 6).astype(dtype)
    g = _data((5, 3, 4), 7).astype(dtype)

    def f(x):
        mean, m2 = channel_moments(x, axes)
        y = channel_affine(jax.lax.rsqrt(m2 / 15 + 0.1), jnp.zeros_like(mean), x, mean, axes)
        sum_gx, sum_g = channel_dot(g * y, x, mean, axes)
        return jnp.sum(jnp.tanh(y) * g) + jnp.sum(sum_gx * sum_g) * 1e-2

    tol = 1e-6 if dtype == np.float64 else 5e-2
    eps = 1e-4 if dtype == np.float64 else 1e-2
    # jitted: the checker's many evaluations reuse one compile instead of one per operation
    check_grads(jax.jit(f), (x,), order=2, modes=("fwd", "rev"), atol=tol, rtol=tol, eps=eps)


def test_vmap_matches_per_example_calls():
    axes = (0, 1)
    xs = _data((3, 20, 4, 6), 8)
    batched = jax.vmap(lambda x: channel_moments(x, axes))(xs)
    for i in range(3):
        single = channel_moments(xs[i], axes)
        for got, want in zip(batched, single, strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_empty_reduction_gives_zero_statistics():
    mean, m2 = jax.jit(lambda x: channel_moments(x, (0,)))(jnp.zeros((0, 3)))
    np.testing.assert_array_equal(mean, np.zeros((1, 3)))
    np.testing.assert_array_equal(m2, np.zeros((1, 3)))


def _start_isolated(env_update: dict, code: str) -> subprocess.Popen:
    env = {**os.environ, **env_update}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


FALLBACK_CHECK = """
    import warnings
    import numpy as np, jax
    from jaxbn._cpu_kernels import build as native
    from jaxbn._cpu_kernels.ops import channel_moments
    x = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32) + 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean, m2 = jax.jit(lambda x: channel_moments(x, (0,)))(x)
        hlo = jax.jit(lambda x: channel_moments(x, (0,))).lower(x).as_text()
    np.testing.assert_allclose(mean[0], x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(m2[0] / 100, x.astype(np.float64).var(0), rtol=1e-5)
    print("loaded", native.load(), "custom_call", "jaxbn_channel" in hlo)
    print("warnings", [str(w.message)[:60] for w in caught])
"""


@pytest.fixture(scope="module", autouse=True)
def fallback_runs(tmp_path_factory):
    """FALLBACK_CHECK switched off and with a failed build, each in a fresh interpreter (the
    kernels are loaded once per process), started with the module's first test: they run on
    the second core while the other tests run."""
    processes = {
        "switched off": _start_isolated({"JAXBN_NATIVE": "0"}, FALLBACK_CHECK),
        "failed build": _start_isolated(
            {"JAXBN_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "CXX": "false"},
            FALLBACK_CHECK,
        ),
    }

    def finish(name: str) -> subprocess.CompletedProcess:
        process = processes[name]
        stdout, stderr = process.communicate(timeout=1200)  # a hang only; loaded machines are slow
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    yield finish
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_switched_off_uses_the_reference_silently(fallback_runs):
    result = fallback_runs("switched off")
    assert result.returncode == 0, result.stderr
    assert "loaded False custom_call False" in result.stdout
    assert "warnings []" in result.stdout


def test_failed_build_warns_and_falls_back(fallback_runs):
    result = fallback_runs("failed build")
    assert result.returncode == 0, result.stderr
    assert "loaded False custom_call False" in result.stdout
    assert "native CPU kernels are unavailable" in result.stdout


def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBN_CACHE_DIR", str(tmp_path))
    # The real compiler on the real source, unoptimized: -O3 costs four times the CPU time and
    # changes nothing this test checks (the cached pair's names and digest, no temporary left).
    flags = tuple("-O0" if f.startswith("-O") else f for f in native.FLAGS)
    monkeypatch.setattr(native, "FLAGS", flags)
    path = native.library_path()
    assert path.parent == tmp_path and not path.exists()
    native.build(path)
    # The library and the digest it is verified against; no temporary left behind.
    assert sorted(tmp_path.iterdir()) == sorted([path, native.digest_path(path)])
    assert native.cache_problem(path) is None


def test_infinity_gives_the_two_pass_statistics():
    x = _data((32, 3))
    x[0, 0] = np.inf  # among the values the kernel takes its shift from
    x[5, 1] = -np.inf
    mean, m2 = jax.jit(lambda x: channel_moments(x, (0,)))(x)
    ref_mean, ref_m2 = channel_ops.moments_reference(jnp.asarray(x), reduce_axes=(0,))
    np.testing.assert_array_equal(mean[0, :2], ref_mean[0, :2])  # +inf, -inf
    assert np.isnan(m2[0, 0]) and np.isnan(ref_m2[0, 0])
    assert np.isfinite(m2[0, 2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_batch_norm_backward_keeps_no_activation_sized_temporary(dtype):
    # The kernels read x and g in their own dtype: no float32 copy of a half-precision x, and
    # no centered x − mean; XLA's plan for fwd+bwd holds nothing near the size of x.
    import jaxbn

    x = jnp.asarray(_data((64, 8, 8, 32)), dtype)
    g = jnp.asarray(_data((64, 8, 8, 32), 1), dtype)

    def loss(x, w, b):
        y = jaxbn.functional.batch_norm(x, None, None, w, b, training=True)[0]
        return jnp.sum((y * g).astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, jnp.ones(32), jnp.zeros(32)).compile()
    assert "jaxbn_channel_moments" in compiled.as_text()
    assert "jaxbn_channel_dot" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < x.size * x.dtype.itemsize // 8


def test_exported_batch_norm_takes_the_reference_and_agrees():
    # jax.export refuses custom calls; the exported function must still compute the same thing.
    import jaxbn

    x = jnp.asarray(_data((16, 3, 3, 8), offset=2.0))

    def forward(x):
        return jaxbn.functional.batch_norm(x, None, None, training=True)[0]

    exported = jax.export.export(jax.jit(forward))(x)
    assert "custom_call @jaxbn_channel" not in exported.mlir_module()
    np.testing.assert_allclose(exported.call(x), jax.jit(forward)(x), rtol=1e-5, atol=1e-5)


def test_kernel_refuses_a_view_that_does_not_cover_its_buffer():
    # The kernels trust the view for every read: a wrong one must be an error, never a read
    # past the end of the buffer.
    assert native.load()
    result = jax.ShapeDtypeStruct((4,), jnp.float32)
    call = jax.ffi.ffi_call("jaxbn_channel_moments", (result, result))
    x = jnp.ones(12)
    views = {"outer": np.int64(4), "channels": np.int64(4), "inner": np.int64(1)}
    with pytest.raises(Exception, match="view does not match the buffer"):
        jax.block_until_ready(jax.jit(lambda x: call(x, **views))(x))


@pytest.mark.parametrize("outlier", [1e4, -3e3, 50.0])
def test_a_first_value_far_from_the_mean_costs_no_accuracy(outlier):
    # The one-pass kernel sums around the mean of each channel's first values; an outlier among
    # them moves that shift far from the mean, the squares would swamp float32, so the kernel
    # must notice and sum again around the mean.
    x = np.random.default_rng(4).standard_normal((8192, 3)).astype(np.float32)
    x[0] = outlier
    mean, m2 = jax.jit(lambda x: channel_moments(x, (0,)))(x)
    want_mean, want_m2 = _numpy_moments(x, (0,))
    np.testing.assert_allclose(m2, want_m2, rtol=2e-6)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
