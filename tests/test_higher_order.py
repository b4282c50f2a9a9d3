"""Second-order and forward-mode derivatives through batch norm, against torch autograd.

Each derivative is jitted: one compile, where running it op by op compiles every operation
of the derivative on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch

import jaxbn
from tests.parity_report import assert_close

X = torch.randn(6, 3, dtype=torch.float64) * 2 + 1
W = torch.rand(3, dtype=torch.float64) + 0.5
B = torch.randn(3, dtype=torch.float64)


def torch_bn(x, w, b):
    return torch.nn.functional.batch_norm(x, None, None, w, b, training=True)


def jax_bn(x, w, b):
    return jaxbn.functional.batch_norm(x, None, None, w, b, training=True)[0]


def torch_grad_of_grad():
    """d/d(x, w, b) of Σ(d/dx Σ bn(x)³)², by torch's double backward."""
    tx, tw, tb = (t.clone().requires_grad_() for t in (X, W, B))
    (gx,) = torch.autograd.grad((torch_bn(tx, tw, tb) ** 3).sum(), tx, create_graph=True)
    (gx**2).sum().backward()
    return tx.grad, tw.grad, tb.grad


def jax_grad_of_grad(bn, x):
    """jaxbn's grad of grad of the same objective, ``bn(x, w, b)`` the normalization, jitted,
    in float64."""

    def objective(x, w, b):
        gx = jax.grad(lambda x: jnp.sum(bn(x, w, b) ** 3))(x)
        return jnp.sum(gx**2)

    with jax.enable_x64(True):
        return jax.jit(jax.grad(objective, (0, 1, 2)))(
            jnp.asarray(x), jnp.asarray(W.numpy()), jnp.asarray(B.numpy())
        )


def test_grad_of_grad_matches_torch_double_backward():
    hx, hw, hb = jax_grad_of_grad(jax_bn, X.numpy())
    tx, tw, tb = torch_grad_of_grad()
    assert_close("bn grad-of-grad float64", hx, tx, 1e-10, 1e-10)
    assert_close("bn grad-of-grad float64", hw, tw, 1e-10, 1e-10)
    assert_close("bn grad-of-grad float64", hb, tb, 1e-10, 1e-10)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "checkpointed"])
def test_grad_of_grad_synced_over_a_named_vmap_matches_torch_on_the_whole_batch(remat):
    # 3 members of 2 rows; jax.checkpoint around the vmap stages the batch norm's JVP rule,
    # traced after the vmap returned (it once raised "unbound axis name")
    def member(e, w, b):
        return jaxbn.functional.batch_norm(e, None, None, w, b, True, axis_name="m")[0]

    def synced(x, w, b):
        per_member = jax.vmap(member, in_axes=(0, None, None), axis_name="m")
        return (jax.checkpoint(per_member) if remat else per_member)(x, w, b)

    hx, hw, hb = jax_grad_of_grad(synced, X.numpy().reshape(3, 2, 3))
    tx, tw, tb = torch_grad_of_grad()
    group = f"bn grad-of-grad synced vmap {'checkpointed' if remat else 'plain'} float64"
    assert_close(group, hx.reshape(6, 3), tx, 1e-10, 1e-10)
    assert_close(group, hw, tw, 1e-10, 1e-10)
    assert_close(group, hb, tb, 1e-10, 1e-10)


def test_forward_mode_jacobian_matches_torch():
    expected = torch.autograd.functional.jacobian(lambda x: torch_bn(x, W, B), X)
    with jax.enable_x64(True):
        w, b = jnp.asarray(W.numpy()), jnp.asarray(B.numpy())
        jac_fwd = jax.jit(jax.jacfwd(lambda x: jax_bn(x, w, b)))(jnp.asarray(X.numpy()))
        jac_rev = jax.jit(jax.jacrev(lambda x: jax_bn(x, w, b)))(jnp.asarray(X.numpy()))
    assert_close("bn jacfwd float64", jac_fwd, expected, 1e-12, 1e-12)
    assert_close("bn jacrev float64", jac_rev, expected, 1e-12, 1e-12)


def test_jvp_of_the_module_matches_torch_forward_ad():
    tangent = torch.randn_like(X)
    _, expected = torch.func.jvp(lambda x: torch_bn(x, W, B), (X,), (tangent,))
    with jax.enable_x64(True):
        w, b = jnp.asarray(W.numpy()), jnp.asarray(B.numpy())
        jvp = jax.jit(lambda x, t: jax.jvp(lambda x: jax_bn(x, w, b), (x,), (t,)))
        _, out = jvp(jnp.asarray(X.numpy()), jnp.asarray(tangent.numpy()))
    assert_close("bn jvp float64", out, expected, 1e-12, 1e-12)
