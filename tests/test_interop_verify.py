"""Interop never builds a different model silently: a port is verified against PyTorch layer by
layer, names that do not follow the default rule are mapped explicitly, norm layouts are never
guessed, counters keep their value, bfloat16 converts. PyTorch is the oracle throughout."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import interop
from tests import linen_builders, torch_models
from tests.model_pairs import make_pairs


def eval_logits(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return net(x).numpy()


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


def randomize_norms(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affine parameters and running statistics, so a wrong layout shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm | torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                module.weight.normal_()
                module.bias.normal_()
            if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return net


# --- the flatten before the first dense layer --------------------------------------------------


def test_a_port_that_forgets_flatten_shapes_is_refused_naming_the_dense_layer_and_the_fix():
    pair = make_pairs()["convnet"]
    randomize_norms(pair.torch_model)
    x = torch.randn(pair.input_shape)
    with pytest.raises(
        ValueError,
        match=re.escape("layer 'classifier.0' (Flax 'classifier_0') differs from PyTorch by up to")
        + r".*"
        + re.escape("pass flatten_shapes={'classifier_0': (32, 2, 2)}"),
    ):
        interop.torch_module_to_flax(pair.torch_model, pair.model, x, input_layout="channels_first")


def test_a_verified_convnet_port_gives_torchs_eval_logits():
    pair = make_pairs()["convnet"]
    randomize_norms(pair.torch_model)
    x = torch.randn(pair.input_shape)
    variables = interop.torch_module_to_flax(
        pair.torch_model,
        pair.model,
        x,
        input_layout="channels_first",
        flatten_shapes=pair.model.torch_flatten_shapes(8, 8),
    )
    got = pair.model.apply(variables, nhwc(x), train=False)
    np.testing.assert_allclose(got, eval_logits(pair.torch_model, x), atol=1e-5, rtol=1e-5)


def test_a_misspelt_flatten_shapes_key_is_an_error_naming_the_dense_layers():
    pair = make_pairs()["convnet"]
    template = linen_builders.init(pair.model, jnp.zeros((1, 8, 8, 1)), train=False)
    message = (
        "flatten_shapes keys ['classifer_0'] match no dense layer; "
        "the dense layers are ['classifier_0', 'classifier_3']"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        interop.torch_to_flax(
            pair.torch_model.state_dict(), template, flatten_shapes={"classifer_0": (32, 2, 2)}
        )
    with pytest.raises(ValueError, match=re.escape(message)):
        interop.flax_to_torch(template, flatten_shapes={"classifer_0": (32, 2, 2)})


def test_a_flatten_shape_of_the_wrong_size_names_the_key():
    pair = make_pairs()["convnet"]
    template = linen_builders.init(pair.model, jnp.zeros((1, 8, 8, 1)), train=False)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "classifier.0.weight: flatten_shapes['classifier_0'] = (32, 4, 4) holds 512 values, "
            "the layer takes 128"
        ),
    ):
        interop.torch_to_flax(
            pair.torch_model.state_dict(), template, flatten_shapes={"classifier_0": (32, 4, 4)}
        )


# --- verification, layer by layer --------------------------------------------------------------


def test_verify_port_passes_a_resnet_whose_torch_forward_works_in_place():
    # ResidualBlock does `out += identity` after bn2 and the stem uses relu: the recorded
    # activations must be copies, or a correct port would be reported as wrong.
    pair = make_pairs()["resnet"]
    randomize_norms(pair.torch_model)
    variables = pair.load_into_jax()
    x = torch.randn(pair.input_shape)
    diff = interop.verify_port(
        pair.torch_model, pair.model, variables, x, input_layout="channels_first"
    )
    assert diff < 1e-5


def test_verify_port_names_the_first_layer_whose_weights_are_wrong():
    pair = make_pairs()["resnet"]
    randomize_norms(pair.torch_model)
    variables = pair.load_into_jax()
    stats = variables["batch_stats"]["layer2_0"]["bn2"]
    stats["var"] = stats["var"] * 2  # one wrong layer
    with pytest.raises(
        ValueError,
        match=re.escape("layer 'layer2.0.bn2' (Flax 'layer2_0/bn2') differs from PyTorch by"),
    ):
        interop.verify_port(
            pair.torch_model,
            pair.model,
            variables,
            torch.randn(pair.input_shape),
            input_layout="channels_first",
        )


def test_verify_port_names_the_gap_when_the_difference_is_between_layers():
    class Doubling(torch.nn.Module):  # a forward that the Flax model does not have
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * 2

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(3, name="fc")(x)

    net = Doubling()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the output differs from PyTorch by up to",
        )
        + r".*"
        + re.escape("after the last matching layer 'fc'"),
    ):
        interop.torch_module_to_flax(net, Plain(), torch.randn(5, 4))


def test_verify_port_needs_the_input_layout_of_an_image_batch_and_restores_train_mode():
    pair = make_pairs()["resnet"]
    pair.torch_model.train()
    with pytest.raises(ValueError, match=re.escape("sample_input has 4 dims: pass input_layout=")):
        interop.verify_port(pair.torch_model, pair.model, {}, torch.randn(pair.input_shape))
    interop.verify_port(
        pair.torch_model,
        pair.model,
        pair.load_into_jax(),
        torch.randn(pair.input_shape),
        input_layout="channels_first",
    )
    assert pair.torch_model.training


# --- layer norm layouts ------------------------------------------------------------------------


class ConvNetWithLN(torch.nn.Module):
    """The tutorial's ConvNet with ``nn.LayerNorm([C, H, W])`` in place of BatchNorm2d (the twin
    of ``jaxbn.models.ConvNet(norm="layer")``), on 8×8 single-channel images."""

    def __init__(self, widths=(8, 16, 32), hidden=32, num_classes=10):
        super().__init__()
        c1, c2, c3 = widths
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, c1, 3, padding=1),
            torch.nn.LayerNorm([c1, 8, 8]),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2, 2),
            torch.nn.Conv2d(c1, c2, 3, padding=1),
            torch.nn.LayerNorm([c2, 4, 4]),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2, 2),
            torch.nn.Conv2d(c2, c3, 3, padding=1),
            torch.nn.LayerNorm([c3, 2, 2]),
            torch.nn.ReLU(inplace=True),
        )
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(c3 * 4, hidden),
            torch.nn.LayerNorm([hidden]),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_a_layer_norm_weight_whose_layout_both_shapes_allow_is_refused_without_norm_layouts():
    # features.1 is LayerNorm([8, 8, 8]): [C, H, W] and [H, W, C] have the same shape
    net = randomize_norms(ConvNetWithLN())
    model = jaxbn.models.ConvNet(widths=(8, 16, 32), hidden=32, norm="layer")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "features.1.weight: a 3-D norm weight of shape (8, 8, 8): both layouts fit the "
            "model; pass norm_layouts={'features_1': 'channels_first'} if the layer sees image "
            "data (torch [C, ...] ↔ Flax [..., C]) or norm_layouts={'features_1': 'same'}"
        ),
    ):
        interop.torch_module_to_flax(
            net,
            model,
            torch.randn(4, 1, 8, 8),
            input_layout="channels_first",
            flatten_shapes=model.torch_flatten_shapes(8, 8),
        )


def test_a_layer_norm_on_images_ports_with_norm_layouts_and_round_trips():
    net = randomize_norms(ConvNetWithLN())
    model = jaxbn.models.ConvNet(widths=(8, 16, 32), hidden=32, norm="layer")
    x = torch.randn(4, 1, 8, 8)
    kwargs = dict(flatten_shapes=model.torch_flatten_shapes(8, 8), norm_layouts="channels_first")
    variables = interop.torch_module_to_flax(net, model, x, input_layout="channels_first", **kwargs)
    got = model.apply(variables, nhwc(x), train=False)
    np.testing.assert_allclose(got, eval_logits(net, x), atol=1e-5, rtol=1e-5)
    back = interop.flax_to_torch(variables, **kwargs)
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_a_layer_norm_on_sequences_keeps_its_layout():
    class SequenceNet(torch.nn.Module):  # LayerNorm over the trailing [L, D] of [N, L, D]
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm([4, 4])
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.norm(x))

    class SequenceModel(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(2, name="head")(jaxbn.LayerNorm((4, 4), name="norm")(x))

    net = randomize_norms(SequenceNet())
    x = torch.randn(3, 4, 4)
    variables = interop.torch_module_to_flax(
        net, SequenceModel(), x, input_layout="same", norm_layouts={"norm": "same"}
    )
    got = SequenceModel().apply(variables, jnp.asarray(x.numpy()), train=False)
    np.testing.assert_allclose(got, eval_logits(net, x), atol=1e-5, rtol=1e-5)
    # declaring it image data builds a different model: verification says where
    with pytest.raises(ValueError, match=re.escape("layer 'norm' (Flax 'norm') differs")):
        interop.torch_module_to_flax(
            net, SequenceModel(), x, input_layout="same", norm_layouts={"norm": "channels_first"}
        )
    with pytest.raises(ValueError, match=re.escape("pass norm_layouts={'norm': 'channels_first'}")):
        interop.flax_to_torch(variables)


# --- names -------------------------------------------------------------------------------------


RENAME_NET_WITHOUT_BN = {"layers_3": "layers.2", "layers_6": "layers.4"}


def test_rename_maps_mlp_none_onto_the_tutorials_net_without_bn_both_ways():
    net = torch_models.NetWithoutBN(64, (32, 16))
    model = jaxbn.models.MLP(hidden=(32, 16), norm="none")
    x = torch.randn(16, 64)
    variables = interop.torch_module_to_flax(net, model, x, rename=RENAME_NET_WITHOUT_BN)
    got = model.apply(variables, jnp.asarray(x.numpy()), train=False)
    np.testing.assert_allclose(got, eval_logits(net, x), atol=1e-5, rtol=1e-5)
    back = interop.flax_to_torch(variables, rename=RENAME_NET_WITHOUT_BN)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # strict


def test_rename_as_a_function_and_for_a_parent_module():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="conv_1")(x)  # a user's own name, not a list index

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return Block(name="encoder")(x)

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_1 = torch.nn.Linear(4, 3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()

        def forward(self, x):
            return self.backbone.conv_1(x)

    net = Net()
    x = torch.randn(5, 4)
    expected = net.backbone.conv_1(x).detach().numpy()
    for rename in (
        {"encoder": "backbone", "encoder/conv_1": "backbone.conv_1"},
        lambda path: path.replace("encoder/", "backbone."),
    ):
        variables = interop.torch_module_to_flax(net, Model(), x, rename=rename)
        got = Model().apply(variables, jnp.asarray(x.numpy()), train=False)
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_rename_key_that_matches_no_module_is_an_error():
    model = jaxbn.models.MLP(hidden=(32, 16), norm="none")
    template = linen_builders.init(model, jnp.zeros((1, 64)), train=False)
    sd = torch_models.NetWithoutBN(64, (32, 16)).state_dict()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rename keys ['layers.3'] match no Flax module; "
            "the modules are ['layers_0', 'layers_3', 'layers_6']"
        ),
    ):
        interop.torch_to_flax(sd, template, rename={"layers.3": "layers.2"})


def test_two_flax_modules_renamed_to_one_torch_module_is_an_error():
    model = jaxbn.models.MLP(hidden=(32, 16), norm="none")
    template = linen_builders.init(model, jnp.zeros((1, 64)), train=False)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "params/layers_0/kernel and params/layers_3/kernel both map to the torch key "
            "'layers.0.weight'"
        ),
    ):
        interop.flax_to_torch(template, rename={"layers_3": "layers.0"})


def test_a_model_that_is_a_single_layer_uses_bare_torch_keys():
    bn = randomize_norms(torch.nn.BatchNorm1d(3))
    module = jaxbn.BatchNorm1d(3)
    x = torch.randn(6, 3)
    variables = interop.torch_module_to_flax(bn, module, x)
    np.testing.assert_allclose(
        module.apply(variables, jnp.asarray(x.numpy()), train=False),
        eval_logits(bn, x),
        atol=1e-6,
    )
    assert sorted(interop.flax_to_torch(variables)) == sorted(bn.state_dict())


def test_a_flax_list_of_lists_maps_to_torchs_nested_sequentials_by_default():
    # MobileNetV2's `features.0.0` (a Conv2dNormActivation inside a Sequential) is what Flax
    # names `features_0_0` for a list of lists in setup.
    class Net(nn.Module):
        def setup(self):
            self.features = [
                [nn.Conv(4, (3, 3), use_bias=False), jaxbn.BatchNorm2d()],
                [nn.Conv(4, (1, 1), use_bias=False), jaxbn.BatchNorm2d()],
            ]

        def __call__(self, x, *, train):
            for conv, bn in self.features:
                x = nn.relu(bn(conv(x), train=train))
            return x

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Sequential(
                    torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                    torch.nn.BatchNorm2d(4),
                    torch.nn.ReLU(),
                ),
                torch.nn.Sequential(
                    torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
                ),
            )

        def forward(self, x):
            return self.features(x)

    net = randomize_norms(TorchNet())
    assert interop.torch_module_path(("features_0_0",)) == "features.0.0"
    x = torch.randn(2, 3, 6, 6)
    variables = interop.torch_module_to_flax(net, Net(), x, input_layout="channels_first")
    assert sorted(interop.flax_to_torch(variables)) == sorted(net.state_dict())


class TorchBasicConv2d(torch.nn.Module):
    def __init__(self, c_in, c_out, kernel):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = torch.nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TorchInceptionStem(torch.nn.Module):
    """torchvision Inception-v3's names: segments that really end in `_<digits>`."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 4, 3)
        self.Mixed_5b = torch.nn.Module()
        self.Mixed_5b.branch1x1 = TorchBasicConv2d(4, 2, 1)
        self.Mixed_5b.branch5x5_1 = TorchBasicConv2d(4, 3, 1)
        self.Mixed_5b.branch5x5_2 = TorchBasicConv2d(3, 2, 5)

    def forward(self, x):
        x = self.Conv2d_1a_3x3(x)
        m = self.Mixed_5b
        return torch.cat([m.branch1x1(x), m.branch5x5_2(m.branch5x5_1(x))], 1)


class BasicConv2d(nn.Module):
    features: int
    kernel: int

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(
            self.features, (self.kernel,) * 2, padding=self.kernel // 2, use_bias=False, name="conv"
        )(x)
        return nn.relu(jaxbn.BatchNorm2d(eps=0.001, name="bn")(x, train=train))


class InceptionStem(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = BasicConv2d(4, 3, name="Conv2d_1a_3x3")(x, train=train)
        return MixedBlock(name="Mixed_5b")(x, train=train)


class MixedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        a = BasicConv2d(2, 1, name="branch1x1")(x, train=train)
        b = BasicConv2d(3, 1, name="branch5x5_1")(x, train=train)
        b = BasicConv2d(2, 5, name="branch5x5_2")(b, train=train)
        return jnp.concatenate([a, b], axis=-1)


def test_torch_names_that_end_in_digits_are_reached_with_rename_both_ways():
    net = randomize_norms(TorchInceptionStem())
    x = torch.randn(2, 3, 7, 7)
    model = InceptionStem()
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), nhwc(x), train=False))
    with pytest.raises(KeyError, match=re.escape("4 of the model's 8 layers found no torch key")):
        interop.torch_to_flax(net.state_dict(), template)  # the default rule reads `_1` as an index
    by_table = {
        "Conv2d_1a_3x3": "Conv2d_1a_3x3",
        "Mixed_5b/branch5x5_1": "Mixed_5b.branch5x5_1",
        "Mixed_5b/branch5x5_2": "Mixed_5b.branch5x5_2",
    }
    for rename in (by_table, lambda path: path.replace("/", ".")):
        variables = interop.torch_module_to_flax(
            net, model, x, input_layout="channels_first", rename=rename
        )
        back = interop.flax_to_torch(variables, rename=rename)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # strict
        for key, value in net.state_dict().items():
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_a_flax_name_with_two_indices_can_be_renamed_to_a_torch_name_with_one():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(3, name="conv_0_0")(x)

    net = torch.nn.Module()
    net.conv_0 = torch.nn.ModuleList([torch.nn.Linear(4, 3)])
    net.forward = lambda x: net.conv_0[0](x)
    template = jax.eval_shape(lambda: Net().init(jax.random.key(0), jnp.zeros((1, 4)), train=False))
    assert sorted(interop.flax_to_torch(jax.tree.map(jnp.zeros_like, template))) == [
        "conv.0.0.bias",
        "conv.0.0.weight",
    ]
    variables = interop.torch_module_to_flax(
        net, Net(), torch.randn(2, 4), rename={"conv_0_0": "conv_0.0"}
    )
    assert sorted(interop.flax_to_torch(variables, rename={"conv_0_0": "conv_0.0"})) == sorted(
        net.state_dict()
    )


@pytest.mark.parametrize(
    "torch_layer, flax_layer, shape",
    [
        (
            lambda: torch.nn.Conv2d(3, 5, 3),
            lambda: nn.Conv(5, (3, 3), padding="VALID"),
            (2, 3, 6, 6),
        ),
        (
            lambda: randomize_norms(torch.nn.BatchNorm2d(3)),
            lambda: jaxbn.BatchNorm2d(3),
            (2, 3, 4, 4),
        ),
    ],
    ids=["Conv2d", "BatchNorm2d"],
)
def test_a_bare_layers_state_dict_converts_with_an_eval_shape_template(
    torch_layer, flax_layer, shape
):
    layer, module = torch_layer(), flax_layer()
    x = torch.randn(shape)
    template = jax.eval_shape(
        lambda: module.init(
            jax.random.key(0),
            nhwc(x),
            **({"train": False} if isinstance(module, jaxbn.BatchNorm) else {}),
        )
    )
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(template))
    variables = interop.torch_to_flax(layer.state_dict(), template)
    kwargs = {"train": False} if isinstance(module, jaxbn.BatchNorm) else {}
    layer.eval()
    with torch.no_grad():
        expected = np.moveaxis(layer(x).numpy(), 1, -1)
    np.testing.assert_allclose(module.apply(variables, nhwc(x), **kwargs), expected, atol=1e-5)
    back = interop.flax_to_torch(variables)
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # strict


def test_flax_to_torch_refuses_an_eval_shape_template_naming_the_key():
    template = jax.eval_shape(lambda: batch_norm_template())
    with pytest.raises(
        TypeError, match=re.escape("weight: params/scale is a shape without values")
    ):
        interop.flax_to_torch(template)


def test_torch_module_to_flax_builds_its_template_without_computing_weights():
    seen = []

    class Recorder(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            if self.is_initializing():
                seen.append(isinstance(x, jax.core.Tracer))
            return nn.Dense(3, name="fc")(x)

    net = torch.nn.Module()
    net.fc = torch.nn.Linear(4, 3)
    net.forward = lambda x: net.fc(x)
    interop.torch_module_to_flax(net, Recorder(), torch.randn(2, 4))
    assert seen == [True]  # traced by jax.eval_shape, not run


# --- counters and dtypes -----------------------------------------------------------------------


def batch_norm_template(dtype=jnp.float32):
    module = jaxbn.BatchNorm1d(3, param_dtype=dtype)
    return module.init(jax.random.key(0), jnp.zeros((2, 3), dtype), train=False)


def test_a_counter_that_does_not_fit_int32_is_refused_naming_the_key_also_under_x64():
    bn = torch.nn.BatchNorm1d(3)
    bn.num_batches_tracked.fill_(2**40)
    message = (
        "num_batches_tracked: num_batches_tracked = 1099511627776 does not fit jaxbn's int32 "
        "counter (0 to 2147483647, where jaxbn's counter stops); it is read only by "
        "momentum=None (the cumulative average, factor 1/(count+1)): to load it, set it to "
        "2147483647 in the state_dict, which changes that factor from 1/1099511627777 to "
        "1/2147483648"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        interop.torch_to_flax(bn.state_dict(), batch_norm_template())
    with jax.enable_x64(True), pytest.raises(ValueError, match=re.escape(message)):
        interop.torch_to_flax(bn.state_dict(), batch_norm_template())


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_torchs_int64_counter_loads_as_int32_and_saves_as_int64(x64):
    bn = torch.nn.BatchNorm1d(3)
    bn.num_batches_tracked.fill_(2**31 - 1)  # the largest that fits
    with jax.enable_x64(x64):
        variables = interop.torch_to_flax(bn.state_dict(), batch_norm_template())
        count = variables["batch_stats"]["num_batches_tracked"]
        assert count.dtype == jnp.int32 and int(count) == 2**31 - 1
        back = interop.flax_to_torch(variables)
    assert back["num_batches_tracked"].dtype == np.int64
    assert int(back["num_batches_tracked"]) == 2**31 - 1
    fresh = torch.nn.BatchNorm1d(3)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # strict
    assert fresh.num_batches_tracked.dtype == torch.int64


def test_a_bfloat16_state_dict_converts_exactly_to_bfloat16_and_float32_and_back():
    bn = randomize_norms(torch.nn.BatchNorm1d(3)).to(torch.bfloat16)
    for dtype in (jnp.bfloat16, jnp.float32):
        variables = interop.torch_to_flax(bn.state_dict(), batch_norm_template(dtype))
        assert variables["params"]["scale"].dtype == dtype
        np.testing.assert_array_equal(
            np.asarray(variables["params"]["scale"], np.float32), bn.weight.detach().float()
        )
    back = interop.flax_to_torch(
        interop.torch_to_flax(bn.state_dict(), batch_norm_template(jnp.bfloat16))
    )
    assert back["weight"].dtype == np.float32  # numpy's torch bridge has no bfloat16
    loaded = torch.nn.BatchNorm1d(3).to(torch.bfloat16)
    loaded.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    for key, value in bn.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_tensor_that_cannot_be_converted_is_named():
    bn = torch.nn.BatchNorm1d(3)
    sd = dict(bn.state_dict())
    sd["running_var"] = sd["running_var"].to_sparse()
    with pytest.raises(TypeError, match=r"^running_var: cannot convert Tensor: "):
        interop.torch_to_flax(sd, batch_norm_template())
