"""Frozen batch norm: the formula in float64; freeze_batch_norm against a torch model whose BNs
are in eval mode with requires_grad_(False) (outputs, gradients, optimizer steps); the variables
tree unchanged, and back with unfreeze_batch_norm."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxbn.linen.batch_norm import BatchNorm, BatchNorm1d
from jaxbn.linen.batch_renorm import BatchRenorm
from jaxbn.linen.frozen_batch_norm import FrozenBatchNorm
from jaxbn.linen.ghost_batch_norm import GhostBatchNorm
from jaxbn.tools.freeze import FrozenModel, freeze_batch_norm, unfreeze_batch_norm
from tests.parity_report import assert_close

C = 4


def trained_bn_variables(x):
    bn = BatchNorm(C)
    variables = bn.init(jax.random.key(0), x, train=False)
    variables["params"] = {"scale": jnp.linspace(0.5, 2.0, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    _, updates = bn.apply(variables, x * 3 + 1, train=True, mutable=["batch_stats"])
    return {**variables, **updates}


def test_the_formula_in_float64_in_train_and_eval():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(5, 3, C))
        mean, var = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
        scale, bias = rng.normal(size=C), rng.normal(size=C)
        variables = {
            "params": {"scale": scale, "bias": bias},
            "batch_stats": {"mean": mean, "var": var, "num_batches_tracked": np.int64(3)},
        }
        expected = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
        for train in (True, False):
            y = FrozenBatchNorm(C).apply(variables, jnp.asarray(x), train=train)
            assert y.dtype == jnp.float64
            np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)


def test_parameters_and_statistics_get_zero_gradient_and_x_the_affine_one():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, C)), jnp.float32)
    variables = trained_bn_variables(x)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(6, C)), jnp.float32)
    stats = variables["batch_stats"]

    def loss(floats, x):
        v = {"params": floats["params"], "batch_stats": {**stats, **floats["batch_stats"]}}
        return jnp.sum(FrozenBatchNorm(C).apply(v, x, train=True) * g)

    floats = {"params": variables["params"], "batch_stats": {k: stats[k] for k in ("mean", "var")}}
    dfloats, dx = jax.jit(jax.grad(loss, (0, 1)))(floats, x)
    for leaf in jax.tree.leaves(dfloats):
        np.testing.assert_array_equal(leaf, 0)
    stats, params = variables["batch_stats"], variables["params"]
    np.testing.assert_allclose(
        dx, g * params["scale"] / jnp.sqrt(stats["var"] + 1e-5), rtol=1e-6, atol=1e-7
    )


def test_a_batch_norm_checkpoint_loads_as_it_is_and_gives_batch_norm_eval():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, C)), jnp.float32)
    variables = trained_bn_variables(x)
    frozen_init = FrozenBatchNorm(C).init(jax.random.key(0), x)
    assert jax.tree.structure(frozen_init) == jax.tree.structure(variables)
    np.testing.assert_allclose(
        FrozenBatchNorm(C).apply(variables, x, train=True),
        BatchNorm(C).apply(variables, x, train=False),
        atol=1e-6,
    )


class Net(nn.Module):
    """dense → bn → relu → dense → bn → relu → dense."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(BatchNorm1d(C, name="bn1")(nn.Dense(C, name="fc1")(x), train=train))
        x = nn.relu(BatchNorm1d(C, name="bn2")(nn.Dense(C, name="fc2")(x), train=train))
        return nn.Dense(2, name="fc3")(x)


def torch_net():
    return torch.nn.Sequential(
        torch.nn.Linear(3, C),
        torch.nn.BatchNorm1d(C),
        torch.nn.ReLU(),
        torch.nn.Linear(C, C),
        torch.nn.BatchNorm1d(C),
        torch.nn.ReLU(),
        torch.nn.Linear(C, 2),
    )


@functools.cache
def net_and_variables():
    """Input, and a torch twin's weights with varied BN parameters and statistics as jaxbn
    variables (built by hand: no init to compile); shared, never mutated."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    tm = torch_net()
    with torch.no_grad():
        for bn in (tm[1], tm[4]):
            bn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, C)))
            bn.bias.copy_(torch.tensor(rng.normal(size=C)))
            bn.running_mean.copy_(torch.tensor(rng.normal(size=C)))
            bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, C)))
            bn.num_batches_tracked.fill_(5)
    a = lambda t: jnp.asarray(t.detach().numpy())
    params, stats = {}, {}
    for name, i in (("fc1", 0), ("fc2", 3), ("fc3", 6)):
        params[name] = {"kernel": a(tm[i].weight).T, "bias": a(tm[i].bias)}
    for name, i in (("bn1", 1), ("bn2", 4)):
        bn = tm[i]
        params[name] = {"scale": a(bn.weight), "bias": a(bn.bias)}
        stats[name] = {
            "mean": a(bn.running_mean),
            "var": a(bn.running_var),
            "num_batches_tracked": jnp.int32(5),
        }
    return x, {"params": params, "batch_stats": stats}, tm.state_dict()


def test_frozen_model_trains_like_torch_with_bns_in_eval_and_requires_grad_false():
    x, variables, state = net_and_variables()
    result = freeze_batch_norm(Net(), variables)
    model, frozen_vars = result
    assert result.frozen == ("bn1", "bn2")
    assert jax.tree.structure(frozen_vars) == jax.tree.structure(variables)

    tm = torch_net()
    tm.load_state_dict(state)
    tm.train()
    for bn in (tm[1], tm[4]):
        bn.eval()
        bn.requires_grad_(False)
    t_opt = torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    # torch's SGD: weight decay added to the gradient, then momentum; frozen: left alone
    sgd = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9))
    tx = optax.multi_transform(
        {"trainable": sgd, "frozen": optax.set_to_zero()}, result.param_labels
    )
    params = frozen_vars["params"]
    opt_state = tx.init(params)
    target = jnp.asarray(np.random.default_rng(6).normal(size=(6, 2)), jnp.float32)

    @jax.jit
    def step(params, opt_state, x):
        def loss(params, x):
            out, updates = model.apply(
                {**frozen_vars, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean((out - target) ** 2), (out, updates)

        (grads, dx), (out, updates) = jax.grad(loss, (0, 1), has_aux=True)(params, x)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), opt_state, out, grads, dx, updates

    group = "frozen model vs torch eval+requires_grad_(False)"
    for _ in range(3):
        x_t = torch.tensor(np.asarray(x)).requires_grad_()
        t_opt.zero_grad()
        out_t = tm(x_t)
        torch.mean((out_t - torch.tensor(np.asarray(target))) ** 2).backward()
        t_opt.step()
        params, opt_state, out, grads, dx, updates = step(params, opt_state, x)
        assert_close(group, out, out_t.detach().numpy(), 1e-5, 1e-5)
        assert_close(group, dx, x_t.grad.numpy(), 1e-4, 1e-6)
        assert_close(group, grads["fc1"]["kernel"], tm[0].weight.grad.numpy().T, 1e-4, 1e-6)
        for name, i in (("bn1", 1), ("bn2", 4)):
            np.testing.assert_array_equal(grads[name]["scale"], 0)
            np.testing.assert_array_equal(grads[name]["bias"], 0)
            assert tm[i].weight.grad is None and tm[i].bias.grad is None
        # nothing is updated in the frozen BNs' statistics
        for a, b in zip(
            jax.tree.leaves(updates["batch_stats"]),
            jax.tree.leaves(variables["batch_stats"]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)

    # after three optimizer steps (momentum and weight decay): BN parameters untouched,
    # the others equal torch's
    for name in ("bn1", "bn2"):
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(params[name][leaf], variables["params"][name][leaf])
    for name, i in (("fc1", 0), ("fc2", 3), ("fc3", 6)):
        assert_close(group, params[name]["kernel"], tm[i].weight.detach().numpy().T, 1e-5, 1e-6)
        assert_close(group, params[name]["bias"], tm[i].bias.detach().numpy(), 1e-5, 1e-6)
    for name, i in (("bn1", 1), ("bn2", 4)):
        np.testing.assert_array_equal(tm[i].weight.detach().numpy(), params[name]["scale"])


def test_unfreeze_gives_the_original_model_and_the_same_variables_back():
    x, variables, _ = net_and_variables()
    frozen_model, same = freeze_batch_norm(Net(), variables)
    assert isinstance(frozen_model, FrozenModel)
    np.testing.assert_array_equal(
        frozen_model.apply(same, x, train=True), Net().apply(variables, x, train=False)
    )
    result = unfreeze_batch_norm(frozen_model, same)
    model, back = result
    assert model == Net() and result.frozen == ()
    assert set(jax.tree.leaves(result.param_labels)) == {"trainable"}
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        assert a is b
    y, _ = model.apply(back, x, train=True, mutable=["batch_stats"])
    expected, _ = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, expected)


def test_where_freezes_only_the_selected_batch_norms():
    x, variables, _ = net_and_variables()
    result = freeze_batch_norm(Net(), variables, where=lambda path: path == "bn1")
    assert result.frozen == ("bn1",)
    labels = result.param_labels
    assert labels["bn1"] == {"scale": "frozen", "bias": "frozen"}
    assert labels["bn2"] == {"scale": "trainable", "bias": "trainable"}
    _, updates = result.model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(
        updates["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"]
    )
    assert int(updates["batch_stats"]["bn2"]["num_batches_tracked"]) == 6
    # freezing again grows the selection
    again = freeze_batch_norm(result.model, variables, where=lambda path: path == "bn2")
    assert again.frozen == ("bn1", "bn2")
    with pytest.raises(ValueError, match="where= selects none of the batch norms"):
        freeze_batch_norm(Net(), variables, where=lambda path: False)


def test_renorm_and_ghost_batch_norms_freeze_too():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = BatchRenorm(C, name="renorm")(x, train=train)
            return GhostBatchNorm(C, virtual_batch_size=2, name="ghost")(x, train=train)

    x = jnp.asarray(np.random.default_rng(7).normal(size=(4, C)), jnp.float32)
    variables = jax.jit(lambda x: Mixed().init(jax.random.key(0), x, train=False))(x)
    _, updates = jax.jit(lambda v, x: Mixed().apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    variables = {**variables, **updates}
    model, _ = freeze_batch_norm(Mixed(), variables)
    frozen = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    expected = jax.jit(lambda v, x: Mixed().apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(frozen, expected, atol=1e-6)


def test_a_batch_norm_without_running_statistics_cannot_be_frozen():
    class NoStats(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return BatchNorm(C, track_running_stats=False, name="bn")(x, train=train)

    x = jnp.ones((4, C))
    variables = NoStats().init(jax.random.key(0), x, train=False)
    model, _ = freeze_batch_norm(NoStats(), variables)
    with pytest.raises(ValueError, match="cannot freeze the batch norm at bn: it has no running"):
        model.apply(variables, x, train=True)


def test_a_frozen_batch_norm_runs_on_torchvision_buffers_without_a_counter():
    # torchvision's FrozenBatchNorm2d has weight, bias, running_mean, running_var: no counter,
    # and a constant needs none.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, C)), jnp.float32)
    variables = trained_bn_variables(x)
    stats = {k: v for k, v in variables["batch_stats"].items() if k != "num_batches_tracked"}
    without = {"params": variables["params"], "batch_stats": stats}
    got = FrozenBatchNorm(C).apply(without, x)
    expected = FrozenBatchNorm(C).apply(variables, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_a_batch_norm_without_a_counter_names_both_sources_and_their_conversions():
    x = jnp.ones((4, C))
    variables = trained_bn_variables(x)
    del variables["batch_stats"]["num_batches_tracked"]
    with pytest.raises(ValueError, match=r"from_flax_batch_norm.*or from PyTorch.*torch_to_flax"):
        BatchNorm(C).apply(variables, x, train=False)
