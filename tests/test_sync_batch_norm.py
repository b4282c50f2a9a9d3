"""Synced batch norm across devices equals batch norm on the concatenated batch (torch as the
oracle): pmap, shard_map and sharded jit; uneven masks, empty and one-row shards, groups."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests.parity_report import assert_close
from tests.torch_twins import to_jax, to_numpy

C = 4
TOL = 2e-5


def normal(seed, shape):
    """float32 N(0, 1) data from numpy (JAX's generator compiles for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def make_variables(model, example):
    variables = model.init(jax.random.key(0), example, train=False)
    variables["params"]["scale"] = jnp.linspace(0.5, 2.0, C)
    variables["params"]["bias"] = jnp.linspace(-1.0, 1.0, C)
    return variables


def train_step(model, variables, x, g, mask=None):
    """One training forward/backward on this device's shard: (y, dx, dparams, batch_stats)."""

    def loss(params, x):
        y, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"], mask=mask
        )
        return jnp.sum(jnp.where(mask, y * g, 0) if mask is not None else y * g), (y, updates)

    (dparams, dx), (y, updates) = jax.grad(loss, (0, 1), has_aux=True)(variables["params"], x)
    return y, dx, dparams, updates["batch_stats"]


def torch_step(tm, x_t, g_t):
    x_t = x_t.clone().requires_grad_()
    tm.weight.grad = tm.bias.grad = None
    y_t = tm(x_t)
    (y_t * g_t).sum().backward()
    return y_t.detach(), x_t.grad, tm.weight.grad.clone(), tm.bias.grad.clone()


def torch_twin():
    tm = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.5, 2.0, C))
        tm.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return tm


def shard(a, n):
    return a.reshape((n, a.shape[0] // n, *a.shape[1:]))


def pmapped_step(model, n, sync_switch=False):
    """pmap of train_step over n devices; parameter gradients summed over devices."""

    def step(variables, x, g, mask=None):
        y, dx, dparams, stats = train_step(model, variables, x, g, mask)
        return y, dx, jax.lax.psum(dparams, "batch"), stats

    if sync_switch:
        step = jaxbn.sync_batch_norm("batch")(step)
    return jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0, 0), devices=jax.devices()[:n])


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_pmap_sync_equals_torch_batchnorm_on_the_full_batch_over_steps(devices):
    model = jaxbn.BatchNorm2d(C, axis_name="batch")
    tm = torch_twin()
    step = pmapped_step(model, devices)
    variables = make_variables(model, jnp.zeros((2, 3, 3, C)))
    gen = torch.Generator().manual_seed(devices)
    for _ in range(3):
        x_t = torch.randn(16, C, 3, 3, generator=gen) * 2 + 1
        g_t = torch.randn(16, C, 3, 3, generator=gen)
        y_t, dx_t, dw_t, db_t = torch_step(tm, x_t, g_t)
        y, dx, dparams, stats = step(
            variables, shard(to_jax(x_t, True), devices), shard(to_jax(g_t, True), devices), None
        )
        group = f"sync pmap {devices} devices"
        assert_close(f"{group} y", to_numpy(y.reshape(16, 3, 3, C), True), y_t, TOL, TOL)
        assert_close(f"{group} dx", to_numpy(dx.reshape(16, 3, 3, C), True), dx_t, TOL, TOL)
        assert_close(f"{group} dscale", dparams["scale"][0], dw_t, TOL, TOL)
        assert_close(f"{group} dbias", dparams["bias"][0], db_t, TOL, TOL)
        for leaf in jax.tree.leaves(stats):  # identical on every device
            assert bool(jnp.all(leaf == leaf[0]))
        stats = jax.tree.map(lambda a: a[0], stats)
        assert_close(f"{group} running_mean", stats["mean"], tm.running_mean, TOL, TOL)
        assert_close(f"{group} running_var", stats["var"], tm.running_var, TOL, TOL)
        assert int(stats["num_batches_tracked"]) == int(tm.num_batches_tracked)
        variables = {**variables, "batch_stats": stats}


def test_issue_example_running_stats_use_the_global_count():
    # arange(16).reshape(8, 2) over 4 devices of 2 rows: global mean [7, 8], unbiased var 24.
    x = jnp.arange(16.0).reshape(4, 2, 2)
    run = jax.pmap(
        lambda x: jaxbn.functional.batch_norm(
            x, jnp.zeros(2), jnp.ones(2), training=True, axis_name="d"
        )[1:],
        axis_name="d",
        devices=jax.devices()[:4],
    )
    mean, var = run(x)
    np.testing.assert_allclose(mean[0], [0.7, 0.8], rtol=1e-6)
    np.testing.assert_allclose(var[0], [3.3, 3.3], rtol=1e-6)


def test_the_sync_switch_equals_an_explicit_axis_name_and_keeps_the_variables_tree():
    synced, plain = jaxbn.BatchNorm2d(C, axis_name="batch"), jaxbn.BatchNorm2d(C)
    example = jnp.zeros((2, 3, 3, C))
    v_synced, v_plain = make_variables(synced, example), make_variables(plain, example)
    assert jax.tree.structure(v_synced) == jax.tree.structure(v_plain)
    x = normal(1, (4, 4, 3, 3, C))
    g = normal(2, (4, 4, 3, 3, C))
    explicit = pmapped_step(synced, 4)(v_synced, x, g, None)
    switched = pmapped_step(plain, 4, sync_switch=True)(v_plain, x, g, None)
    unsynced = pmapped_step(plain, 4)(v_plain, x, g, None)
    for a, b in zip(jax.tree.leaves(explicit), jax.tree.leaves(switched), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(unsynced[0], explicit[0])  # without the switch: per-device stats


def test_a_single_row_per_device_is_fine_when_the_global_count_exceeds_one():
    model = jaxbn.BatchNorm1d(C, axis_name="batch")
    variables = make_variables(model, jnp.zeros((2, C)))
    x_t, g_t = torch.randn(8, C) * 3, torch.randn(8, C)
    tm = torch.nn.BatchNorm1d(C)
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.5, 2.0, C))
        tm.bias.copy_(torch.linspace(-1.0, 1.0, C))
    y_t, dx_t, _, _ = torch_step(tm, x_t, g_t)
    step = jax.pmap(
        lambda v, x, g: train_step(model, v, x, g), axis_name="batch", in_axes=(None, 0, 0)
    )
    y, dx, _, stats = step(
        variables, jnp.asarray(x_t.numpy())[:, None], jnp.asarray(g_t.numpy())[:, None]
    )
    assert_close("sync one row per device y", y.reshape(8, C), y_t, TOL, TOL)
    assert_close("sync one row per device dx", dx.reshape(8, C), dx_t, TOL, TOL)
    assert_close("sync one row per device running_var", stats["var"][0], tm.running_var, TOL, TOL)


def test_a_single_value_in_total_is_still_refused():
    model = jaxbn.BatchNorm1d(C, axis_name="batch")
    variables = make_variables(model, jnp.zeros((2, C)))
    step = jax.pmap(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        axis_name="batch",
        in_axes=(None, 0),
        devices=jax.devices()[:1],
    )
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        step(variables, jnp.ones((1, 1, C)))


def test_uneven_masks_and_an_empty_shard_with_nan_equal_torch_on_the_selected_rows():
    model = jaxbn.BatchNorm2d(C, axis_name="batch")
    variables = make_variables(model, jnp.zeros((2, 3, 3, C)))
    kept_per_device = [4, 1, 3, 0]
    gen = torch.Generator().manual_seed(7)
    x_t = torch.randn(16, C, 3, 3, generator=gen) * 2 + 1
    g_t = torch.randn(16, C, 3, 3, generator=gen)
    keep = np.concatenate([np.arange(4) < k for k in kept_per_device])
    tm = torch_twin()
    y_t, dx_t, dw_t, db_t = torch_step(tm, x_t[keep], g_t[keep])
    x = to_jax(x_t, True).at[~keep].set(jnp.nan)  # masked slots hold garbage
    mask = jnp.asarray(keep)[:, None, None, None]

    step = pmapped_step(model, 4)
    y, dx, dparams, stats = step(
        variables, shard(x, 4), shard(to_jax(g_t, True), 4), shard(mask, 4)
    )
    y, dx = y.reshape(16, 3, 3, C), dx.reshape(16, 3, 3, C)
    for a in (y, dx, *jax.tree.leaves(dparams), *jax.tree.leaves(stats)):
        assert bool(jnp.all(jnp.isfinite(a)))
    group = "sync uneven masks"
    assert_close(f"{group} y", to_numpy(y[keep], True), y_t, TOL, TOL)
    assert_close(f"{group} dx", to_numpy(dx[keep], True), dx_t, TOL, TOL)
    np.testing.assert_array_equal(dx[~keep], 0)
    assert_close(f"{group} dscale", dparams["scale"][0], dw_t, TOL, TOL)
    assert_close(f"{group} dbias", dparams["bias"][0], db_t, TOL, TOL)
    assert_close(f"{group} running_mean", stats["mean"][0], tm.running_mean, TOL, TOL)
    assert_close(f"{group} running_var", stats["var"][0], tm.running_var, TOL, TOL)


def test_axis_index_groups_sync_each_group_separately():
    model = jaxbn.BatchNorm2d(C, axis_name="batch", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    variables = make_variables(model, jnp.zeros((2, 3, 3, C)))
    step = jax.pmap(
        lambda v, x, g: train_step(model, v, x, g), axis_name="batch", in_axes=(None, 0, 0)
    )
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(16, C, 3, 3, generator=gen) * 2 + 1
    g_t = torch.randn(16, C, 3, 3, generator=gen)
    y, dx, _, stats = step(variables, shard(to_jax(x_t, True), 8), shard(to_jax(g_t, True), 8))
    y, dx = y.reshape(16, 3, 3, C), dx.reshape(16, 3, 3, C)
    for half, device in ((slice(0, 8), 0), (slice(8, 16), 4)):
        tm = torch_twin()
        y_t, dx_t, _, _ = torch_step(tm, x_t[half], g_t[half])
        assert_close("sync groups y", to_numpy(y[half], True), y_t, TOL, TOL)
        assert_close("sync groups dx", to_numpy(dx[half], True), dx_t, TOL, TOL)
        assert_close("sync groups running_var", stats["var"][device], tm.running_var, TOL, TOL)


def test_a_synced_module_runs_in_eval_outside_any_mapped_axis():
    model = jaxbn.BatchNorm2d(C, axis_name="batch")
    variables = make_variables(model, jnp.zeros((2, 3, 3, C)))
    variables["batch_stats"]["mean"] = jnp.linspace(-1, 1, C)
    variables["batch_stats"]["var"] = jnp.linspace(0.5, 3, C)
    tm = torch_twin().eval()
    with torch.no_grad():
        tm.running_mean.copy_(torch.linspace(-1, 1, C))
        tm.running_var.copy_(torch.linspace(0.5, 3, C))
    x_t = torch.randn(5, C, 3, 3)
    y = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, to_jax(x_t, True))
    with torch.no_grad():
        assert_close("sync eval y", to_numpy(y, True), tm(x_t), TOL, TOL)


def test_pmap_shard_map_and_sharded_jit_give_the_same_numbers():
    n = 4
    synced, plain = jaxbn.BatchNorm2d(C, axis_name="batch"), jaxbn.BatchNorm2d(C)
    variables = make_variables(plain, jnp.zeros((2, 3, 3, C)))
    x = normal(1, (16, 3, 3, C)) * 2 + 1
    g = normal(2, (16, 3, 3, C))

    y_p, dx_p, dp_p, st_p = pmapped_step(synced, n)(variables, shard(x, n), shard(g, n), None)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)
    by_pmap = (y_p.reshape(x.shape), dx_p.reshape(x.shape), first(dp_p), first(st_p))

    mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))

    # shard_map types params as replicated, so their gradient arrives already summed.
    by_shard_map = jax.jit(
        jax.shard_map(
            functools.partial(train_step, synced),
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=(P("batch"), P("batch"), P(), P()),
        )
    )(variables, x, g)

    sharding = NamedSharding(mesh, P("batch"))
    by_jit = jax.jit(functools.partial(train_step, plain))(
        variables, jax.device_put(x, sharding), jax.device_put(g, sharding)
    )
    assert by_jit[0].sharding.spec == P("batch")  # really ran sharded
    for other in (by_shard_map, by_jit):
        for a, b in zip(jax.tree.leaves(by_pmap), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
