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
from tests import linen_builders
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
    variables = linen_builders.init(model, jnp.ones((2, 4)), train=False)
    with pytest.raises(ValueError, match="layers_1: its statistics were never tracked"):
        jaxbn.fold_batch_norm(model, variables, jnp.ones((1, 4)))


class NormAfterActivation(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Dense(4)(x))
        return jaxbn.BatchNorm1d(4)(x, train=train)


def test_a_batch_norm_not_fed_by_a_conv_or_dense_is_refused():
    model = NormAfterActivation()
    variables = linen_builders.init(model, jnp.ones((2, 3)), train=False)
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


def normal(seed, shape, scale=1.0, shift=0.0):
    """float32 N(shift, scale²) data from numpy (JAX's generator compiles for every shape)."""
    return jnp.asarray(
        np.random.default_rng(seed).standard_normal(shape) * scale + shift, jnp.float32
    )


def trained(model, features=5, seed=0):
    """Variables after 3 training steps on shifted, scaled data, with random BN scale/bias."""
    rng = np.random.default_rng(seed)
    variables = linen_builders.init(model, jnp.ones((2, features)), seed=seed, train=False)
    for step in range(3):
        batch = normal(1000 * seed + step, (16, features), 3.0, 1.0)
        _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    params = flax.core.unfreeze(variables["params"])
    for path, _, _ in jaxbn.tools._tree.batch_norm_layers(variables):
        layer = jaxbn.tools._tree.get_path(params, path)
        shape = layer["scale"].shape
        layer["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
        layer["bias"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {**variables, "params": params}


def sample(features=5, n=32):
    return normal(9, (n, features), 3.0, 1.0)


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
    x = normal(9, (8, 6, 6, 2), 3.0, 1.0)
    variables = linen_builders.init(model, x, train=False)
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


# Real models: bias-free producers, partial folds, torch.fx's `fuse` on a torch twin as the oracle.


class BiasFreeConv(nn.Module):
    """torchvision's pattern: ``Conv2d(..., bias=False)`` then ``BatchNorm2d``; no norm field."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv")(x)
        x = nn.relu(jaxbn.BatchNorm2d(name="bn")(x, train=train))
        return nn.Dense(3, use_bias=False, name="head")(jnp.mean(x, axis=(1, 2)))


def test_a_batch_norm_after_a_bias_free_conv_is_folded_and_the_conv_gets_a_bias():
    model = BiasFreeConv()
    x = normal(9, (8, 6, 6, 2), 3.0, 1.0)
    variables = linen_builders.init(model, x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    result = jaxbn.fold_batch_norm(model, variables, x[:1])
    assert result.folded == {"bn": "conv"} and not result.left
    assert set(result.variables["params"]["conv"]) == {"kernel", "bias"}
    assert result.model.biased == ("conv",)
    assert_close(
        "fold bias-free conv eval logits",
        result.model.apply(result.variables, x, train=False),
        model.apply(variables, x, train=False),
        1e-5,
        1e-5,
    )
    # and the variables alone, for a copy of the model with use_bias=True and no batch norm
    folded = jaxbn.fold_batch_norm_variables(model, variables, x[:1])
    np.testing.assert_array_equal(
        folded["params"]["conv"]["bias"], result.variables["params"]["conv"]["bias"]
    )


def randomized_statistics(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-looking batch norms: affine parameters and running statistics away from 1/0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator))
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.3)
                module.num_batches_tracked.fill_(5)
    return net.eval()


def fold_like_torch_fx(net, model, x_torch, *, rename=None):
    """Ports ``net`` to ``model``, folds both (jaxbn and ``torch.fx.experimental.optimization
    .fuse``) and checks that they fold the same batch norms into the same weights and agree on
    the outputs. Returns the FoldResult."""
    from torch.fx.experimental.optimization import fuse

    x = jnp.asarray(np.moveaxis(x_torch.numpy(), 1, -1))
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = jaxbn.interop.torch_to_flax(net.state_dict(), template, rename=rename)
    result = jaxbn.fold_batch_norm(model, variables, x[:1])
    fused = fuse(net.eval())
    fused_state = fused.state_dict()
    ported = jaxbn.interop.flax_to_torch(result.variables, rename=rename)
    assert sorted(ported) == sorted(fused_state)  # the same batch norms folded away, and kept
    for key, value in fused_state.items():
        np.testing.assert_allclose(ported[key], value.numpy(), 1e-5, 1e-6, err_msg=key)
    with torch.no_grad():
        expected = fused(x_torch).numpy()
    assert_close(
        "fold like torch.fx outputs",
        result.model.apply(result.variables, x, train=False),
        expected,
        1e-4,
        1e-5,
    )
    return result


class TorchDenseLayer(torch.nn.Module):
    """torchvision's ``_DenseLayer``: pre-activation, bias-free convs, input concatenated."""

    def __init__(self, channels, growth):
        super().__init__()
        self.norm1 = torch.nn.BatchNorm2d(channels)
        self.conv1 = torch.nn.Conv2d(channels, 2 * growth, 1, bias=False)
        self.norm2 = torch.nn.BatchNorm2d(2 * growth)
        self.conv2 = torch.nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(torch.relu(self.norm1(x)))
        return self.conv2(torch.relu(self.norm2(x)))


class TorchDenseNet(torch.nn.Module):
    def __init__(self, growth=4):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = torch.nn.BatchNorm2d(8)
        self.layer1 = TorchDenseLayer(8, growth)
        self.layer2 = TorchDenseLayer(8 + growth, growth)
        self.norm5 = torch.nn.BatchNorm2d(8 + 2 * growth)
        self.classifier = torch.nn.Linear(8 + 2 * growth, 5)

    def forward(self, x):
        features = [torch.relu(self.norm0(self.conv0(x)))]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        x = torch.relu(self.norm5(torch.cat(features, 1)))
        return self.classifier(x.mean((2, 3)))


class DenseLayer(nn.Module):
    growth: int

    @nn.compact
    def __call__(self, features, *, train):
        x = jnp.concatenate(features, axis=-1)
        x = nn.relu(jaxbn.BatchNorm2d(name="norm1")(x, train=train))
        x = nn.Conv(2 * self.growth, (1, 1), use_bias=False, name="conv1")(x)
        x = nn.relu(jaxbn.BatchNorm2d(name="norm2")(x, train=train))
        return nn.Conv(self.growth, (3, 3), padding=1, use_bias=False, name="conv2")(x)


class DenseNet(nn.Module):
    growth: int = 4

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv0")(x)
        features = [nn.relu(jaxbn.BatchNorm2d(name="norm0")(x, train=train))]
        features.append(DenseLayer(self.growth, name="layer1")(features, train=train))
        features.append(DenseLayer(self.growth, name="layer2")(features, train=train))
        x = nn.relu(jaxbn.BatchNorm2d(name="norm5")(jnp.concatenate(features, -1), train=train))
        return nn.Dense(5, name="classifier")(jnp.mean(x, axis=(1, 2)))


def test_a_densenet_folds_partially_like_torch_fx_keeping_its_pre_activation_batch_norms():
    torch.manual_seed(0)
    net = randomized_statistics(TorchDenseNet())
    result = fold_like_torch_fx(net, DenseNet(), torch.randn(4, 3, 8, 8))
    assert result.folded == {
        "norm0": "conv0",
        "layer1/norm2": "layer1/conv1",
        "layer2/norm2": "layer2/conv1",
    }
    assert sorted(result.left) == ["layer1/norm1", "layer2/norm1", "norm5"]
    for path in result.left:
        assert "does not come straight from a Conv or Dense layer" in result.left[path]


class TorchBranches(torch.nn.Module):
    """Every case in one net: conv → bn → bn, two batch norms reading one conv, a batch norm
    after an addition and after an activation, and linear → BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(6)
        self.stem_bn_again = torch.nn.BatchNorm2d(6)
        self.shared = torch.nn.Conv2d(6, 6, 1)
        self.left_bn = torch.nn.BatchNorm2d(6)
        self.right_bn = torch.nn.BatchNorm2d(6)
        self.a = torch.nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b = torch.nn.Conv2d(6, 6, 1, bias=False)
        self.sum_bn = torch.nn.BatchNorm2d(6)
        self.act_bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 4, bias=False)
        self.fc_bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.stem_bn_again(self.stem_bn(self.stem(x)))
        h = self.shared(x)
        x = self.left_bn(h) * self.right_bn(h)
        x = self.sum_bn(self.a(x) + self.b(x))
        x = self.act_bn(torch.relu(x))
        return self.fc_bn(self.fc(x.mean((2, 3))))


class Branches(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        def bn(name, x):
            return jaxbn.BatchNorm(name=name)(x, train=train)

        x = bn(
            "stem_bn_again",
            bn("stem_bn", nn.Conv(6, (3, 3), padding=1, use_bias=False, name="stem")(x)),
        )
        h = nn.Conv(6, (1, 1), name="shared")(x)
        x = bn("left_bn", h) * bn("right_bn", h)
        a = nn.Conv(6, (3, 3), padding=1, use_bias=False, name="a")(x)
        x = bn("sum_bn", a + nn.Conv(6, (1, 1), use_bias=False, name="b")(x))
        x = bn("act_bn", nn.relu(x))
        return bn("fc_bn", nn.Dense(4, use_bias=False, name="fc")(jnp.mean(x, axis=(1, 2))))


def test_what_can_be_folded_is_folded_and_the_rest_kept_like_torch_fx():
    torch.manual_seed(1)
    net = randomized_statistics(TorchBranches())
    result = fold_like_torch_fx(net, Branches(), torch.randn(4, 3, 6, 6))
    assert result.folded == {"stem_bn": "stem", "stem_bn_again": "stem", "fc_bn": "fc"}
    assert result.model.biased == ("stem", "fc")
    assert sorted(result.left) == ["act_bn", "left_bn", "right_bn", "sum_bn"]
    assert result.left["left_bn"].startswith(
        "the output of shared is also used elsewhere (the batch norm at right_bn)"
    )
    assert result.left["sum_bn"] == "its input does not come straight from a Conv or Dense layer"
    assert result.left["act_bn"] == "its input does not come straight from a Conv or Dense layer"


class FoldedNormWithSkip(nn.Module):
    """``h = bn1(stem(x)); head(bn2(h) + h)``: bn1 folds into stem, bn2 reads a value that the
    skip connection also reads."""

    @nn.compact
    def __call__(self, x, *, train):
        h = jaxbn.BatchNorm1d(6, name="bn1")(nn.Dense(6, name="stem")(x), train=train)
        return nn.Dense(3, name="head")(jaxbn.BatchNorm1d(6, name="bn2")(h, train=train) + h)


def test_a_batch_norm_after_a_folded_one_whose_output_has_other_uses_is_kept_and_named():
    model = FoldedNormWithSkip()
    result = fold_and_compare(model, trained(model), "fold chain with skip eval logits")
    assert result.folded == {"bn1": "stem"}
    assert result.left == {
        "bn2": "the output of the batch norm at bn1 is also used elsewhere (add), e.g. a skip "
        "connection; folding would change that use"
    }
