"""The GPU path without a GPU: lowered for CUDA, a batch norm uses no CPU kernel (plain JAX,
one shifted pass for the moments); its moments are stable on data that breaks E[x²] − E[x]²."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn._cpu_kernels import build as native
from jaxbn._cpu_kernels.ops import moments_reference


def bn_grad(x):
    def loss(x):
        y = jaxbn.functional.batch_norm(x, None, None, jnp.ones(3), jnp.zeros(3), training=True)
        return jnp.sum(y[0] * jnp.arange(3.0))

    return jax.grad(loss)(x)


def lowered(platform: str) -> str:
    x = jnp.ones((8, 4, 4, 3)).at[0].set(2.0)
    return jax.jit(bn_grad).trace(x).lower(lowering_platforms=(platform,)).as_text()


def test_a_batch_norm_lowered_for_cuda_calls_no_cpu_kernel():
    assert "custom_call @jaxbn_channel" not in lowered("cuda")


def test_the_same_batch_norm_lowered_for_the_cpu_calls_the_kernels():
    if not native.load():
        pytest.skip("no C++ compiler here: the CPU kernels are off")
    assert "custom_call @jaxbn_channel_moments" in lowered("cpu")


def _reference(x):
    axes = tuple(range(x.ndim - 1))
    mean, m2 = jax.jit(lambda x: moments_reference(x, reduce_axes=axes))(jnp.asarray(x))
    return np.asarray(mean).ravel(), np.asarray(m2).ravel() / (x.size // x.shape[-1])


@pytest.mark.parametrize(
    "case",
    ["randn plus 1e4", "outliers in the first values", "a constant channel"],
)
def test_the_one_pass_reference_moments_are_stable(case):
    rng = np.random.default_rng(0)
    if case == "randn plus 1e4":  # E[x²] − E[x]² in float32 gives 0 or 8 here, not 1
        x = rng.standard_normal((256, 6, 6, 4)) + 1e4
    elif case == "outliers in the first values":  # the shift lands far from the mean
        x = np.concatenate([np.full((40, 6, 6, 4), 1e6), rng.standard_normal((4000, 6, 6, 4))])
    else:
        x = np.full((64, 3), 7.0)
    x32 = x.astype(np.float32)
    mean, var = _reference(x32)
    exact = x32.astype(np.float64).reshape(-1, x.shape[-1])
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, exact.var(0), rtol=1e-5, atol=1e-12)


def test_the_reference_keeps_inf_and_nan_like_the_two_pass_form():
    x = jnp.asarray([[1.0, 2.0], [np.inf, 3.0], [3.0, np.nan]])
    mean, m2 = moments_reference(x, reduce_axes=(0,))
    assert np.isposinf(mean[0, 0]) and np.isnan(m2[0, 0])
    assert np.isnan(mean[0, 1]) and np.isnan(m2[0, 1])
