"""Folding batch norm into conv/dense weights: torch's fusion as the oracle, whole models keep
their eval outputs, and statistics that were never tracked are refused."""

from __future__ import annotations

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_weights

import jaxbn
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close


def trained_torch_bn(channels):
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels) + 0.5)
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.2)
    return bn.eval()


def test_fuse_conv_bn_weights_equals_torchs_fused_conv_in_flax_layout():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).eval()
    bn = trained_torch_bn(5)
    fused = fuse_conv_bn_eval(conv, bn)
    kernel, bias = jaxbn.fuse_conv_bn_weights(
        jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
        jnp.asarray(conv.bias.detach().numpy()),
        jnp.asarray(bn.running_mean.numpy()),
        jnp.asarray(bn.running_var.numpy()),
        bn.eps,
        jnp.asarray(bn.weight.detach().numpy()),
        jnp.asarray(bn.bias.detach().numpy()),
    )
    assert_close(
        "fold conv kernel", np.transpose(kernel, (3, 2, 0, 1)), fused.weight.detach(), 1e-6, 1e-6
    )
    assert_close("fold conv bias", bias, fused.bias.detach(), 1e-6, 1e-6)


def test_fuse_dense_bn_weights_equals_torchs_fuse_linear_bn_weights():
    linear = torch.nn.Linear(4, 6)
    bn = trained_torch_bn(6)
    w, b = fuse_linear_bn_weights(
        linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    kernel, bias = jaxbn.fuse_dense_bn_weights(
        jnp.asarray(linear.weight.detach().numpy().T),
        jnp.asarray(linear.bias.detach().numpy()),
        jnp.asarray(bn.running_mean.numpy()),
        jnp.asarray(bn.running_var.numpy()),
        bn.eps,
        jnp.asarray(bn.weight.detach().numpy()),
        jnp.asarray(bn.bias.detach().numpy()),
    )
    assert_close("fold dense kernel", kernel.T, w.detach(), 1e-6, 1e-6)
    assert_close("fold dense bias", bias, b.detach(), 1e-6, 1e-6)


@pytest.mark.parametrize("name", ["mlp-bn", "convnet", "resnet"])
def test_a_folded_model_has_the_original_eval_outputs_and_no_batch_norm(name):
    pair = make_pairs(seed=4)[name]
    pair.torch_model.train()
    with torch.no_grad():
        for _ in range(3):
            pair.torch_model(torch.randn(pair.input_shape) * 2 + 0.5)
    variables = pair.load_into_jax()
    x = pair.to_jax_input(torch.randn(pair.input_shape))
    folded_model, folded = jaxbn.fold_batch_norm(pair.model, variables, x[:1])
    assert "batch_stats" not in folded
    assert not jaxbn.inspect_batchnorm(folded).layers
    expected = pair.model.apply(variables, x, train=False)
    assert_close(
        f"fold {name} eval logits", folded_model.apply(folded, x, train=False), expected, 1e-5, 1e-5
    )


def test_statistics_that_were_never_tracked_are_refused():
    model = jaxbn.models.MLP(hidden=(8,))
    variables = model.init(jax.random.key(0), jnp.ones((2, 4)), train=False)
    with pytest.raises(ValueError, match="layers_1: its statistics were never tracked"):
        jaxbn.fold_batch_norm(model, variables, jnp.ones((1, 4)))


class NormAfterActivation(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Dense(4)(x))
        return jaxbn.BatchNorm1d(4)(x, train=train)


def test_a_batch_norm_not_fed_by_a_conv_or_dense_is_refused():
    model = NormAfterActivation()
    variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    _, updates = model.apply(
        variables, jnp.arange(6.0).reshape(2, 3), train=True, mutable=["batch_stats"]
    )
    variables = {**variables, **updates}
    with pytest.raises(ValueError, match="does not come straight from a Conv or Dense"):
        jaxbn.fold_batch_norm_variables(model, variables, jnp.ones((1, 3)))


def test_folding_accepts_frozen_variables():
    pair = make_pairs(seed=6)["mlp-bn"]
    pair.torch_model.train()
    with torch.no_grad():
        pair.torch_model(torch.randn(pair.input_shape))
    variables = flax.core.freeze(pair.load_into_jax())
    x = pair.to_jax_input(torch.randn(pair.input_shape))
    folded_model, folded = jaxbn.fold_batch_norm(pair.model, variables, x[:1])
    assert_close(
        "fold frozen eval logits",
        folded_model.apply(folded, x, train=False),
        pair.model.apply(variables, x, train=False),
        1e-5,
        1e-5,
    )
