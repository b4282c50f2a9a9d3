"""jaxbn.nnx modules under NNX's transforms: count-weighted sync over nnx.vmap / nnx.shard_map
(torch on the concatenated batch as the oracle, the Linen module's numbers), nnx.scan over
layers, nnx.remat, an nnx.Optimizer step, nnx.split/merge and an orbax checkpoint."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.nnx
from tests.nnx_builders import build
from tests.parity_report import assert_close
from tests.test_sync_batch_norm import TOL, C, shard, torch_step, torch_twin
from tests.test_sync_vmap import vmapped_step
from tests.torch_twins import to_jax, to_numpy

BROADCAST = nnx.StateAxes({...: None})  # the model is not mapped: one copy, synced updates


def synced_bn():
    bn = jaxbn.nnx.BatchNorm2d(C, axis_name="batch")
    bn.scale[...] = jnp.asarray(np.linspace(0.5, 2.0, C, dtype=np.float32))
    bn.bias[...] = jnp.asarray(np.linspace(-1.0, 1.0, C, dtype=np.float32))
    bn.train()
    return bn


@nnx.jit
def vmapped_nnx_step(bn, x, g, mask):
    """x, g, mask: [members, rows, ...]; returns (y, dx, dbn); bn's statistics are updated."""

    def loss(bn, x):
        @nnx.vmap(in_axes=(BROADCAST, 0, 0, 0), axis_name="batch")
        def member(bn, x, g, mask):
            y = bn(x, mask=mask)
            return jnp.sum(jnp.where(mask, y * g, 0)), y

        losses, y = member(bn, x, g, mask)
        return jnp.sum(losses), y

    (dbn, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(bn, x)
    return y, dx, dbn


@pytest.mark.parametrize("members", [2, 4, 8])
def test_nnx_vmap_sync_with_uneven_masks_equals_torch_on_the_selected_rows(members):
    rows = 16 // members
    kept = [(3 * i + 1) % (rows + 1) for i in range(members)]  # uneven, some empty or full
    gen = torch.Generator().manual_seed(members)
    x_t = torch.randn(16, C, 3, 3, generator=gen) * 2 + 1
    g_t = torch.randn(16, C, 3, 3, generator=gen)
    keep = np.concatenate([np.arange(rows) < k for k in kept])
    tm = torch_twin()
    bn = synced_bn()
    group = f"nnx sync vmap {members}"
    for _ in range(2):
        y_t, dx_t, dw_t, db_t = torch_step(tm, x_t[keep], g_t[keep])
        x = np.array(to_jax(x_t, True))
        x[~keep] = np.nan  # masked slots hold garbage
        mask = np.broadcast_to(keep[:, None, None, None], x.shape)
        y, dx, dbn = vmapped_nnx_step(
            bn, shard(x, members), shard(to_jax(g_t, True), members), shard(mask, members)
        )
        y, dx = y.reshape(16, 3, 3, C), dx.reshape(16, 3, 3, C)
        assert_close(f"{group} y", to_numpy(y[keep], True), y_t, TOL, TOL)
        assert_close(f"{group} dx", to_numpy(dx[keep], True), dx_t, TOL, TOL)
        np.testing.assert_array_equal(dx[~keep], 0)
        assert_close(f"{group} dscale", dbn.scale[...], dw_t, TOL, TOL)
        assert_close(f"{group} dbias", dbn.bias[...], db_t, TOL, TOL)
        assert_close(f"{group} running_mean", bn.mean[...], tm.running_mean, TOL, TOL)
        assert_close(f"{group} running_var", bn.var[...], tm.running_var, TOL, TOL)
        assert int(bn.num_batches_tracked[...]) == int(tm.num_batches_tracked)
        x_t, g_t = x_t.flip(0), g_t.roll(3, 0)


def test_nnx_vmap_sync_gives_the_linen_modules_numbers():
    rng = np.random.default_rng(5)
    x = rng.normal(1, 2, (4, 4, 3, 3, C)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    mask = np.broadcast_to(rng.random((4, 4, 1, 1, 1)) < 0.6, x.shape)
    bn = synced_bn()
    linen = jaxbn.BatchNorm2d(C, axis_name="batch")
    variables = jaxbn.nnx.to_linen_variables(bn)
    y_l, dx_l, dp_l, stats_l = vmapped_step(linen)(variables, x, g, mask)
    y, dx, dbn = vmapped_nnx_step(bn, x, g, mask)
    np.testing.assert_array_equal(y, y_l)
    np.testing.assert_array_equal(dx, dx_l)
    np.testing.assert_array_equal(dbn.scale[...], dp_l["scale"])
    for key, value in jaxbn.nnx.to_linen_variables(bn)["batch_stats"].items():
        np.testing.assert_array_equal(value, stats_l[key][0])  # Linen returns one per member


def test_nnx_shard_map_sync_over_4_devices_equals_torch_on_the_full_batch():
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))

    @nnx.jit
    def step(bn, x, g):
        def loss(bn, x):
            @nnx.shard_map(
                mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=(P(), P("batch"))
            )
            def local(bn, x, g):
                y = bn(x)
                return jax.lax.psum(jnp.sum(y * g), "batch"), y

            return local(bn, x, g)

        (dbn, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(bn, x)
        return y, dx, dbn

    gen = torch.Generator().manual_seed(4)
    x_t = torch.randn(16, C, 3, 3, generator=gen) * 2 + 1
    g_t = torch.randn(16, C, 3, 3, generator=gen)
    tm, bn = torch_twin(), synced_bn()
    y_t, dx_t, dw_t, _ = torch_step(tm, x_t, g_t)
    y, dx, dbn = step(bn, to_jax(x_t, True), to_jax(g_t, True))
    group = "nnx sync shard_map 4"
    assert_close(f"{group} y", to_numpy(y, True), y_t, TOL, TOL)
    assert_close(f"{group} dx", to_numpy(dx, True), dx_t, TOL, TOL)
    assert_close(f"{group} dscale", dbn.scale[...], dw_t, TOL, TOL)
    assert_close(f"{group} running_var", bn.var[...], tm.running_var, TOL, TOL)


def test_the_sync_switch_syncs_nnx_batch_norms_without_an_axis_name():
    x = np.random.default_rng(1).normal(1, 2, (4, 4, 3, 3, C)).astype(np.float32)
    plain = jaxbn.nnx.BatchNorm2d(C)
    plain.train()

    @nnx.jit
    def forward(bn, x):
        @nnx.vmap(in_axes=(BROADCAST, 0), axis_name="batch")
        def member(bn, x):
            return bn(x)

        with jaxbn.sync_batch_norm("batch"):
            return member(bn, x)

    y = forward(plain, x)
    flat = np.asarray(x).reshape(-1, C)
    expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C), expected, rtol=2e-5, atol=2e-5)


# --- scan, remat, optimizer, split/merge, checkpoint ---------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.bn = jaxbn.nnx.BatchNorm1d(4)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


def test_nnx_scan_over_stacked_layers_equals_the_layers_one_by_one():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
        return Block(rngs)

    stack = build(lambda: make(nnx.Rngs(0)))
    stack.train()
    graphdef, state = nnx.split(stack)
    layers = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(3)]

    @nnx.jit
    def forward(stack, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def layer(block, x):
            return block(x)

        return layer(stack, x)

    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    y = forward(stack, x)
    expected = x
    one_layer = nnx.jit(lambda block, x: block(x))
    for block in layers:
        expected = one_layer(block, expected)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    for i, block in enumerate(layers):
        np.testing.assert_allclose(stack.bn.var[...][i], block.bn.var[...], rtol=1e-6)
        assert int(stack.bn.num_batches_tracked[...][i]) == 1


def test_nnx_remat_gives_the_same_gradients_and_statistics():
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)

    def run(remat):
        block = build(lambda: Block(nnx.Rngs(0)))
        block.train()

        def loss(block):
            forward = nnx.remat(lambda block, x: block(x)) if remat else (lambda b, x: b(x))
            return jnp.sum(forward(block, x) ** 2)

        grads = nnx.jit(nnx.grad(loss))(block)
        return grads, nnx.state(block, nnx.BatchStat)

    (g_remat, s_remat), (g_plain, s_plain) = run(True), run(False)
    for a, b in zip(
        jax.tree.leaves((g_remat, s_remat)), jax.tree.leaves((g_plain, s_plain)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_an_nnx_optimizer_step_equals_the_linen_models_optax_step():
    model = build(lambda: jaxbn.nnx.MLP(12, (8, 6), 3, rngs=nnx.Rngs(0)))
    linen = model.linen_twin()
    variables = jaxbn.nnx.to_linen_variables(model)
    tx = optax.sgd(0.1, momentum=0.9)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opt_state = tx.init(variables["params"])
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 8, 12)).astype(np.float32)
    labels = rng.integers(0, 3, (3, 8))

    @nnx.jit
    def nnx_step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def linen_step(variables, opt_state, x, labels):
        def loss_fn(params):
            logits, updates = linen.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        changes, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], changes)
        return loss, {"params": params, **updates}, opt_state

    for step in range(3):
        loss = nnx_step(model, optimizer, x[step], labels[step])
        loss_l, variables, opt_state = linen_step(variables, opt_state, x[step], labels[step])
        np.testing.assert_allclose(loss, loss_l, rtol=1e-6)
    ours = jaxbn.nnx.to_linen_variables(model)
    assert jax.tree.structure(ours) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(variables), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(ours["batch_stats"]["layers_1"]["num_batches_tracked"]) == 3


def test_split_merge_and_a_pure_jitted_step_keep_the_counter_an_integer():
    model = build(lambda: jaxbn.nnx.MLP(12, (8,), 3, rngs=nnx.Rngs(0)))
    model.train()
    graphdef, state = nnx.split(model)

    @jax.jit
    def pure_step(state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)
        return y, nnx.state(model)

    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    _, state = pure_step(state, x)
    _, state = pure_step(state, x)
    model = nnx.merge(graphdef, state)
    assert model.layers_1.num_batches_tracked[...].dtype == jnp.int32
    assert int(model.layers_1.num_batches_tracked[...]) == 2
    model.eval()
    run = nnx.jit(lambda model, x: model(x))
    np.testing.assert_array_equal(run(model, x), run(nnx.merge(*nnx.split(model)), x))


def test_an_orbax_checkpoint_of_nnx_state_restores_statistics_and_the_counter(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = build(lambda: jaxbn.nnx.MLP(12, (8,), 3, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    run = nnx.jit(lambda model, x, train: model(x, train=train), static_argnames="train")
    run(model, x, True)
    run(model, x * 2, True)
    _, state = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()

    fresh = nnx.eval_shape(lambda: jaxbn.nnx.MLP(12, (8,), 3, rngs=nnx.Rngs(1)))
    graphdef, abstract = nnx.split(fresh)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract))
    counter = restored.layers_1.num_batches_tracked[...]
    assert counter.dtype == jnp.int32 and int(counter) == 2
    np.testing.assert_array_equal(restored.layers_1.var[...], model.layers_1.var[...])
    np.testing.assert_array_equal(run(restored, x, False), run(model, x, False))


UNSYNCED_VMAP = re.escape(
    "jaxbn.nnx.BatchNorm1d is training under vmap (nnx.vmap) with running statistics that are "
    "not mapped, and no axis_name"
)


def test_a_training_batch_norm_under_nnx_vmap_without_axis_name_says_what_to_do():
    bn = jaxbn.nnx.BatchNorm1d(C)
    bn.train()
    x = jnp.arange(2 * 4 * C, dtype=jnp.float32).reshape(2, 4, C) ** 0.5

    @nnx.vmap(in_axes=(None, 0))
    def members(bn, x):
        return bn(x)

    with pytest.raises(ValueError, match=UNSYNCED_VMAP) as error:
        members(bn, x)
    assert "axis_name=" in str(error.value) and "in_axes=0, out_axes=0" in str(error.value)
    # the same inside a jitted gradient (JVP and jit tracers around the vmap's)
    with pytest.raises(ValueError, match=UNSYNCED_VMAP):
        nnx.jit(nnx.grad(lambda bn, x: jnp.sum(members(bn, x))))(bn, x)
    # eval under the same vmap is fine: nothing is written
    bn.eval()
    assert members(bn, x).shape == x.shape


def test_per_member_statistics_under_nnx_vmap_need_no_axis_name():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(_):
        return jaxbn.nnx.BatchNorm1d(C, use_running_average=False)

    bns = make(jnp.arange(2))

    @nnx.vmap(in_axes=(0, 0))
    def members(bn, x):
        return bn(x)

    x = jnp.stack([jnp.zeros((4, C)), jnp.ones((4, C))]) + jnp.arange(4.0)[None, :, None]
    members(bns, x)
    np.testing.assert_allclose(bns.mean[...], [[0.15] * C, [0.25] * C], rtol=1e-6)
    assert bns.num_batches_tracked[...].tolist() == [1, 1]
