"""A named ``jax.vmap`` axis syncs batch norm exactly like pmap: torch's BatchNorm on the
concatenated batch is the oracle; and a synced model initializes outside any mapped axis."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn
from tests.parity_report import assert_close
from tests.test_sync_batch_norm import (
    TOL,
    C,
    make_variables,
    normal,
    pmapped_step,
    shard,
    torch_step,
    torch_twin,
    train_step,
)
from tests.torch_twins import to_jax, to_numpy


def vmapped_step(model, sync_switch=False):
    """vmap of train_step over a named axis; parameters unmapped, so their gradients arrive
    summed over the members (vmap's transpose of a broadcast)."""

    def loss(params, variables, x, g, mask):
        def member(x, g, mask):
            y, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"], mask=mask
            )
            return jnp.sum(jnp.where(mask, y * g, 0)), (y, updates["batch_stats"])

        if sync_switch:
            member = jaxbn.sync_batch_norm("batch")(member)
        losses, aux = jax.vmap(member, axis_name="batch")(x, g, mask)
        return jnp.sum(losses), aux

    def step(variables, x, g, mask):
        (dparams, dx), (y, stats) = jax.grad(loss, (0, 2), has_aux=True)(
            variables["params"], variables, x, g, mask
        )
        return y, dx, dparams, stats

    return jax.jit(step)


def test_vmap_sync_with_uneven_masks_and_an_empty_member_equals_torch_on_the_selected_rows():
    model = jaxbn.BatchNorm2d(C, axis_name="batch")
    variables = make_variables(model, jnp.zeros((2, 3, 3, C)))
    kept_per_member = [4, 1, 3, 0]
    gen = torch.Generator().manual_seed(11)
    x_t = torch.randn(16, C, 3, 3, generator=gen) * 2 + 1
    g_t = torch.randn(16, C, 3, 3, generator=gen)
    keep = np.concatenate([np.arange(4) < k for k in kept_per_member])
    tm = torch_twin()
    y_t, dx_t, dw_t, db_t = torch_step(tm, x_t[keep], g_t[keep])
    x = to_jax(x_t, True).at[~keep].set(jnp.nan)  # masked slots hold garbage
    mask = jnp.broadcast_to(jnp.asarray(keep)[:, None, None, None], x.shape)

    y, dx, dparams, stats = vmapped_step(model)(
        variables, shard(x, 4), shard(to_jax(g_t, True), 4), shard(mask, 4)
    )
    y, dx = y.reshape(16, 3, 3, C), dx.reshape(16, 3, 3, C)
    group = "sync vmap uneven masks"
    assert_close(f"{group} y", to_numpy(y[keep], True), y_t, TOL, TOL)
    assert_close(f"{group} dx", to_numpy(dx[keep], True), dx_t, TOL, TOL)
    np.testing.assert_array_equal(dx[~keep], 0)
    assert_close(f"{group} dscale", dparams["scale"], dw_t, TOL, TOL)
    assert_close(f"{group} dbias", dparams["bias"], db_t, TOL, TOL)
    for member in range(4):  # every member holds the global statistics, global n - 1
        assert_close(f"{group} running_mean", stats["mean"][member], tm.running_mean, TOL, TOL)
        assert_close(f"{group} running_var", stats["var"][member], tm.running_var, TOL, TOL)


def test_vmap_sync_with_one_row_per_member_equals_torch_on_the_full_batch():
    model = jaxbn.BatchNorm1d(C, axis_name="batch")
    variables = make_variables(model, jnp.zeros((2, C)))
    x_t = torch.randn(8, C, generator=torch.Generator().manual_seed(3)) * 3
    g_t = torch.randn(8, C, generator=torch.Generator().manual_seed(4))
    tm = torch.nn.BatchNorm1d(C)
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.5, 2.0, C))
        tm.bias.copy_(torch.linspace(-1.0, 1.0, C))
    y_t, dx_t, _, _ = torch_step(tm, x_t, g_t)
    mask = jnp.ones((8, 1, C), bool)
    y, dx, _, stats = vmapped_step(model)(
        variables, jnp.asarray(x_t.numpy())[:, None], jnp.asarray(g_t.numpy())[:, None], mask
    )
    assert_close("sync vmap one row y", y.reshape(8, C), y_t, TOL, TOL)
    assert_close("sync vmap one row dx", dx.reshape(8, C), dx_t, TOL, TOL)
    assert_close("sync vmap one row running_var", stats["var"][0], tm.running_var, TOL, TOL)


def test_vmap_sync_equals_pmap_sync_and_the_switch_equals_the_field():
    synced, plain = jaxbn.BatchNorm2d(C, axis_name="batch"), jaxbn.BatchNorm2d(C)
    variables = make_variables(plain, jnp.zeros((2, 3, 3, C)))
    x = normal(5, (4, 3, 3, 3, C)) * 2 + 1
    g = normal(6, x.shape)
    mask = jnp.ones(x.shape, bool)
    by_pmap = pmapped_step(synced, 4)(variables, x, g, mask)
    by_field = vmapped_step(synced)(variables, x, g, mask)
    by_switch = vmapped_step(plain, sync_switch=True)(variables, x, g, mask)
    for ours in (by_field, by_switch):
        np.testing.assert_allclose(ours[0], by_pmap[0], rtol=1e-5, atol=1e-5)  # y
        np.testing.assert_allclose(ours[1], by_pmap[1], rtol=1e-5, atol=1e-5)  # dx
        for key in ("scale", "bias"):  # pmap's are psummed and replicated
            np.testing.assert_allclose(ours[2][key], by_pmap[2][key][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[3]["var"], by_pmap[3]["var"], rtol=1e-6, atol=1e-6)


def test_vmap_sync_continues_training_from_an_unsynced_checkpoint():
    # Two steps on one device over the whole batch, then two synced steps over 4 members:
    # the same as four steps on the whole batch.
    model = jaxbn.BatchNorm2d(C, axis_name="batch")
    plain = jaxbn.BatchNorm2d(C)
    batches = [normal(i, (16, 3, 3, C)) * (i + 1) for i in range(4)]
    variables = make_variables(plain, batches[0])
    reference = variables
    g = jnp.ones_like(batches[0])
    for batch in batches:
        stats = train_step(plain, reference, batch, g)[3]
        reference = {**reference, "batch_stats": stats}
    for batch in batches[:2]:
        variables = {**variables, "batch_stats": train_step(plain, variables, batch, g)[3]}
    for batch in batches[2:]:
        stats = vmapped_step(model)(
            variables, shard(batch, 4), shard(g, 4), jnp.ones((4, 4, 3, 3, C), bool)
        )[3]
        variables = {**variables, "batch_stats": jax.tree.map(lambda a: a[0], stats)}
    for key in ("mean", "var"):
        np.testing.assert_allclose(
            variables["batch_stats"][key], reference["batch_stats"][key], rtol=1e-5, atol=1e-6
        )
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 4


def test_a_synced_model_initializes_in_training_mode_outside_any_mapped_axis():
    synced = jaxbn.BatchNorm2d(C, axis_name="batch")
    x = normal(0, (1, 8, 8, C))  # one row, as on one device
    variables = synced.init(jax.random.key(1), x, train=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], jnp.zeros(C))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], jnp.ones(C))
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0


class _SharedTwice(nn.Module):
    """One synced batch norm instance applied twice (weight sharing)."""

    def setup(self):
        self.norm = jaxbn.BatchNorm2d(C, axis_name="batch")

    def __call__(self, x, *, train):
        return self.norm(self.norm(x, train=train), train=train)


def test_init_of_a_batch_norm_called_twice_counts_no_step_and_skips_the_collective():
    x = normal(0, (2, 3, 3, C)) + 5
    variables = _SharedTwice().init(jax.random.key(1), x, train=True)
    stats = variables["batch_stats"]["norm"]
    assert int(stats["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(stats["mean"], jnp.zeros(C))


def test_nested_vmaps_sync_over_both_axis_names_like_one_device():
    model = jaxbn.BatchNorm1d(C, axis_name=("outer", "inner"))
    x = normal(0, (2, 3, 4, C)) * 3 + 1  # 2 × 3 members of 4 rows
    variables = model.init(jax.random.key(1), x[0, 0], train=False)

    def member(x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    y, updates = jax.vmap(jax.vmap(member, axis_name="inner"), axis_name="outer")(x)
    flat = np.asarray(x).reshape(-1, C)
    expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C), expected, rtol=1e-5, atol=1e-5)
    running_var = 0.9 + 0.1 * flat.var(0, ddof=1)
    np.testing.assert_allclose(updates["batch_stats"]["var"][1, 2], running_var, rtol=1e-6)
