"""fold_batch_norm and freeze_batch_norm on real models' shapes and call signatures: a
``freeze_batch_norm`` result or an already folded model folds exactly into one wrapper, any
method of the wrapped model runs, ``nn.Sequential`` models and models whose flag is
``use_running_average``/``training``/``deterministic`` fold, and a jax-resnet-style ResNet
(an ``nn.Sequential`` of bottleneck blocks) folds as written, like torch.fx's ``fuse`` on its
torch twin."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.fx.experimental.optimization import fuse

import jaxbn
from jaxbn import flax_compat
from tests.parity_report import assert_close
from tests.test_fold_kinds import loaded

X = jnp.asarray(np.random.default_rng(2).standard_normal((8, 5)) * 3 + 1, jnp.float32)


class Encoder(nn.Module):
    """A foldable ``stem → stem_bn``, a ``proj_bn`` kept for its skip connection, and a second
    method, ``encode``."""

    @nn.compact
    def __call__(self, x, *, train):
        h = nn.relu(jaxbn.BatchNorm1d(6, name="stem_bn")(nn.Dense(6, name="stem")(x), train=train))
        s = nn.Dense(6, use_bias=False, name="proj")(h)
        return jaxbn.BatchNorm1d(6, name="proj_bn")(s, train=train) + s

    def encode(self, x, *, train):
        return 2.0 * self(x, train=train)


@pytest.fixture(scope="module")
def encoder():
    model = Encoder()
    return model, loaded(model.init(jax.random.key(0), X, train=False))


def check_same(group, model_a, variables_a, model_b, variables_b, tol=1e-5, **kwargs):
    assert_close(
        group,
        model_a.apply(variables_a, X, train=False, **kwargs),
        model_b.apply(variables_b, X, train=False, **kwargs),
        tol,
        tol,
    )


def test_a_freeze_batch_norm_result_folds_exactly_and_its_kept_batch_norms_stay_frozen(encoder):
    model, variables = encoder
    frozen_model, _ = jaxbn.freeze_batch_norm(model, variables)
    result = jaxbn.fold_batch_norm(frozen_model, variables, X[:1])
    assert result.folded == {"stem_bn": "stem"}
    assert list(result.left) == ["proj_bn"]
    assert isinstance(result.model, jaxbn.FoldedModel) and result.model.frozen is None
    check_same("fold frozen model eval", result.model, result.variables, model, variables)
    # in training the kept batch norm is still frozen: the outputs are eval's, nothing updates
    train_out = result.model.apply(result.variables, X, train=True)
    assert_close(
        "fold frozen model train", train_out, model.apply(variables, X, train=False), 1e-5, 1e-5
    )


def test_a_frozen_batch_norm_loaded_without_a_counter_folds_when_frozen(encoder):
    model, variables = encoder
    variables = loaded(variables, counter=0)
    frozen_model, _ = jaxbn.freeze_batch_norm(model, variables)
    assert jaxbn.fold_batch_norm(frozen_model, variables, X[:1]).folded == {"stem_bn": "stem"}


def test_an_already_folded_model_folds_again_into_one_folded_model(encoder):
    model, variables = encoder
    first = jaxbn.fold_batch_norm(model, variables, X[:1])
    again = jaxbn.fold_batch_norm(first.model, first.variables, X[:1])
    assert again.folded == {"stem_bn": "stem"} and list(again.left) == ["proj_bn"]
    assert again.model.folded == ("stem_bn",) and again.model.biased == ()
    check_same("fold folded model eval", again.model, again.variables, model, variables)


def test_a_folded_model_can_be_frozen_and_unfrozen(encoder):
    model, variables = encoder
    folded_model, folded = jaxbn.fold_batch_norm(model, variables, X[:1])
    frozen = jaxbn.freeze_batch_norm(folded_model, folded)
    assert frozen.frozen == ("proj_bn",)
    assert isinstance(frozen.model, jaxbn.FoldedModel) and frozen.model.frozen is None
    assert_close(
        "frozen folded model train",
        frozen.model.apply(folded, X, train=True),
        model.apply(variables, X, train=False),
        1e-5,
        1e-5,
    )
    unfrozen, _ = jaxbn.unfreeze_batch_norm(frozen.model, folded)
    assert unfrozen == folded_model


@pytest.mark.parametrize("wrap", ["freeze", "fold"])
def test_any_method_of_the_wrapped_model_runs_by_name_or_as_a_function(encoder, wrap):
    model, variables = encoder
    if wrap == "freeze":
        wrapped, wrapped_variables = jaxbn.freeze_batch_norm(model, variables)
    else:
        wrapped, wrapped_variables = jaxbn.fold_batch_norm(model, variables, X[:1])
    expected = model.apply(variables, X, train=False, method="encode")
    by_name = wrapped.apply(wrapped_variables, X, train=False, method="encode")
    by_function = wrapped.apply(wrapped_variables, X, train=False, method=Encoder.encode)
    by_lambda = wrapped.apply(wrapped_variables, X, method=lambda m, x: m.encode(x, train=False))
    for group, got in [("name", by_name), ("function", by_function), ("lambda", by_lambda)]:
        assert_close(f"{wrap} method by {group}", got, expected, 1e-5, 1e-5)


def test_fold_traces_and_checks_the_method_it_is_given(encoder):
    model, variables = encoder
    result = jaxbn.fold_batch_norm(model, variables, X[:1], method="encode")
    assert result.folded == {"stem_bn": "stem"}
    check_same(
        "fold method encode", result.model, result.variables, model, variables, method="encode"
    )


def test_a_wrapper_of_a_wrapper_is_refused_with_the_function_to_use(encoder):
    model, _ = encoder
    with pytest.raises(
        TypeError,
        match=r"FrozenModel of a FrozenModel: two wrappers would both claim the scope name "
        r"'model'; use jaxbn.freeze_batch_norm / jaxbn.fold_batch_norm on it",
    ):
        jaxbn.FrozenModel(jaxbn.FrozenModel(model))


# Call signatures: the flag's name, or no flag at all.


class WithTraining(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool):
        return jaxbn.BatchNorm1d(4, name="bn")(nn.Dense(4, name="dense")(x), train=training)


class WithDeterministic(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool):
        h = nn.Dense(4, name="dense")(x)
        return jaxbn.BatchNorm1d(4, name="bn")(h, train=not deterministic)


class WithUseRunningAverage(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average: bool):
        return flax_compat.BatchNorm(name="bn")(nn.Dense(4, name="dense")(x), use_running_average)


FLAGGED = [
    (WithTraining(), {"training": False}),
    (WithDeterministic(), {"deterministic": True}),
    (WithUseRunningAverage(), {"use_running_average": True}),
    (
        nn.Sequential(
            [nn.Dense(4), flax_compat.BatchNorm(use_running_average=True), nn.relu, nn.Dense(2)]
        ),
        {},
    ),
]


@pytest.mark.parametrize(("model", "flags"), FLAGGED, ids=lambda p: type(p).__name__)
def test_models_whose_flag_has_another_name_or_none_fold(model, flags):
    variables = loaded(model.init(jax.random.key(0), X, **flags))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert len(result.folded) == 1 and not result.left
    assert_close(
        f"fold {type(model).__name__} eval",
        result.model.apply(result.variables, X, **flags),
        model.apply(variables, X, **flags),
        1e-5,
        1e-5,
    )


# jax-resnet's ResNet (github.com/n2cholas/jax-resnet, resnet.py / common.py), written as it is:
# an nn.Sequential of a stem, a max pool, bottleneck blocks, a mean and a Dense; each ConvBlock
# reads the mode from whether batch_stats is mutable.


class ConvBlock(nn.Module):
    n_filters: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    activation: Callable = nn.relu
    padding: Any = ((0, 0), (0, 0))
    is_last: bool = False
    norm: str = "flax_compat"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.n_filters, self.kernel_size, self.strides, use_bias=False, padding=self.padding
        )(x)
        mutable = self.is_mutable_collection("batch_stats")
        if self.norm == "flax_compat":
            x = flax_compat.BatchNorm(use_running_average=not mutable, momentum=0.9)(x)
        else:
            x = jaxbn.BatchNorm2d()(x, train=mutable)
        return x if self.is_last else self.activation(x)


class ResNetStem(nn.Module):
    block: Callable

    @nn.compact
    def __call__(self, x):
        return self.block(8, kernel_size=(7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)])(x)


class ResNetSkipConnection(nn.Module):
    strides: tuple[int, int]
    block: Callable

    @nn.compact
    def __call__(self, x, out_shape):
        if x.shape != out_shape:
            x = self.block(
                out_shape[-1], kernel_size=(1, 1), strides=self.strides, activation=lambda y: y
            )(x)
        return x


class ResNetBottleneckBlock(nn.Module):
    n_hidden: int
    block: Callable
    strides: tuple[int, int] = (1, 1)
    expansion: int = 4

    @nn.compact
    def __call__(self, x):
        y = self.block(self.n_hidden, kernel_size=(1, 1))(x)
        y = self.block(self.n_hidden, strides=self.strides, padding=[(1, 1), (1, 1)])(y)
        y = self.block(self.n_hidden * self.expansion, kernel_size=(1, 1), is_last=True)(y)
        return nn.relu(y + ResNetSkipConnection(self.strides, self.block)(x, y.shape))


def jax_resnet(norm: str) -> nn.Sequential:
    """jax-resnet's ``ResNet(ResNetBottleneckBlock, stage_sizes=[1, 1], ...)``, tiny."""
    block = functools.partial(ConvBlock, norm=norm)
    layers = [
        ResNetStem(block),
        functools.partial(
            nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
        ),
        ResNetBottleneckBlock(4, block),
        ResNetBottleneckBlock(4, block, strides=(2, 2)),
        functools.partial(jnp.mean, axis=(1, 2)),
        nn.Dense(5),
    ]
    return nn.Sequential(layers)


class TorchConvBlock(torch.nn.Sequential):
    def __init__(self, c_in, c_out, kernel, stride=1, padding=0, act=True):
        layers = [torch.nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)]
        layers += [torch.nn.BatchNorm2d(c_out)] + ([torch.nn.ReLU()] if act else [])
        super().__init__(*layers)


class TorchBottleneck(torch.nn.Module):
    def __init__(self, c_in, hidden, stride):
        super().__init__()
        self.a = TorchConvBlock(c_in, hidden, 1)
        self.b = TorchConvBlock(hidden, hidden, 3, stride, 1)
        self.c = TorchConvBlock(hidden, 4 * hidden, 1, act=False)
        self.skip = TorchConvBlock(c_in, 4 * hidden, 1, stride, act=False)

    def forward(self, x):
        return torch.relu(self.c(self.b(self.a(x))) + self.skip(x))


class TorchResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = TorchConvBlock(3, 8, 7, 2, 3)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.block1 = TorchBottleneck(8, 4, 1)
        self.block2 = TorchBottleneck(16, 4, 2)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.pool(self.stem(x))))
        return self.fc(x.mean((2, 3)))


# jax-resnet's scope path of each ConvBlock → the torch twin's module name
CONV_BLOCKS = {
    ("layers_0", "ConvBlock_0"): "stem",
    **{
        (f"layers_{i + 2}", f"ConvBlock_{j}"): f"block{i + 1}.{name}"
        for i in range(2)
        for j, name in enumerate("abc")
    },
    **{
        (f"layers_{i + 2}", "ResNetSkipConnection_0", "ConvBlock_0"): f"block{i + 1}.skip"
        for i in range(2)
    },
}


def torch_twin(variables, norm_name: str) -> TorchResNet:
    net = TorchResNet()
    params, stats = variables["params"], variables["batch_stats"]
    t = lambda a: torch.as_tensor(np.array(a))
    with torch.no_grad():
        for path, name in CONV_BLOCKS.items():
            conv, bn = net.get_submodule(name)[0], net.get_submodule(name)[1]
            block, block_stats = jaxbn.tools._tree.get_path(params, path), None
            block_stats = jaxbn.tools._tree.get_path(stats, path)[norm_name]
            conv.weight.copy_(t(block["Conv_0"]["kernel"]).permute(3, 2, 0, 1))
            bn.weight.copy_(t(block[norm_name]["scale"]))
            bn.bias.copy_(t(block[norm_name]["bias"]))
            bn.running_mean.copy_(t(block_stats["mean"]))
            bn.running_var.copy_(t(block_stats["var"]))
        net.fc.weight.copy_(t(params["layers_5"]["kernel"]).T)
        net.fc.bias.copy_(t(params["layers_5"]["bias"]))
    return net.eval()


@pytest.mark.parametrize("norm", ["flax_compat", "jaxbn"])
def test_a_jax_resnet_style_sequential_resnet_folds_as_written_like_torch_fx_fuse(norm):
    model = jax_resnet(norm)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.float32)
    # random numpy weights: compiling the initializers would take longer than the test
    rng = np.random.default_rng(4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = loaded(
        jax.tree.map(lambda s: np.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    )
    norm_name = "BatchNorm_0" if norm == "flax_compat" else "BatchNorm2d_0"
    result = jaxbn.fold_batch_norm(model, variables, x[:1])
    assert not result.left
    assert result.folded == {
        "/".join((*path, norm_name)): "/".join((*path, "Conv_0")) for path in CONV_BLOCKS
    }
    fused = fuse(torch_twin(variables, norm_name))
    for path, name in CONV_BLOCKS.items():
        conv = jaxbn.tools._tree.get_path(result.variables["params"], (*path, "Conv_0"))
        torch_conv = fused.get_submodule(f"{name}.0")
        assert_close(
            "fold jax-resnet kernel like torch.fx",
            np.transpose(conv["kernel"], (3, 2, 0, 1)),
            torch_conv.weight.detach(),
            1e-5,
            1e-6,
        )
        assert_close(
            "fold jax-resnet bias like torch.fx", conv["bias"], torch_conv.bias.detach(), 1e-5, 1e-6
        )
    with torch.no_grad():
        expected = fused(torch.as_tensor(np.array(x)).permute(0, 3, 1, 2)).numpy()
    assert_close(
        "fold jax-resnet outputs like torch.fx",
        result.model.apply(result.variables, x),
        expected,
        1e-4,
        1e-5,
    )


def test_freeze_where_selects_layers_of_an_nn_sequential_by_their_variable_paths():
    model = nn.Sequential(
        [nn.Dense(4), flax_compat.BatchNorm(use_running_average=False), nn.Dense(4)]
    )
    variables = loaded(model.init(jax.random.key(0), X))
    frozen_model, _ = jaxbn.freeze_batch_norm(model, variables, where=lambda p: p == "layers_1")
    # frozen: the training-mode batch norm uses its running statistics, and nothing updates
    out, updates = frozen_model.apply(variables, X, mutable=["batch_stats"])
    eval_model = nn.Sequential(
        [nn.Dense(4), flax_compat.BatchNorm(use_running_average=True), nn.Dense(4)]
    )
    assert_close("freeze sequential where", out, eval_model.apply(variables, X), 1e-6, 1e-6)
    np.testing.assert_array_equal(
        updates["batch_stats"]["layers_1"]["mean"], variables["batch_stats"]["layers_1"]["mean"]
    )


class ModeFieldOrCall(nn.Module):
    """Flax's ``nn.merge_param`` pattern: the flag as a field or at call time, not both."""

    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        mode = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        return flax_compat.BatchNorm(name="bn")(nn.Dense(4, name="dense")(x), mode)


def test_a_model_holding_its_flag_as_a_field_is_not_given_it_twice():
    model = ModeFieldOrCall(use_running_average=True)
    variables = loaded(model.init(jax.random.key(0), X))
    result = jaxbn.fold_batch_norm(model, variables, X[:1])
    assert result.folded == {"bn": "dense"}
    assert_close(
        "fold field flag",
        result.model.apply(result.variables, X),
        model.apply(variables, X),
        1e-5,
        1e-5,
    )
