"""The Equinox issue tracker's batch norm cases, each with jaxbn.equinox: double vmap with two
names (#49, #935) and with one name (#707), higher-rank inputs (#592), a static axis_name so
that the model moves through ``device_put`` and ``pmap`` (#1074), ``lax.scan`` (#237),
``eqx.filter_jit``/``eqx.filter_grad``, ``eqx.tree_serialise_leaves`` — and uneven batches
(a mask under vmap, uneven shards under pmap and shard_map). torch is the oracle."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.equinox as jbn

C = 3


def torch_train(x, steps=1, dims=None):
    """torch BatchNorm (momentum 0.1) trained on the [N, C, ...] batch ``x`` ``steps`` times:
    (output of the last step, running_mean, running_var)."""
    x = torch.tensor(np.asarray(x))
    bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}.get(
        x.ndim, torch.nn.BatchNorm3d
    )(C, dtype=x.dtype)
    for _ in range(steps):
        y = bn(x)
    return y.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy()


def assert_matches_torch(y, stats, ref, atol=2e-5):
    np.testing.assert_allclose(y, ref[0], atol=atol)
    np.testing.assert_allclose(stats.mean, ref[1], atol=atol)
    np.testing.assert_allclose(stats.var, ref[2], atol=atol)


def data(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2 + 1, jnp.float32)


def make(cls=jbn.BatchNorm, **kwargs):
    return eqx.nn.make_with_state(cls)(C, inference=False, **kwargs)


def test_double_vmap_with_two_names_takes_statistics_over_both():
    # Equinox #49/#935: [S, N, C] with BatchNorm(axis_name=("samples", "batch"))
    bn, state = make(axis_name=("samples", "batch"))
    x = data(2, 4, C)
    inner = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, state = jax.vmap(inner, axis_name="samples", in_axes=(0, None), out_axes=(0, None))(x, state)
    y_ref, *stats_ref = torch_train(x.reshape(8, C))
    assert_matches_torch(y.reshape(8, C), state.get(bn.state_index), (y_ref, *stats_ref))


def test_double_vmap_with_one_name_gives_each_outer_member_its_own_batch_and_state():
    # Equinox #707: the inner vmap binds the name (JAX's rule), so each of the S outer members
    # is a batch of its own, with its own running statistics (state out_axes=0 outside).
    bn, state = make(axis_name="batch")
    x = data(2, 4, C)
    inner = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, states = jax.vmap(inner, axis_name="batch", in_axes=(0, None), out_axes=(0, 0))(x, state)
    stats = states.get(bn.state_index)
    for s in range(2):
        y_ref, mean_ref, var_ref = torch_train(x[s])
        np.testing.assert_allclose(y[s], y_ref, atol=2e-5)
        np.testing.assert_allclose(stats.mean[s], mean_ref, atol=2e-5)
        np.testing.assert_allclose(stats.var[s], var_ref, atol=2e-5)


def test_double_vmap_of_an_ensemble_without_a_name_outside_keeps_a_state_per_member():
    # Equinox #707 as written there: an outer vmap over samples (no name) of the batch vmap;
    # the state varies over the outer axis, so it is mapped there (in_axes=0, out_axes=0).
    bn, state = make(axis_name="batch")
    states = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    x = data(2, 4, C, seed=1)
    inner = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, states = jax.vmap(inner, in_axes=(0, 0), out_axes=(0, 0))(x, states)
    for s in range(2):
        y_ref, mean_ref, _ = torch_train(x[s])
        np.testing.assert_allclose(y[s], y_ref, atol=2e-5)
        np.testing.assert_allclose(states.get(bn.state_index).mean[s], mean_ref, atol=2e-5)


@pytest.mark.parametrize("shape", [(6, C, 5), (6, C, 4, 3), (6, C, 2, 3, 2)])
def test_higher_rank_examples_per_example_match_torch(shape):
    # Equinox #592: [N, C, L], [N, C, H, W], [N, C, D, H, W] through a per-example vmap
    bn, state = make(axis_name="batch")
    x = data(*shape)
    y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    assert_matches_torch(y, state.get(bn.state_index), torch_train(x))


def test_the_model_has_no_string_leaves_so_device_put_replicates_it():
    # Equinox #1074: axis_name was a pytree leaf, and device_put_replicated refused the string
    model, _ = make(cls=jbn.BatchNorm2d, axis_name="devices")
    assert not any(isinstance(leaf, str) for leaf in jax.tree.leaves(model))
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    params, static = eqx.partition(model, eqx.is_array)
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    assert eqx.combine(replicated, static).axis_name == "devices"
    assert replicated.weight.sharding.is_fully_replicated


def test_pmap_over_uneven_shards_matches_torch_on_the_selected_rows():
    # 4 devices, 2 rows each, 5 rows count: devices hold 2, 1, 0, 2 of them
    model, state = make(axis=1, axis_name="devices")
    params, static = eqx.partition(model, eqx.is_array)
    x = data(8, C, 3)
    mask = jnp.array([1, 1, 1, 0, 0, 0, 1, 1], bool)

    def step(params, state, x, mask):
        bn = eqx.combine(params, static)
        return bn(x, state, mask=mask[:, None, None])

    # the state goes in as an argument: a closed-over one would be refused by State.set (its
    # values carry no sharding, the new ones pmap's)
    y, new_state = jax.pmap(step, axis_name="devices", in_axes=(None, None, 0, 0))(
        params, state, x.reshape(4, 2, C, 3), mask.reshape(4, 2)
    )
    keep = np.asarray(mask)
    y_ref, *stats_ref = torch_train(x[keep])
    np.testing.assert_allclose(y.reshape(8, C, 3)[keep], y_ref, atol=2e-5)
    assert np.all(np.asarray(y.reshape(8, C, 3))[~keep] == 0)
    stats = new_state.get(model.state_index)
    for d in range(4):  # every device holds the same, global, statistics
        np.testing.assert_allclose(stats.mean[d], stats_ref[0], atol=2e-5)
        np.testing.assert_allclose(stats.var[d], stats_ref[1], atol=2e-5)


def test_shard_map_over_uneven_shards_matches_torch_on_the_selected_rows():
    model, state = make(axis=1, axis_name="d")
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    x = data(8, C, 2, seed=2)
    mask = jnp.array([1, 0, 0, 0, 1, 1, 1, 0], bool)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P()))
    def step(state, x, mask):
        y, state = model(x, state, mask=mask[:, None, None])
        return y, state

    y, new_state = step(state, x, mask)
    keep = np.asarray(mask)
    assert_matches_torch(
        np.asarray(y)[keep], new_state.get(model.state_index), torch_train(x[keep])
    )


def test_an_uneven_batch_per_example_through_a_mask_matches_torch_on_the_selected_rows():
    bn, state = make(cls=jbn.BatchNorm1d, axis_name="batch")
    x = data(6, C, 4, seed=3).at[4:].set(jnp.nan)  # padding may hold anything
    mask = jnp.array([1, 1, 1, 1, 0, 0], bool)
    y, state = jax.vmap(lambda x, m: bn(x, state, mask=m), axis_name="batch", out_axes=(0, None))(
        x, mask
    )
    assert_matches_torch(y[:4], state.get(bn.state_index), torch_train(x[:4]))
    assert np.all(np.asarray(y[4:]) == 0)


def test_scan_over_steps_carries_the_state_like_a_python_loop_and_torch():
    # Equinox #237: "Cannot get state before it has been set" inside a scan
    bn, state = make(axis_name="batch")
    xs = data(3, 5, C, seed=4)
    per_example = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))

    def body(state, x):
        y, state = per_example(x, state)
        return state, y

    final, ys = jax.lax.scan(body, state, xs)
    ref = torch.nn.BatchNorm1d(C)
    for t in range(3):
        y_ref = ref(torch.tensor(np.asarray(xs[t]))).detach().numpy()
        np.testing.assert_allclose(ys[t], y_ref, atol=2e-5)
    stats = final.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, ref.running_mean.numpy(), atol=2e-5)
    np.testing.assert_allclose(stats.var, ref.running_var.numpy(), atol=2e-5)
    assert int(stats.num_batches_tracked) == 3


def test_filter_jit_and_filter_grad_give_torchs_parameter_gradients():
    bn, state = make(axis_name="batch")
    x = data(5, C, seed=5)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(bn, x):
        y, _ = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
        return jnp.sum(y**3)

    g = grads(bn, x)
    ref = torch.nn.BatchNorm1d(C)
    (ref(torch.tensor(np.asarray(x))) ** 3).sum().backward()
    np.testing.assert_allclose(g.weight, ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.bias, ref.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_tree_serialise_leaves_round_trips_the_model_and_its_running_statistics(tmp_path):
    bn, state = make(cls=jbn.BatchNorm1d, axis_name="batch")
    per_example = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    _, state = per_example(data(4, C, seed=6), state)
    eqx.tree_serialise_leaves(tmp_path / "model.eqx", (bn, state))
    fresh = make(cls=jbn.BatchNorm1d, axis_name="batch")
    bn2, state2 = eqx.tree_deserialise_leaves(tmp_path / "model.eqx", fresh)
    stats, stats2 = state.get(bn.state_index), state2.get(bn2.state_index)
    assert int(stats2.num_batches_tracked) == 1
    np.testing.assert_array_equal(stats2.mean, stats.mean)
    np.testing.assert_array_equal(stats2.var, stats.var)
    x = data(4, C, seed=7)
    evaluate = lambda m, s: jax.vmap(eqx.nn.inference_mode(m), in_axes=(0, None))(x, s)[0]
    np.testing.assert_array_equal(evaluate(bn2, state2), evaluate(bn, state))


def test_per_example_inside_shard_map_syncs_over_devices_and_examples():
    # the multi-device Equinox idiom: vmap(axis_name="batch") per shard, axis_name=(d, batch).
    # check_vma=False: jax 0.10 asserts on any collective over a vmap axis inside a checked
    # shard_map (eqx.nn.BatchNorm's pmean too)
    bn, state = make(cls=jbn.BatchNorm1d, axis_name=("d", "batch"))
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    x = data(8, C, 3, seed=8)
    per_example = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P()), check_vma=False)
    def step(state, x):
        return per_example(x, state)

    y, state = step(state, x)
    assert_matches_torch(y, state.get(bn.state_index), torch_train(x))


def test_one_filter_jit_function_traced_in_either_mode_order_keeps_both():
    bn, state = make(axis_name="batch")
    x = data(4, C, seed=9)

    @eqx.filter_jit
    def call(bn, state):
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    y_eval, _ = call(eqx.nn.inference_mode(bn), state)  # eval traced first
    y_train, new_state = call(bn, state)
    np.testing.assert_allclose(y_eval, np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert_matches_torch(y_train, new_state.get(bn.state_index), torch_train(x))


def remat_gradients(outside: bool):
    """filter_grad of a per-example loss, plain and with filter_checkpoint around the
    per-example layer (``outside=False``) or around the whole vmap (``outside=True``)."""
    bn, state = make(axis_name="batch")
    x = data(5, C, seed=10)
    leaves, treedef = jax.tree.flatten(state)  # a fresh state per call: set() consumes one

    def loss(bn, remat):
        one = lambda bn, x: bn(x, jax.tree.unflatten(treedef, leaves))[0]
        if remat and not outside:
            one = eqx.filter_checkpoint(one)
        call = lambda bn, x: jax.vmap(one, axis_name="batch", in_axes=(None, 0))(bn, x)
        if remat and outside:
            call = eqx.filter_checkpoint(call)
        return jnp.sum(call(bn, x) ** 3)

    plain = eqx.filter_grad(lambda bn: loss(bn, False))(bn)
    return plain, eqx.filter_grad(lambda bn: loss(bn, True))(bn)


def test_filter_checkpoint_of_the_per_example_layer_gives_the_same_gradients():
    plain, remat = remat_gradients(outside=False)
    np.testing.assert_allclose(remat.weight, plain.weight, rtol=1e-6)
    np.testing.assert_allclose(remat.bias, plain.bias, rtol=1e-6)


def test_filter_checkpoint_around_the_named_vmap_gives_the_same_gradients():
    plain, remat = remat_gradients(outside=True)
    np.testing.assert_allclose(remat.weight, plain.weight, rtol=1e-6)
    np.testing.assert_allclose(remat.bias, plain.bias, rtol=1e-6)
