"""Porting torchvision's ResNet-18 to Flax with jaxbn, the whole recipe a user follows, checked
against PyTorch at each step: the template from ``jax.eval_shape``, ``torch_to_flax``, the
one-call port check, three SGD steps in float64, ``fold_batch_norm`` against
``torch.fx.experimental.optimization.fuse``, ``inspect_batchnorm``, and the round trip back into
the torch model with ``strict=True``.

The torch model is torchvision's ``resnet18`` written out (torchvision is not a test
dependency): 7×7 stride-2 stem, padded 3×3 max-pool, bias-free convs, ``BasicBlock`` with 1×1
``downsample`` shortcuts, adaptive average pool, ``fc``. Widths are an eighth of torchvision's
(8, 16, 32, 64 instead of 64…512) and the input is 32×32 so that the test is fast; the
structure, the names and every layer's kind are torchvision's.
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
from torch.fx.experimental.optimization import fuse

import jaxbn
from jaxbn import interop

WIDTHS = (8, 16, 32, 64)  # torchvision: (64, 128, 256, 512)
NUM_CLASSES = 10


# --- the PyTorch model: torchvision.models.resnet18, written out ------------------------------


class TorchBasicBlock(torch.nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                torch.nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchResNet18(torch.nn.Module):
    def __init__(self, widths=WIDTHS, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, widths[0], 7, 2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(widths[0])
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, padding=1)
        inplanes = widths[0]
        for stage, planes in enumerate(widths):
            stride = 1 if stage == 0 else 2
            blocks = [TorchBasicBlock(inplanes, planes, stride), TorchBasicBlock(planes, planes)]
            setattr(self, f"layer{stage + 1}", torch.nn.Sequential(*blocks))
            inplanes = planes
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- its Flax port, with jaxbn's batch norm: names follow the default rule --------------------


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, *, train):
        conv = lambda kernel, stride, name: nn.Conv(
            self.planes, kernel, stride, padding=kernel[0] // 2, use_bias=False, name=name
        )
        identity = x
        out = conv((3, 3), self.stride, "conv1")(x)
        out = nn.relu(jaxbn.BatchNorm2d(name="bn1")(out, train=train))
        out = jaxbn.BatchNorm2d(name="bn2")(conv((3, 3), 1, "conv2")(out), train=train)
        if self.stride != 1 or x.shape[-1] != self.planes:
            identity = conv((1, 1), self.stride, "downsample_0")(x)  # torch: downsample.0
            identity = jaxbn.BatchNorm2d(name="downsample_1")(identity, train=train)
        return nn.relu(out + identity)


class ResNet18(nn.Module):
    widths: tuple[int, ...] = WIDTHS
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, *, train):  # x: [N, H, W, 3]
        x = nn.Conv(self.widths[0], (7, 7), 2, padding=3, use_bias=False, name="conv1")(x)
        x = nn.relu(jaxbn.BatchNorm2d(name="bn1")(x, train=train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
        for stage, planes in enumerate(self.widths):
            stride = 1 if stage == 0 else 2
            x = BasicBlock(planes, stride, name=f"layer{stage + 1}_0")(x, train=train)
            x = BasicBlock(planes, name=f"layer{stage + 1}_1")(x, train=train)
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


# --- the recipe --------------------------------------------------------------------------------


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


@pytest.fixture(scope="module")
def net():
    """The torch model with trained-looking batch norms (a few train-mode batches, then affine
    parameters away from 1/0)."""
    torch.manual_seed(0)
    net = TorchResNet18()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 32, 32) * 2 + 0.5)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def eval_shape_template(model, x, dtype=None):
    """The variables' names, shapes and dtypes, without computing a weight."""
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), nhwc(x), train=False))
    if dtype is None:
        return template
    return jax.tree.map(
        lambda s: (
            jax.ShapeDtypeStruct(s.shape, dtype) if jnp.issubdtype(s.dtype, jnp.floating) else s
        ),
        template,
    )


@pytest.fixture(scope="module")
def ported(net, x):
    return interop.torch_to_flax(net.state_dict(), eval_shape_template(ResNet18(), x))


def test_the_port_from_an_eval_shape_template_agrees_with_torch_layer_by_layer(net, x, ported):
    diff = interop.verify_port(net, ResNet18(), ported, x, input_layout="channels_first")
    assert diff < 1e-5
    # the one-call recipe gives the same variables
    variables = interop.torch_module_to_flax(net, ResNet18(), x, input_layout="channels_first")
    jax.tree.map(np.testing.assert_array_equal, variables, ported)
    assert len(list(jaxbn.tools._tree.batch_norm_layers(variables))) == 20


def test_three_sgd_steps_in_float64_match_torch(net, x):
    torch_net = copy.deepcopy(net).double().train()
    optimizer = torch.optim.SGD(torch_net.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(2)
    batches = [
        (
            torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 + 0.5,
            torch.randint(0, NUM_CLASSES, (8,), generator=generator),
        )
        for _ in range(3)
    ]
    torch_losses = []
    for xb, yb in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch_net(xb), yb)
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())

    model = ResNet18()
    with jax.enable_x64(True):
        template = eval_shape_template(model, x, jnp.float64)
        variables = interop.torch_to_flax(net.state_dict(), template)

        @jax.jit
        def step(variables, xb, yb):
            def loss_fn(params):
                logits, updates = model.apply(
                    {**variables, "params": params}, xb, train=True, mutable=["batch_stats"]
                )
                log_p = jax.nn.log_softmax(logits)
                return -jnp.mean(jnp.take_along_axis(log_p, yb[:, None], 1)), updates

            (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
            params = jax.tree.map(lambda p, g: p - 0.05 * g, variables["params"], grads)
            return {"params": params, **updates}, loss

        losses = []
        for xb, yb in batches:
            variables, loss = step(variables, nhwc(xb), jnp.asarray(yb.numpy()))
            losses.append(float(loss))
        trained = interop.flax_to_torch(variables)

    np.testing.assert_allclose(losses, torch_losses, rtol=1e-12)
    state = torch_net.state_dict()
    assert sorted(trained) == sorted(state)
    for key, value in state.items():  # weights, running statistics, num_batches_tracked
        np.testing.assert_allclose(trained[key], value.numpy(), rtol=1e-11, atol=1e-12, err_msg=key)


def test_fold_batch_norm_folds_every_batch_norm_into_its_bias_free_conv_like_torch_fx(
    net, x, ported
):
    model = ResNet18()
    result = jaxbn.fold_batch_norm(model, ported, nhwc(x)[:1])
    assert not result.left
    assert len(result.folded) == 20
    assert result.folded["layer2_0/downsample_1"] == "layer2_0/downsample_0"
    assert "batch_stats" not in result.variables
    fused = fuse(net)
    fused_state = fused.state_dict()
    folded_state = interop.flax_to_torch(result.variables)
    assert sorted(folded_state) == sorted(fused_state)  # every conv now has a bias, no BN left
    for key, value in fused_state.items():
        np.testing.assert_allclose(folded_state[key], value.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected = fused(x).numpy()
    np.testing.assert_allclose(
        result.model.apply(result.variables, nhwc(x), train=False), expected, atol=1e-5
    )


def test_inspect_batchnorm_lists_the_ported_layers_in_the_models_order(net, ported):
    report = jaxbn.inspect_batchnorm(ported)
    torch_order = [
        name for name, module in net.named_modules() if isinstance(module, torch.nn.BatchNorm2d)
    ]
    flax_order = [re.sub(r"\.(\d+)", r"_\1", name).replace(".", "/") for name in torch_order]
    assert [layer.path for layer in report.layers] == flax_order
    assert report.problems == []
    layer = report.layers[flax_order.index("layer3_0/downsample_1")]
    np.testing.assert_array_equal(layer.var, net.layer3[0].downsample[1].running_var.numpy())
    assert layer.num_batches_tracked == 3


def test_the_round_trip_is_bit_identical_and_loads_strictly(net, ported):
    back = interop.flax_to_torch(ported)
    for key, value in net.state_dict().items():
        assert back[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    fresh = TorchResNet18()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
