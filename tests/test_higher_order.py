"""Second-order and forward-mode derivatives through batch norm, against torch autograd.

Each derivative is jitted: one compile, where running it op by op compiles every operation
of the derivative on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def test_grad_of_grad_matches_torch_double_backward():
    def torch_objective(x, w, b):
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((torch_bn(x, w, b) ** 3).sum(), x, create_graph=True)
        return (gx**2).sum()

    def jax_objective(x, w, b):
        gx = jax.grad(lambda x: jnp.sum(jax_bn(x, w, b) ** 3))(x)
        return jnp.sum(gx**2)

    with jax.enable_x64(True):
        hx, hw, hb = jax.jit(jax.grad(jax_objective, (0, 1, 2)))(
            jnp.asarray(X.numpy()), jnp.asarray(W.numpy()), jnp.asarray(B.numpy())
        )
    tx, tw, tb = (t.clone().requires_grad_() for t in (X, W, B))
    torch_objective(tx, tw, tb).backward()
    assert_close("bn grad-of-grad float64", hx, tx.grad, 1e-10, 1e-10)
    assert_close("bn grad-of-grad float64", hw, tw.grad, 1e-10, 1e-10)
    assert_close("bn grad-of-grad float64", hb, tb.grad, 1e-10, 1e-10)


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
