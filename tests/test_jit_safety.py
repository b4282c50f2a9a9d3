"""No result depends on which call traced a jitted function first: ``update_bn`` reads the
batch statistics as data, and the ``sync_batch_norm`` switch is part of jit's cache key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

C = 3


def normal(seed, shape):
    """float32 N(0, 1) data from numpy (JAX's generator compiles for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def batches():
    return [normal(i, (6, C)) * (i + 1) + i for i in range(4)]


def plain_average(batches):
    """torch.optim.swa_utils.update_bn's result: equal-weight average of batch statistics."""
    mean = sum(np.asarray(b).mean(0) for b in batches) / len(batches)
    var = sum(np.asarray(b).var(0, ddof=1) for b in batches) / len(batches)
    return mean, var


def momentum_steps(batches, momentum=0.1):
    mean, var = np.zeros(C), np.ones(C)
    for b in batches:
        b = np.asarray(b)
        mean = (1 - momentum) * mean + momentum * b.mean(0)
        var = (1 - momentum) * var + momentum * b.var(0, ddof=1)
    return mean, var


def jitted_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def train_on(apply_fn, variables, batches):
    for b in batches:
        _, updates = apply_fn(variables, b, train=True, mutable=("batch_stats",))
        variables = {**variables, **updates}
    return variables


@pytest.mark.parametrize("first", ["training", "update_bn"])
def test_update_bn_and_training_share_a_jitted_apply_in_either_order(first):
    model = jaxbn.BatchNorm1d(C)
    apply_fn = jitted_apply(model)
    data = batches()
    variables = model.init(jax.random.key(0), data[0], train=False)
    if first == "training":
        trained = train_on(apply_fn, variables, data)
        recalibrated = jaxbn.update_bn(apply_fn, variables, data)
    else:
        recalibrated = jaxbn.update_bn(apply_fn, variables, data)
        trained = train_on(apply_fn, variables, data)
    mean, var = plain_average(data)
    np.testing.assert_allclose(recalibrated["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recalibrated["batch_stats"]["var"], var, rtol=1e-5, atol=1e-6)
    mean, var = momentum_steps(data)  # training keeps the module's momentum 0.1
    np.testing.assert_allclose(trained["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained["batch_stats"]["var"], var, rtol=1e-5, atol=1e-6)


def test_update_bn_counts_every_call_of_a_shared_batch_norm():
    model = jaxbn.BatchNorm1d(C)
    data = batches()[:2]
    variables = model.init(jax.random.key(0), data[0], train=False)

    def apply_fn(variables, x, **kwargs):  # the same BN on x, then on 2x
        def both(module, x):
            return module(x, train=True) + module(2 * x, train=True)

        kwargs.pop("train")
        return model.apply(variables, x, method=both, **kwargs)

    updated = jaxbn.update_bn(apply_fn, variables, data)
    seen = [data[0], 2 * data[0], data[1], 2 * data[1]]
    mean, var = plain_average(seen)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], var, rtol=1e-5, atol=1e-5)
    assert int(updated["batch_stats"]["num_batches_tracked"]) == 4


def test_update_bn_refuses_an_apply_fn_that_drops_the_reported_statistics():
    model = jaxbn.BatchNorm1d(C)
    data = batches()
    variables = model.init(jax.random.key(0), data[0], train=False)
    fixed = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))

    def apply_fn(variables, x, **_):
        return fixed(variables, x)

    with pytest.raises(ValueError, match="trained but reported no batch statistics"):
        jaxbn.update_bn(apply_fn, variables, data)


def test_training_with_mutable_true_does_not_grow_a_report_collection():
    model = jaxbn.BatchNorm1d(C)
    x = batches()[0]
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=True)
    assert "batch_moments" not in updates


@pytest.mark.parametrize("first", ["unsynced", "synced"])
def test_a_jitted_function_gives_synced_numbers_only_inside_the_switch_in_either_order(first):
    model = jaxbn.BatchNorm1d(C)
    x = normal(0, (4, 5, C)) + jnp.arange(4.0)[:, None, None]
    variables = model.init(jax.random.key(1), x[0], train=False)

    @jax.jit
    def forward(variables, x):  # traced once per switch state, not once for both
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    def run(synced):
        def member(x):
            if synced:
                with jaxbn.sync_batch_norm("batch"):
                    return forward(variables, x)
            return forward(variables, x)

        return jax.vmap(member, axis_name="batch")(x)

    order = [False, True] if first == "unsynced" else [True, False]
    results = {synced: run(synced) for synced in order}
    flat = x.reshape(-1, C)
    global_y = (flat - flat.mean(0)) / jnp.sqrt(flat.var(0) + 1e-5)
    local_y = (x - x.mean(1, keepdims=True)) / jnp.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(results[True].reshape(-1, C), global_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results[False], local_y, rtol=1e-4, atol=1e-5)
