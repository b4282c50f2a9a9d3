"""Module behaviour: variables, counting, PyTorch's edge cases, half precision, stability."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from tests.parity_report import assert_close
from tests.torch_twins import to_jax, to_numpy


def normal(seed, shape):
    """float32 N(0, 1) data from numpy (JAX's generator compiles for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_init_in_train_mode_does_not_count_as_a_training_step():
    bn = jaxbn.BatchNorm1d(3)
    variables = bn.init(jax.random.key(0), jnp.arange(12.0).reshape(4, 3), train=True)
    stats = variables["batch_stats"]
    assert int(stats["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(stats["mean"], np.zeros(3))
    np.testing.assert_array_equal(stats["var"], np.ones(3))


def test_variables_follow_the_design_names():
    variables = jaxbn.BatchNorm2d(5).init(jax.random.key(0), jnp.ones((2, 3, 3, 5)), train=False)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]) == {"mean", "var", "num_batches_tracked"}


def test_affine_false_creates_no_params():
    bn = jaxbn.BatchNorm1d(3, affine=False)
    assert "params" not in bn.init(jax.random.key(0), jnp.ones((4, 3)), train=False)


def test_untracked_creates_no_batch_stats_and_eval_uses_batch_statistics():
    bn = jaxbn.BatchNorm1d(3, track_running_stats=False)
    x = normal(1, (6, 3)) * 3 + 2
    variables = bn.init(jax.random.key(0), x, train=False)
    assert "batch_stats" not in variables
    y = bn.apply(variables, x, train=False)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(y.var(0), 1, atol=1e-4)


def test_eval_does_not_change_the_statistics():
    bn = jaxbn.BatchNorm1d(3)
    x = jnp.arange(12.0).reshape(4, 3)
    variables = bn.init(jax.random.key(0), x, train=False)
    _, updates = bn.apply(variables, x, train=False, mutable=["batch_stats"])
    assert jax.tree.all(
        jax.tree.map(jnp.array_equal, updates, {"batch_stats": variables["batch_stats"]})
    )


def test_empty_batch_gives_empty_output_counts_a_step_and_keeps_stats_like_torch():
    tm = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        tm.running_mean.fill_(2.0)
        tm.running_var.fill_(3.0)
    y_t = tm(torch.empty(0, 3, 2, 2))
    bn = jaxbn.BatchNorm2d(3)
    variables = bn.init(jax.random.key(0), jnp.ones((2, 2, 2, 3)), train=False)
    variables["batch_stats"]["mean"] = jnp.full(3, 2.0)
    variables["batch_stats"]["var"] = jnp.full(3, 3.0)
    y, updates = bn.apply(variables, jnp.empty((0, 2, 2, 3)), train=True, mutable=["batch_stats"])
    assert y.shape == (0, 2, 2, 3) and tuple(y_t.shape) == (0, 3, 2, 2)
    stats = updates["batch_stats"]
    assert int(stats["num_batches_tracked"]) == int(tm.num_batches_tracked) == 1
    np.testing.assert_array_equal(stats["mean"], tm.running_mean.numpy())
    np.testing.assert_array_equal(stats["var"], tm.running_var.numpy())


def test_momentum_none_is_the_cumulative_average_of_batch_statistics():
    bn = jaxbn.BatchNorm1d(2, momentum=None)
    batches = [normal(i, (5, 2)) * (i + 1) for i in range(4)]
    variables = bn.init(jax.random.key(0), batches[0], train=False)
    for x in batches:
        _, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    stats = variables["batch_stats"]
    expected_mean = np.mean([np.asarray(x).mean(0) for x in batches], axis=0)
    expected_var = np.mean([np.asarray(x).var(0, ddof=1) for x in batches], axis=0)
    np.testing.assert_allclose(stats["mean"], expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], expected_var, rtol=1e-5)


def test_feature_axis_one_reads_pytorch_layout():
    x = normal(0, (4, 3, 5, 5))
    y1 = jaxbn.functional.batch_norm(x, None, None, training=True, axis=1)[0]
    y_last = jaxbn.functional.batch_norm(jnp.moveaxis(x, 1, -1), None, None, training=True)[0]
    np.testing.assert_allclose(y1, jnp.moveaxis(y_last, -1, 1), atol=1e-6)


def test_variance_is_stable_for_a_large_offset_in_float32():
    x = np.random.default_rng(0).standard_normal((4096, 3)).astype(np.float32) + 1e4
    _, _, var = jaxbn.functional.batch_norm(
        jnp.asarray(x), jnp.zeros(3), jnp.zeros(3), training=True, momentum=1.0
    )
    np.testing.assert_allclose(var, x.astype(np.float64).var(0, ddof=1), rtol=1e-3)


@pytest.mark.parametrize(
    "jdtype,tdtype,tol", [(jnp.bfloat16, torch.bfloat16, 3e-2), (jnp.float16, torch.float16, 4e-3)]
)
def test_half_precision_matches_torch_with_float32_statistics(jdtype, tdtype, tol):
    tm = torch.nn.BatchNorm2d(4)  # float32 weights and stats, half input: PyTorch's mixed mode
    bn = jaxbn.BatchNorm2d(4)
    x_t = (torch.randn(8, 4, 5, 5) * 3 + 1).to(tdtype).requires_grad_()
    g_t = torch.randn(8, 4, 5, 5).to(tdtype)
    y_t = tm(x_t)
    (y_t.float() * g_t.float()).sum().backward()
    x = to_jax(x_t, True)
    variables = bn.init(jax.random.key(0), x, train=False)

    def loss(x):
        y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * to_jax(g_t, True).astype(jnp.float32)), (y, upd)

    dx, (y, updates) = jax.jit(jax.grad(loss, has_aux=True))(x)  # one compile, not one per op
    assert y.dtype == jdtype and dx.dtype == jdtype
    stats = updates["batch_stats"]
    assert stats["mean"].dtype == jnp.float32 and stats["var"].dtype == jnp.float32
    group = f"bn {jnp.dtype(jdtype).name}"
    assert_close(
        f"{group} y", to_numpy(y.astype(jnp.float32), True), y_t.float().detach(), tol, tol
    )
    assert_close(f"{group} dx", to_numpy(dx.astype(jnp.float32), True), x_t.grad.float(), tol, tol)
    assert_close(f"{group} running_mean", stats["mean"], tm.running_mean, 1e-5, 1e-5)
    assert_close(f"{group} running_var", stats["var"], tm.running_var, 1e-5, 1e-5)


def test_output_dtype_field_casts_the_result():
    bn = jaxbn.BatchNorm1d(3, dtype=jnp.bfloat16)
    x = jnp.arange(12.0).reshape(4, 3)
    variables = bn.init(jax.random.key(0), x, train=False)
    assert bn.apply(variables, x, train=False).dtype == jnp.bfloat16
