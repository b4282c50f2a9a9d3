"""Batch Renormalization against Keras 3's ``BatchNormalization(renorm=True)`` (JAX backend,
CPU) and, where it reduces to batch norm (r_max=1, d_max=0), against torch.

Conventions mapped (see jaxbn/linen/batch_renorm.py): Keras ``momentum`` = 1 − jaxbn
``momentum``; ``renorm_momentum`` = Keras ``momentum`` (one pair of statistics);
``epsilon`` = ``eps``; ``renorm_clipping={"rmax": R, "rmin": 1/R, "dmax": D}`` = ``r_max=R,
d_max=D`` ({} = inf, inf); ``update_rule="keras"`` (std averaged, biased, stored as
``var = std² − eps`` = Keras's ``moving_variance``); Keras starts ``moving_stddev`` at 1, jaxbn
at ``sqrt(var + eps)``: the jaxbn side starts at ``var = 1 − eps``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ["KERAS_BACKEND"] = "jax"
keras = pytest.importorskip("keras")

from jaxbn import functional as F  # noqa: E402
from jaxbn.linen.batch_norm import BatchNorm  # noqa: E402
from jaxbn.linen.batch_renorm import BatchRenorm, renorm_schedule  # noqa: E402
from jaxbn.sync import sync_batch_norm  # noqa: E402
from tests.bn_train_step import bn_train_step  # noqa: E402
from tests.parity_report import assert_close  # noqa: E402

C = 3


def data(step, shape, seed=0):
    """Batches whose statistics (mean ≈ 2, std ≈ 3) are far from the initial running ones:
    r and d are clipped in the first steps and not later."""
    rng = np.random.default_rng(1000 * seed + step)
    x = rng.normal(size=shape) * 3 + 2
    g = rng.normal(size=shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="Keras runs another backend")
@pytest.mark.parametrize(
    "clipping, axis, shape",
    [
        ({"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5}, -1, (6, 4, C)),
        ({}, 1, (5, C, 2, 2)),
    ],
    ids=["clipped-channels-last", "unclipped-nchw"],
)
def test_outputs_gradients_and_moving_statistics_match_keras_renorm_over_steps(
    clipping, axis, shape
):
    keras_momentum, eps, lr = 0.9, 1e-3, 0.1
    layer = keras.layers.BatchNormalization(
        axis=axis,
        momentum=keras_momentum,
        epsilon=eps,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=keras_momentum,
    )
    layer.build(shape)
    names = [v.path.split("/")[-1] for v in layer.non_trainable_variables]
    rng = np.random.default_rng(7)
    gamma = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
    beta = jnp.asarray(rng.normal(size=C), jnp.float32)
    keras_params = [gamma, beta]
    keras_state = [v.value for v in layer.non_trainable_variables]

    model = BatchRenorm(
        C,
        eps=eps,
        momentum=1 - keras_momentum,
        axis=axis,
        r_max=clipping.get("rmax", float("inf")),
        d_max=clipping.get("dmax", float("inf")),
        update_rule="keras",
    )
    variables = model.init(jax.random.key(0), data(0, shape)[0], train=False)
    variables["params"] = {"scale": gamma, "bias": beta}
    variables["batch_stats"]["var"] = jnp.full((C,), 1 - eps)  # Keras's stddev starts at 1

    def keras_loss(params, x, state, g):
        y, new_state = layer.stateless_call(params, state, x, training=True)
        return jnp.sum(y * g), (y, new_state)

    keras_grad = jax.jit(jax.grad(keras_loss, (0, 1), has_aux=True))
    for step in range(6):
        x, g = data(step, shape)

        (k_dparams, k_dx), (k_y, keras_state) = keras_grad(keras_params, x, keras_state, g)
        y, dx, dparams, stats = bn_train_step(model, variables, x, g)
        k_stats = dict(zip(names, keras_state, strict=True))
        group = "renorm vs keras"
        assert_close(group, y, k_y, rtol=1e-5, atol=1e-5)
        assert_close(group, dx, k_dx, rtol=1e-5, atol=1e-5)
        assert_close(group, dparams["scale"], k_dparams[0], rtol=1e-5, atol=2e-5)
        assert_close(group, dparams["bias"], k_dparams[1], rtol=1e-5, atol=2e-5)
        assert_close(group, stats["mean"], k_stats["moving_mean"], rtol=1e-6, atol=1e-6)
        assert_close(group, stats["var"], k_stats["moving_variance"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(k_stats["renorm_mean"], k_stats["moving_mean"])
        assert int(stats["num_batches_tracked"]) == step + 1
        # the same SGD step on both sides
        keras_params = [p - lr * d for p, d in zip(keras_params, k_dparams, strict=True)]
        variables = {
            "params": jax.tree.map(lambda p, d: p - lr * d, variables["params"], dparams),
            "batch_stats": stats,
        }

    x, _ = data(99, shape)
    k_eval = layer.stateless_call(keras_params, keras_state, x, training=False)[0]
    assert_close("renorm vs keras", model.apply(variables, x, train=False), k_eval, 1e-5, 1e-5)


def test_clipping_is_active_in_the_keras_comparison():
    # The first batch (std 3, mean 2 against running 1, 0) is clipped by r_max=1.5, d_max=0.5:
    # the output is not batch norm's.
    x, _ = data(0, (6, 4, C))
    rm, rv = jnp.zeros(C), jnp.ones(C)
    renorm = F.batch_renorm(x, rm, rv, training=True, r_max=1.5, d_max=0.5)[0]
    plain = F.batch_norm(x, rm, rv, training=True)[0]
    assert float(jnp.abs(renorm - plain).max()) > 0.5


def torch_bn_step(tm, x_nchw, g_nchw):
    x_t = torch.tensor(x_nchw, requires_grad=True)
    tm.weight.grad = tm.bias.grad = None
    y = tm(x_t)
    (y * torch.tensor(g_nchw)).sum().backward()
    return y.detach().numpy(), x_t.grad.numpy(), tm.weight.grad.numpy(), tm.bias.grad.numpy()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_r_max_1_and_d_max_0_is_torch_batchnorm_over_steps(momentum):
    shape = (4, 3, 3, C)  # NHWC
    tm = torch.nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.5, 2.0, C))
        tm.bias.copy_(torch.linspace(-1.0, 1.0, C))
    model = BatchRenorm(C, momentum=momentum, r_max=1.0, d_max=0.0)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    variables["params"] = {"scale": jnp.linspace(0.5, 2.0, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    nchw = lambda a: np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1))
    for step in range(4):
        x, g = data(step, shape, seed=1)
        y, dx, dparams, stats = bn_train_step(model, variables, x, g)
        t_y, t_dx, t_dw, t_db = torch_bn_step(tm, nchw(x), nchw(g))
        group = "renorm r_max=1 d_max=0 vs torch BN"
        assert_close(group, nchw(y), t_y, 1e-5, 2e-5)
        assert_close(group, nchw(dx), t_dx, 1e-5, 2e-5)
        assert_close(group, dparams["scale"], t_dw, 1e-5, 2e-5)
        assert_close(group, dparams["bias"], t_db, 1e-5, 2e-5)
        assert_close(group, stats["mean"], tm.running_mean.numpy(), 1e-6, 1e-6)
        assert_close(group, stats["var"], tm.running_var.numpy(), 1e-6, 1e-6)
        assert int(stats["num_batches_tracked"]) == int(tm.num_batches_tracked)
        variables = {**variables, "batch_stats": stats}
    tm.eval()
    x, _ = data(50, shape, seed=1)
    assert_close(
        "renorm r_max=1 d_max=0 vs torch BN",
        nchw(model.apply(variables, x, train=False)),
        tm(torch.tensor(nchw(x))).detach().numpy(),
        1e-5,
        2e-5,
    )


def test_torch_update_rule_keeps_torch_running_statistics_whatever_the_clipping():
    # The running update depends on the batch moments only: the same as BatchNorm2d's buffers.
    shape = (4, 2, 2, C)
    tm = torch.nn.BatchNorm2d(C)
    rm, rv = jnp.zeros(C), jnp.ones(C)
    for step in range(3):
        x, _ = data(step, shape, seed=2)
        _, rm, rv = F.batch_renorm(x, rm, rv, training=True, r_max=2.0, d_max=1.0)
        tm(torch.tensor(np.moveaxis(np.asarray(x), -1, 1).copy()))
        assert_close("renorm running stats vs torch", rm, tm.running_mean.numpy(), 1e-6, 1e-6)
        assert_close("renorm running stats vs torch", rv, tm.running_var.numpy(), 1e-6, 1e-6)


def test_masked_rows_do_not_count_and_may_hold_nan():
    x, _ = data(0, (6, C), seed=6)
    x = x.at[4:].set(jnp.nan)
    mask = jnp.arange(6)[:, None] < 4
    rm, rv = jnp.full(C, 0.5), jnp.full(C, 2.0)
    renorm = jax.jit(functools.partial(F.batch_renorm, training=True, r_max=1.2, d_max=0.3))
    y, m, v = renorm(x, rm, rv, mask=mask)
    y_sel, m_sel, v_sel = renorm(x[:4], rm, rv)
    np.testing.assert_allclose(y[:4], y_sel, atol=1e-6)
    np.testing.assert_array_equal(y[4:], 0)
    np.testing.assert_allclose(m, m_sel, atol=1e-7)
    np.testing.assert_allclose(v, v_sel, atol=1e-6)


def test_the_formula_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(7, C)) * 2 + 1
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2, C)
        w, b = rng.normal(size=C), rng.normal(size=C)
        eps, r_max, d_max = 1e-5, 1.3, 0.4
        y, _, _ = F.batch_renorm(x, rm, rv, w, b, True, 0.1, eps, r_max=r_max, d_max=d_max)
        mu, var = x.mean(0), x.var(0)
        sigma_b, sigma = np.sqrt(var + eps), np.sqrt(rv + eps)
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mu - rm) / sigma, -d_max, d_max)
        expected = (x - mu) / sigma_b * (w * r) + (w * d + b)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_eval_is_batch_norm_eval_and_the_variables_are_a_batch_norms():
    x, _ = data(0, (4, 5, C))
    renorm_vars = BatchRenorm(C).init(jax.random.key(0), x, train=False)
    bn_vars = BatchNorm(C).init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(renorm_vars) == jax.tree.structure(bn_vars)
    _, updates = BatchNorm(C).apply(bn_vars, x, train=True, mutable=["batch_stats"])
    trained = {**bn_vars, **updates}
    np.testing.assert_array_equal(
        BatchRenorm(C).apply(trained, x, train=False), BatchNorm(C).apply(trained, x, train=False)
    )


def test_warmup_steps_are_batch_norm_then_the_clipping_applies():
    shape = (4, 2, C)
    model = BatchRenorm(C, r_max=1.5, d_max=0.5, warmup_steps=2)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    bn_vars = variables
    for step in range(4):
        x, _ = data(step, shape, seed=3)
        y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        stats = variables["batch_stats"]
        if step < 2:
            expected, bn_updates = BatchNorm(C).apply(
                bn_vars, x, train=True, mutable=["batch_stats"]
            )
            np.testing.assert_allclose(y, expected, atol=1e-6)
            bn_vars = {**bn_vars, **bn_updates}
        else:
            expected = F.batch_renorm(
                x, stats["mean"], stats["var"], training=True, r_max=1.5, d_max=0.5
            )[0]
            np.testing.assert_allclose(y, expected, atol=1e-6)
            plain = BatchNorm(C).apply(variables, x, train=True, mutable=["batch_stats"])[0]
            assert float(jnp.abs(y - plain).max()) > 0.1
        variables = {**variables, **updates}


def test_paper_schedule_values():
    r, d = renorm_schedule(0)
    assert (float(r), float(d)) == (1.0, 0.0)
    r, d = renorm_schedule(5000)
    assert (float(r), float(d)) == (1.0, 0.0)
    r, d = renorm_schedule(15000)  # 10k of 35k towards 3; 10k of 20k towards 5
    np.testing.assert_allclose([float(r), float(d)], [1 + 2 * 10 / 35, 2.5], rtol=1e-6)
    r, d = renorm_schedule(10**6)
    assert (float(r), float(d)) == (3.0, 5.0)


def test_per_call_clipping_is_traced_no_retrace_when_the_schedule_moves():
    shape = (4, 2, C)
    model = BatchRenorm(C)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    variables["batch_stats"]["mean"] = jnp.full((C,), 0.5)
    traces = []

    @jax.jit
    def step(variables, x, count):
        traces.append(None)
        r_max, d_max = renorm_schedule(count, warmup_steps=10, r_max_steps=30, d_max_steps=20)
        return model.apply(
            variables, x, train=True, r_max=r_max, d_max=d_max, mutable=["batch_stats"]
        )[0]

    x, _ = data(0, shape, seed=4)
    for count in (0, 15, 40):
        r_max, d_max = renorm_schedule(count, warmup_steps=10, r_max_steps=30, d_max_steps=20)
        expected = model.apply(
            variables,
            x,
            train=True,
            r_max=float(r_max),
            d_max=float(d_max),
            mutable=["batch_stats"],
        )[0]
        np.testing.assert_allclose(step(variables, x, count), expected, atol=1e-6)
    assert len(traces) == 1


def test_sync_equals_one_device_on_the_concatenated_batch():
    n, shape = 4, (12, 2, C)
    model = BatchRenorm(C, r_max=1.5, d_max=0.5, axis_name="batch")
    single = BatchRenorm(C, r_max=1.5, d_max=0.5)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    variables["params"] = {"scale": jnp.linspace(0.5, 2.0, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    x, g = data(0, shape, seed=5)
    y, dx, dparams, stats = bn_train_step(single, variables, x, g)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0, 0))
    def per_device(variables, x, g):
        y, dx, dparams, stats = bn_train_step(model, variables, x, g)
        return y, dx, jax.lax.psum(dparams, "batch"), stats

    split = lambda a: a.reshape(n, -1, *a.shape[1:])
    p_y, p_dx, p_dparams, p_stats = per_device(variables, split(x), split(g))
    np.testing.assert_allclose(p_y.reshape(x.shape), y, atol=2e-6)
    np.testing.assert_allclose(p_dx.reshape(x.shape), dx, atol=2e-6)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(p_dparams[k][0], dparams[k], atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(p_stats[k][0], stats[k], atol=1e-6)
        np.testing.assert_allclose(p_stats[k][0], p_stats[k][-1])

    # jaxbn.sync_batch_norm syncs a BatchRenorm without an axis_name in the same way
    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0, 0))
    @sync_batch_norm("batch")
    def switched(variables, x, g):
        return bn_train_step(single, variables, x, g)[0]

    np.testing.assert_allclose(
        switched(variables, split(x), split(g)).reshape(x.shape), y, atol=2e-6
    )


def test_half_precision_in_bfloat16_out_statistics_in_float32():
    x, _ = data(0, (8, C))
    model = BatchRenorm(C, r_max=1.5, d_max=0.5)
    variables = model.init(jax.random.key(0), x, train=False)
    y16, upd = model.apply(variables, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
    y32 = model.apply(
        variables, x.astype(jnp.bfloat16).astype(jnp.float32), train=True, mutable=["batch_stats"]
    )[0]
    assert y16.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"r_max": 0.5}, ValueError, "r_max must be >= 1, got 0.5"),
        ({"d_max": -1.0}, ValueError, "d_max must be >= 0, got -1.0"),
        ({"update_rule": "tf"}, ValueError, "update_rule must be 'torch' or 'keras', got 'tf'"),
        ({"r_max": "3"}, TypeError, "r_max must be a float"),
    ],
)
def test_bad_fields_are_refused_when_the_module_is_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        BatchRenorm(C, **kwargs)


def test_functional_needs_running_statistics():
    with pytest.raises(ValueError, match="batch_renorm needs running_mean and running_var"):
        F.batch_renorm(jnp.ones((4, C)), None, None, training=True)


def test_a_keras_style_momentum_warns():
    from jaxbn.linen.batch_norm import MomentumConventionWarning

    with pytest.warns(MomentumConventionWarning, match="Keras's momentum=0.99 is jaxbn's 0.01"):
        BatchRenorm(C, momentum=0.99)
