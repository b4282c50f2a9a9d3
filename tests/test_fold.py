"""Folding batch norm into conv/dense weights: torch's fusion as the oracle, whole models keep
their eval outputs, a batch norm is folded only where its producer feeds it alone (skip
connections and shared weights keep theirs, and the result says so), a fold that would change
the outputs raises, and statistics that were never tracked are refused."""

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
    result = jaxbn.fold_batch_norm(pair.model, variables, x[:1])
    folded_model, folded = result
    assert "batch_stats" not in folded
    assert not jaxbn.inspect_batchnorm(folded).layers
    assert set(result.folded) == {layer.path for layer in jaxbn.inspect_batchnorm(variables).layers}
    assert not result.left
    assert folded_model.norm == "none"
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


# Users' own models, with their own layer names and the jaxbn models' `norm` switch.


class SkipConnection(nn.Module):
    """``h = proj(x); head(relu(bn(h) + h))``: ``proj``'s output also bypasses the batch norm."""

    norm: str = "batch"

    @nn.compact
    def __call__(self, x, *, train):
        h = nn.Dense(6, name="proj")(x)
        y = h if self.norm == "none" else jaxbn.BatchNorm1d(6, name="proj_bn")(h, train=train)
        return nn.Dense(3, name="head")(nn.relu(y + h))


class SharedDense(nn.Module):
    """One Dense called twice with the same weights, only its first output normalized."""

    norm: str = "batch"

    @nn.compact
    def __call__(self, x, *, train):
        shared = nn.Dense(6, name="shared")
        h = shared(x)
        h = h if self.norm == "none" else jaxbn.BatchNorm1d(6, name="shared_bn")(h, train=train)
        return nn.Dense(3, name="head")(nn.relu(h) + shared(2.0 * x))


class StemAndSkip(nn.Module):
    """A foldable Dense → BN (``stem``) and a skip connection around ``proj_bn``."""

    norm: str = "batch"

    @nn.compact
    def __call__(self, x, *, train):
        def bn(h, name):
            return h if self.norm == "none" else jaxbn.BatchNorm1d(6, name=name)(h, train=train)

        h = nn.relu(bn(nn.Dense(6, name="stem")(x), "stem_bn"))
        s = nn.Dense(6, name="proj")(h)
        return nn.Dense(3, name="head")(nn.relu(bn(s, "proj_bn") + s))


class TiedDecoder(nn.Module):
    """The decoder reuses the encoder's kernel, transposed."""

    norm: str = "batch"

    @nn.compact
    def __call__(self, x, *, train):
        encoder = nn.Dense(6, name="encoder")
        h = encoder(x)
        h = h if self.norm == "none" else jaxbn.BatchNorm1d(6, name="encoder_bn")(h, train=train)
        return nn.relu(h) @ encoder.variables["params"]["kernel"].T


def trained(model, features=5, seed=0):
    """Variables after 3 training steps on shifted, scaled data, with random BN scale/bias."""
    keys = jax.random.split(jax.random.key(seed), 6)
    variables = model.init(keys[0], jnp.ones((2, features)), train=False)
    for key in keys[1:4]:
        batch = 3.0 * jax.random.normal(key, (16, features)) + 1.0
        _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    params = flax.core.unfreeze(variables["params"])
    for path, _, _ in jaxbn.tools._tree.batch_norm_layers(variables):
        layer = jaxbn.tools._tree.get_path(params, path)
        layer["scale"] = jax.random.uniform(keys[4], layer["scale"].shape, minval=0.5, maxval=2.0)
        layer["bias"] = jax.random.normal(keys[5], layer["bias"].shape)
    return {**variables, "params": params}


def sample(features=5, n=32):
    return 3.0 * jax.random.normal(jax.random.key(9), (n, features)) + 1.0


def fold_and_compare(model, variables, group):
    x = sample()
    result = jaxbn.fold_batch_norm(model, variables, x[:1])
    folded_model, folded = result
    assert_close(
        group,
        folded_model.apply(folded, x, train=False),
        model.apply(variables, x, train=False),
        1e-5,
        1e-5,
    )
    return result


def test_a_batch_norm_whose_producer_also_feeds_a_skip_connection_is_kept():
    model = SkipConnection()
    result = fold_and_compare(model, trained(model), "fold skip connection eval logits")
    assert not result.folded
    assert list(result.left) == ["proj_bn"]
    assert "the output of proj is also used elsewhere (add)" in result.left["proj_bn"]
    assert "proj_bn" in result.variables["batch_stats"]


def test_a_batch_norm_after_a_dense_whose_weights_serve_a_second_call_is_kept():
    model = SharedDense()
    result = fold_and_compare(model, trained(model), "fold shared dense eval logits")
    assert not result.folded
    assert result.left == {
        "shared_bn": "shared is called 2 times with the same weights; folding would change its "
        "other calls"
    }


def test_a_batch_norm_after_a_dense_whose_kernel_is_read_elsewhere_is_kept():
    model = TiedDecoder()
    result = fold_and_compare(model, trained(model), "fold tied decoder eval outputs")
    assert result.left == {"encoder_bn": "the weights of encoder are also read outside it"}


def test_the_result_reports_which_batch_norms_were_folded_and_which_were_kept():
    model = StemAndSkip()
    variables = trained(model)
    result = fold_and_compare(model, variables, "fold stem and skip eval logits")
    assert result.folded == {"stem_bn": "stem"}
    assert list(result.left) == ["proj_bn"]
    assert "stem_bn" not in result.variables["params"]
    assert "proj_bn" in result.variables["params"]
    assert list(result.variables["batch_stats"]) == ["proj_bn"]
    assert not np.allclose(
        result.variables["params"]["stem"]["kernel"], variables["params"]["stem"]["kernel"]
    )
    assert isinstance(result.model, jaxbn.tools.fold.FoldedModel)
    assert result.model.folded == ("stem_bn",)


def test_the_folded_model_with_kept_batch_norms_runs_under_jit_and_trains_them():
    model = StemAndSkip()
    variables = trained(model)
    x = sample()
    folded_model, folded = jaxbn.fold_batch_norm(model, variables, x[:1])
    logits = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))(folded, x)
    assert_close("fold jit eval logits", logits, model.apply(variables, x, train=False), 1e-5, 1e-5)
    _, updates = folded_model.apply(folded, x, train=True, mutable=["batch_stats"])
    assert list(updates["batch_stats"]) == ["proj_bn"]
    assert int(updates["batch_stats"]["proj_bn"]["num_batches_tracked"]) == 4


def test_fold_batch_norm_variables_refuses_a_batch_norm_it_cannot_fold():
    model = SkipConnection()
    with pytest.raises(
        ValueError,
        match=r"cannot fold the batch norm at proj_bn: the output of proj is also used elsewhere",
    ):
        jaxbn.fold_batch_norm_variables(model, trained(model), sample()[:1])


def test_a_fold_that_changes_the_outputs_raises_and_names_the_largest_difference(monkeypatch):
    fuse = jaxbn.tools.fold.fuse_conv_bn_weights

    def off_by_one_percent(*args):
        kernel, bias = fuse(*args)
        return kernel * 1.01, bias

    monkeypatch.setattr(jaxbn.tools.fold, "fuse_conv_bn_weights", off_by_one_percent)
    model = StemAndSkip()
    with pytest.raises(
        ValueError,
        match=r"folding changed the model's eval outputs on the sample input: "
        r"max \|folded − original\| = \S+ at output\[0, \d\] \(original \S+, folded \S+; "
        r"tolerance \S+ for float32\)",
    ):
        jaxbn.fold_batch_norm(model, trained(model), sample()[:1])


class ConvWithoutNormSwitch(nn.Module):
    """A user's conv net with no `norm` field: no `norm="none"` twin to return."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = nn.relu(jaxbn.BatchNorm2d(4, name="conv_bn")(x, train=train))
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def test_a_model_without_a_norm_switch_is_folded_into_a_folded_model():
    model = ConvWithoutNormSwitch()
    x = 3.0 * jax.random.normal(jax.random.key(9), (8, 6, 6, 2)) + 1.0
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    result = jaxbn.fold_batch_norm(model, variables, x[:1])
    assert result.folded == {"conv_bn": "conv"}
    assert isinstance(result.model, jaxbn.tools.fold.FoldedModel)
    assert "batch_stats" not in result.variables
    assert_close(
        "fold conv without norm switch eval logits",
        result.model.apply(result.variables, x, train=False),
        model.apply(variables, x, train=False),
        1e-5,
        1e-5,
    )
