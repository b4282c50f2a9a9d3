"""Rematerialization around and inside a synced batch norm: jax.checkpoint / nn.remat /
nnx.remat with the axis of a named jax.vmap, nn.vmap, nnx.vmap, pmap or shard_map. The gradients
equal those of one device on the concatenated batch (torch's, or jaxbn's unsynced ones where
torch has no such call).

A named vmap staged into a jaxpr (jax.checkpoint or jit around it) used to raise "unbound axis
name": JAX traces a custom JVP rule when the call is differentiated, after the vmap returned.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.nnx
from jaxbn.functional import batch_norm

MEMBERS, ROWS, C = 4, 3, 3
_gen = np.random.default_rng(0)
X = (_gen.normal(size=(MEMBERS, ROWS, C)) * 2 + 1).astype(np.float32)  # [members, rows, C]
G = _gen.normal(size=X.shape).astype(np.float32)
W = np.linspace(0.5, 2.0, C, dtype=np.float32)
B = np.linspace(-1.0, 1.0, C, dtype=np.float32)
MASK = np.arange(ROWS)[None, :, None] < np.array([3, 1, 0, 2])[:, None, None]  # uneven, 1 empty
MASK = np.broadcast_to(MASK, X.shape)


def flat(a):
    return np.asarray(a).reshape(MEMBERS * ROWS, C)


@pytest.fixture(scope="module")
def torch_grads():
    """(y, dx, dweight, dbias) of sum(bn(x)³ · g) over the concatenated batch, by torch."""
    x = torch.tensor(flat(X), requires_grad=True)
    w, b = torch.tensor(W, requires_grad=True), torch.tensor(B, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
    (y**3 * torch.tensor(flat(G))).sum().backward()
    return y.detach().numpy(), x.grad.numpy(), w.grad.numpy(), b.grad.numpy()


def assert_grads(got, expected, rtol=1e-5, atol=1e-5):
    """got: (dweight, dbias, dx) with dx in any shape of the batch; expected: torch_grads."""
    dw, db, dx = got
    np.testing.assert_allclose(flat(dx), expected[1], rtol=rtol, atol=atol)
    np.testing.assert_allclose(dw, expected[2], rtol=rtol, atol=atol)
    np.testing.assert_allclose(db, expected[3], rtol=rtol, atol=atol)


def synced(name, mask=None):
    """sum(bn(x)³ · g) of one member (or shard) whose statistics sync over ``name``."""

    def loss(w, b, x, g, mask=mask):
        y = batch_norm(x, None, None, w, b, True, axis_name=name, mask=mask)[0]
        return jnp.sum(jnp.where(True if mask is None else mask, y**3 * g, 0))

    return loss


def over_vmap(member):
    """The sum of ``member`` over a named vmap ("b") of x, g (and a mask); w, b shared."""
    return lambda w, b, *batch: jnp.sum(
        jax.vmap(member, in_axes=(None, None) + (0,) * len(batch), axis_name="b")(w, b, *batch)
    )


GRAD = (0, 1, 2)  # d/dweight, d/dbias, d/dx


# --- jax.vmap ------------------------------------------------------------------------------------


def test_checkpoint_around_a_named_vmap_gives_the_gradients_of_one_device(torch_grads):
    loss = jax.checkpoint(over_vmap(synced("b")))
    assert_grads(jax.grad(loss, GRAD)(W, B, X, G), torch_grads)


def test_jit_of_the_gradient_of_a_checkpointed_named_vmap_gives_the_same_gradients(torch_grads):
    loss = jax.checkpoint(over_vmap(synced("b")), policy=jax.checkpoint_policies.nothing_saveable)
    assert_grads(jax.jit(jax.grad(loss, GRAD))(W, B, X, G), torch_grads)


def test_gradient_of_a_jitted_named_vmap_gives_the_gradients_of_one_device(torch_grads):
    assert_grads(jax.grad(jax.jit(over_vmap(synced("b"))), GRAD)(W, B, X, G), torch_grads)


def test_checkpoint_inside_the_named_vmap_gives_the_gradients_of_one_device(torch_grads):
    loss = over_vmap(jax.checkpoint(synced("b")))
    assert_grads(jax.grad(loss, GRAD)(W, B, X, G), torch_grads)


def test_checkpoint_around_a_masked_named_vmap_equals_the_unsynced_masked_batch():
    loss = jax.checkpoint(over_vmap(synced("b")))
    got = jax.grad(loss, GRAD)(W, B, X, G, MASK)
    expected = jax.grad(synced(None), GRAD)(W, B, flat(X), flat(G), flat(MASK))
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.reshape(a, np.shape(e)), e, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(flat(got[2])[~flat(MASK)[:, 0]], 0)  # masked rows: no gradient


def test_forward_mode_through_a_checkpointed_named_vmap_equals_the_unsynced_jvp():
    def synced_y(x):
        member = lambda e: batch_norm(e, None, None, W, B, True, axis_name="b")[0]
        return jax.checkpoint(jax.vmap(member, axis_name="b"))(x)

    y, dy = jax.jvp(synced_y, (X,), (G,))
    y1, dy1 = jax.jvp(lambda x: batch_norm(x, None, None, W, B, True)[0], (flat(X),), (flat(G),))
    np.testing.assert_allclose(flat(y), y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat(dy), dy1, rtol=1e-5, atol=1e-5)


# --- pmap and shard_map --------------------------------------------------------------------------


def test_checkpoint_inside_and_around_pmap_gives_the_gradients_of_one_device(torch_grads):
    per_device = jax.pmap(
        jax.checkpoint(synced("d")), axis_name="d", in_axes=(None, None, 0, 0), out_axes=0
    )
    loss = lambda w, b, x, g: jnp.sum(per_device(w, b, x, g))
    assert_grads(jax.grad(loss, GRAD)(W, B, X, G), torch_grads)
    assert_grads(jax.grad(jax.checkpoint(loss), GRAD)(W, B, X, G), torch_grads)


@pytest.mark.parametrize("where", ["inside", "around"])
def test_checkpoint_and_shard_map_give_the_gradients_of_one_device(torch_grads, where):
    mesh = Mesh(np.array(jax.devices()[:MEMBERS]), ("d",))
    local = synced("d")
    if where == "inside":
        local = jax.checkpoint(local)
    per_device = jax.shard_map(
        lambda w, b, x, g: jax.lax.psum(local(w, b, x, g), "d"),
        mesh=mesh,
        in_specs=(P(), P(), P("d"), P("d")),
        out_specs=P(),
    )
    loss = per_device if where == "inside" else jax.checkpoint(per_device)
    x, g = flat(X), flat(G)
    assert_grads(jax.jit(jax.grad(loss, GRAD))(W, B, x, g), torch_grads)


# --- Flax linen: nn.remat with pmap and nn.vmap --------------------------------------------------


class _Block(nn.Module):
    axis_name: str

    @nn.compact
    def __call__(self, x, train):
        return jaxbn.BatchNorm1d(C, axis_name=self.axis_name)(x, train=train)


class _Remat(nn.Module):
    """nn.remat around a block with a synced linen batch norm."""

    axis_name: str

    @nn.compact
    def __call__(self, x):
        return nn.remat(_Block, static_argnums=(2,))(self.axis_name)(x, True)


class _TrainingBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jaxbn.BatchNorm1d(C, axis_name="b")(x, train=True)


class _RematOfNamedVmap(nn.Module):
    """nn.remat around an nn.vmap (axis_name="b") of a synced linen batch norm: parameters and
    statistics shared by the members."""

    @nn.compact
    def __call__(self, x):
        per_member = nn.vmap(
            _TrainingBlock,
            in_axes=0,
            out_axes=0,
            axis_name="b",
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
        )
        return nn.remat(per_member)()(x)


def linen_variables(module, x):
    variables = module.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: W if path[-1].key == "scale" else B, variables["params"]
    )
    return {**variables, "params": params}


def linen_loss(module, variables):
    def loss(params, x, g):
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y**3 * g), updates["batch_stats"]

    return loss


def only(tree, name):
    """The one leaf called ``name`` in a nested dict."""
    (leaf,) = (a for k, a in flatten_dict(tree).items() if k[-1] == name)
    return leaf


def test_nn_remat_under_pmap_gives_the_gradients_and_statistics_of_one_device(torch_grads):
    module = _Remat(axis_name="d")
    variables = linen_variables(module, X[0])
    step = jax.pmap(
        jax.grad(linen_loss(module, variables), (0, 1), has_aux=True),
        axis_name="d",
        in_axes=(None, 0, 0),
    )
    (dparams, dx), stats = step(variables["params"], X, G)
    dparams = jax.tree.map(lambda a: a.sum(0), dparams)  # each device's share of the sum
    assert_grads((only(dparams, "scale"), only(dparams, "bias"), dx), torch_grads)
    running_var = only(stats, "var")[0]
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * flat(X).var(0, ddof=1), rtol=1e-5)


def test_nn_remat_around_a_named_nn_vmap_gives_the_gradients_of_one_device(torch_grads):
    module = _RematOfNamedVmap()
    variables = linen_variables(module, X)
    loss = linen_loss(module, variables)
    (dparams, dx), stats = jax.grad(loss, (0, 1), has_aux=True)(variables["params"], X, G)
    assert_grads((only(dparams, "scale"), only(dparams, "bias"), dx), torch_grads)
    running_var = only(stats, "var")
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * flat(X).var(0, ddof=1), rtol=1e-5)


# --- Flax NNX: nnx.remat with nnx.vmap -----------------------------------------------------------


def nnx_synced_bn():
    bn = jaxbn.nnx.BatchNorm1d(C, axis_name="b")
    bn.scale[...], bn.bias[...] = jnp.asarray(W), jnp.asarray(B)
    bn.train()
    return bn


BROADCAST = nnx.StateAxes({...: None})  # one model for all members, synced updates


@pytest.mark.parametrize("where", ["inside", "around"])
def test_nnx_remat_and_a_named_nnx_vmap_give_the_gradients_of_one_device(torch_grads, where):
    bn = nnx_synced_bn()

    def members(bn, x, g):
        call = (lambda bn, x: bn(x)) if where == "around" else nnx.remat(lambda bn, x: bn(x))
        per_member = nnx.vmap(
            lambda bn, x, g: jnp.sum(call(bn, x) ** 3 * g),
            in_axes=(BROADCAST, 0, 0),
            axis_name="b",
        )
        return jnp.sum(per_member(bn, x, g))

    loss = nnx.remat(members) if where == "around" else members
    dbn, dx = nnx.grad(loss, argnums=(0, 1))(bn, jnp.asarray(X), jnp.asarray(G))
    assert_grads((dbn.scale[...], dbn.bias[...], dx), torch_grads)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat(X).var(0, ddof=1), rtol=1e-5)
