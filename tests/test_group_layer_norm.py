"""GroupNorm and LayerNorm against torch, including a batch of one."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
import torch

import jaxbn
from tests.parity_report import assert_close
from tests.torch_twins import to_jax, to_numpy

GROUP_CASES = [
    (shape, groups)
    for shape in [(1, 8, 5, 5), (4, 8, 5, 5), (3, 8), (2, 8, 7)]
    for groups in [1, 2, 8]
    if not (len(shape) == 2 and groups == 8)  # one value per group: an error, tested below
]


@pytest.mark.parametrize("shape,groups", GROUP_CASES)
def test_group_norm_matches_torch_outputs_and_grads(shape, groups):
    channels = shape[1]
    tm = torch.nn.GroupNorm(groups, channels)
    with torch.no_grad():
        tm.weight.copy_(torch.rand(channels) + 0.5)
        tm.bias.copy_(torch.randn(channels))
    x_t = (torch.randn(shape) * 3 + 2).requires_grad_()
    g_t = torch.randn(shape)
    (tm(x_t) * g_t).sum().backward()
    gn = jaxbn.GroupNorm(groups, channels)
    params = {"params": {"scale": to_jax(tm.weight, False), "bias": to_jax(tm.bias, False)}}

    def loss(params, x):
        y = gn.apply(params, x)
        return jnp.sum(y * to_jax(g_t, True)), y

    # jitted: one compile instead of one per operation of the forward and backward pass
    (dp, dx), y = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(params, to_jax(x_t, True))
    tol = 2e-5
    assert_close("group_norm y", to_numpy(y, True), tm(x_t).detach(), tol, tol)
    assert_close("group_norm dx", to_numpy(dx, True), x_t.grad, tol, tol)
    assert_close("group_norm dscale", dp["params"]["scale"], tm.weight.grad, tol, tol)
    assert_close("group_norm dbias", dp["params"]["bias"], tm.bias.grad, tol, tol)


@pytest.mark.parametrize(
    "shape,normalized", [((1, 4, 4, 6), (4, 4, 6)), ((3, 5, 6), (6,)), ((2, 7), 7)]
)
def test_layer_norm_matches_torch_outputs_and_grads(shape, normalized):
    tm = torch.nn.LayerNorm(normalized)
    with torch.no_grad():
        tm.weight.copy_(torch.rand(tm.weight.shape) + 0.5)
        tm.bias.copy_(torch.randn(tm.bias.shape))
    x_t = (torch.randn(shape) * 3 + 2).requires_grad_()
    g_t = torch.randn(shape)
    (tm(x_t) * g_t).sum().backward()
    ln = jaxbn.LayerNorm(normalized)
    params = {
        "params": {
            "scale": jnp.asarray(tm.weight.detach().numpy()),
            "bias": jnp.asarray(tm.bias.detach().numpy()),
        }
    }

    def loss(params, x):
        y = ln.apply(params, x, train=True)  # train is accepted and ignored
        return jnp.sum(y * jnp.asarray(g_t.numpy())), y

    grad_fn = jax.jit(jax.grad(loss, (0, 1), has_aux=True))  # one compile, not one per operation
    (dp, dx), y = grad_fn(params, jnp.asarray(x_t.detach().numpy()))
    tol = 2e-5
    assert_close("layer_norm y", y, tm(x_t).detach(), tol, tol)
    assert_close("layer_norm dx", dx, x_t.grad, tol, tol)
    assert_close("layer_norm dscale", dp["params"]["scale"], tm.weight.grad, tol, tol)
    assert_close("layer_norm dbias", dp["params"]["bias"], tm.bias.grad, tol, tol)


def test_group_norm_channels_not_divisible_is_refused_with_torchs_message():
    with pytest.raises(ValueError) as torch_err:
        torch.nn.GroupNorm(3, 4)
    with pytest.raises(ValueError, match=re.escape(str(torch_err.value))):
        jaxbn.GroupNorm(3).init(jax.random.key(0), jnp.ones((2, 4)))


def test_group_norm_with_one_value_per_group_is_refused():
    # torch returns `bias` here without a word; a group of one value has no variance.
    with pytest.raises(ValueError, match="Expected more than 1 value per group"):
        jaxbn.GroupNorm(4).init(jax.random.key(0), jnp.ones((2, 4)))


def test_group_norm_with_wrong_weight_size_is_refused_with_torchs_message():
    with pytest.raises(RuntimeError) as torch_err:
        torch.nn.GroupNorm(2, 4)(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match=re.escape(str(torch_err.value))):
        jaxbn.functional.group_norm(jnp.ones((2, 6)), 2, jnp.ones(4), jnp.zeros(4))


def test_layer_norm_with_the_wrong_trailing_shape_is_refused_with_torchs_message():
    with pytest.raises(RuntimeError) as torch_err:
        torch.nn.LayerNorm([3, 4])(torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match=re.escape(str(torch_err.value))):
        jaxbn.LayerNorm((3, 4)).init(jax.random.key(0), jnp.ones((2, 4, 3)))
