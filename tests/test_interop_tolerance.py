"""verify_port's tolerance follows the precision and the depth: a correct deep float32 port
passes, a float64 port is held to float64's rounding, and a real porting bug deep in the model
is still caught. Names that do not match give a short error that counts them and says how to
pass ``rename``; a port where no layer matched by name is refused. PyTorch is the oracle.

The deep model is torchvision's ResNet-50 written out (bottleneck blocks 3, 4, 6, 3; 1×1
``downsample`` shortcuts; the names torchvision uses), with an eighth of its widths and 32×32
inputs so that the test is fast: 53 batch norms, 170 layer calls.
"""

from __future__ import annotations

import copy
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import interop

WIDTHS = (8, 16, 32, 64)  # torchvision: (64, 128, 256, 512)
BLOCKS = (3, 4, 6, 3)


class TorchBottleneck(torch.nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.conv3 = torch.nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(planes * 4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                torch.nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class TorchResNet50(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, WIDTHS[0], 7, 2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(WIDTHS[0])
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, padding=1)
        inplanes = WIDTHS[0]
        for stage, (planes, blocks) in enumerate(zip(WIDTHS, BLOCKS, strict=True)):
            layers = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(TorchBottleneck(inplanes, planes, stride))
                inplanes = planes * 4
            setattr(self, f"layer{stage + 1}", torch.nn.Sequential(*layers))
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(inplanes, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, *, train):
        def conv(features, kernel, stride, name):
            return nn.Conv(
                features, (kernel, kernel), stride, padding=kernel // 2, use_bias=False, name=name
            )

        identity = x
        if self.stride != 1 or x.shape[-1] != self.planes * 4:
            identity = conv(self.planes * 4, 1, self.stride, "downsample_0")(x)
            identity = jaxbn.BatchNorm2d(name="downsample_1")(identity, train=train)
        out = nn.relu(
            jaxbn.BatchNorm2d(name="bn1")(conv(self.planes, 1, 1, "conv1")(x), train=train)
        )
        out = conv(self.planes, 3, self.stride, "conv2")(out)
        out = nn.relu(jaxbn.BatchNorm2d(name="bn2")(out, train=train))
        out = jaxbn.BatchNorm2d(name="bn3")(conv(self.planes * 4, 1, 1, "conv3")(out), train=train)
        return nn.relu(out + identity)


class ResNet50(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):  # x: [N, H, W, 3]
        x = nn.Conv(WIDTHS[0], (7, 7), 2, padding=3, use_bias=False, name="conv1")(x)
        x = nn.relu(jaxbn.BatchNorm2d(name="bn1")(x, train=train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (planes, blocks) in enumerate(zip(WIDTHS, BLOCKS, strict=True)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(planes, stride, name=f"layer{stage + 1}_{block}")(x, train=train)
        return nn.Dense(10, name="fc")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def net():
    """Trained-looking statistics (two train-mode batches), affine parameters away from 1/0."""
    torch.manual_seed(0)
    net = TorchResNet50().train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 32, 32))
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def x():
    # Unnormalized inputs (pixel values in the hundreds): every activation is large, so a
    # correct float32 port differs from torch by more than 1e-4 + 1e-4·|torch| in places.
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1000


@pytest.fixture(scope="module")
def ported(net, x):
    template = jax.eval_shape(
        lambda: ResNet50().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    return interop.torch_to_flax(net.state_dict(), template)


def test_a_correct_deep_float32_port_with_large_activations_is_verified(net, x, ported):
    diff = interop.verify_port(net, ResNet50(), ported, x, input_layout="channels_first")
    logits = net(x).detach().numpy()
    assert 0 < diff < 1e-5 * np.max(np.abs(logits))  # float32 rounding, not a wrong weight


def test_a_wrong_eps_deep_in_a_float32_port_is_still_caught(net, x, ported):
    wrong = copy.deepcopy(net)
    wrong.layer4[2].bn2.eps = 1e-3  # the torch layer used another eps than the Flax port
    with pytest.raises(
        ValueError,
        match=re.escape("layer 'layer4.2.bn2' (Flax 'layer4_2/bn2') differs from PyTorch by up to")
        + r".*"
        + re.escape("the last being 'layer4.2.conv2'"),
    ):
        interop.verify_port(wrong, ResNet50(), ported, x, input_layout="channels_first")


def test_a_float64_port_is_held_to_float64_rounding():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).double().eval()
    model = nn.Sequential([nn.Dense(6, param_dtype=jnp.float64), BatchNormEval(6)])
    names = {"layers_0": "0", "layers_1/bn": "1"}
    x = torch.randn(5, 4, dtype=torch.float64)
    with jax.enable_x64(True):
        template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4))))
        variables = interop.torch_to_flax(net.state_dict(), template, rename=names)
        assert interop.verify_port(net, model, variables, x, rename=names) < 1e-13
        # a running variance off by one part in 1e9: invisible in float32, a bug in float64
        variables["batch_stats"]["layers_1"]["bn"]["var"] *= 1 + 1e-9
        with pytest.raises(ValueError, match=re.escape("layer '1' (Flax 'layers_1/bn') differs")):
            interop.verify_port(net, model, variables, x, rename=names)


class BatchNormEval(nn.Module):
    """A float64 jaxbn BatchNorm1d in eval mode, for an nn.Sequential."""

    features: int

    @nn.compact
    def __call__(self, x):
        return jaxbn.BatchNorm1d(self.features, param_dtype=jnp.float64, name="bn")(x, train=False)


# --- names -------------------------------------------------------------------------------------


def test_names_that_do_not_follow_the_rule_give_a_short_error_that_counts_them(net, ported):
    class Renamed(nn.Module):  # the same layers under names of the user's own
        @nn.compact
        def __call__(self, x, *, train):
            return ResNet50(name="backbone")(x, train=train)

    template = jax.eval_shape(
        lambda: Renamed().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    with pytest.raises(KeyError) as info:
        interop.torch_to_flax(net.state_dict(), template)
    message = str(info.value)
    assert len(message) < 1500
    assert "320 missing keys" in message and "320 unexpected keys" in message
    assert "107 of the model's 107 layers found no torch key" in message
    assert "(Flax 'backbone/bn1' looked for 'backbone.bn1')" in message
    assert "pass rename={'<Flax path>': '<torch module>'}" in message
    # the fix the message names: the parent's path renames every layer below it
    variables = interop.torch_to_flax(net.state_dict(), template, rename={"backbone": ""})
    jax.tree.map(
        np.testing.assert_array_equal,
        variables,
        {collection: {"backbone": tree} for collection, tree in ported.items()},
    )


def test_a_port_where_no_layer_matches_by_name_is_refused_although_the_outputs_agree():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(3, name="head")(x)

    x = torch.randn(5, 4)
    variables = interop.torch_to_flax(
        net.state_dict(),
        Model().init(jax.random.key(0), jnp.zeros((1, 4)), train=False),
        rename={"head": "0"},
    )
    np.testing.assert_allclose(
        Model().apply(variables, jnp.asarray(x.numpy()), train=False),
        net(x).detach().numpy(),
        atol=1e-6,
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "no PyTorch layer matched a Flax module by name, so the port is not verified layer "
            "by layer (final outputs alone can agree by chance): PyTorch's 1 layers are e.g. "
            "['0'], the Flax modules e.g. ['head'] (as torch names ['head']); pass "
            "rename={'<Flax path>': '<torch module>'} or rename=lambda flax_path: "
            "torch_module_path"
        ),
    ):
        interop.verify_port(net, Model(), variables, x)
    assert interop.verify_port(net, Model(), variables, x, rename={"head": "0"}) < 1e-6
