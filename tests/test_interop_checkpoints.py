"""Real checkpoints load as PyTorch loads them: a BatchNorm state_dict saved before
``num_batches_tracked`` existed (torch < 0.4.1), torchvision's ``FrozenBatchNorm2d`` buffers
(weight, bias, running_mean, running_var), and a state_dict whose counter was removed after
saving (refused, as torch refuses it). PyTorch is the oracle: what ``load_state_dict(strict=True)``
does with the same dict, and the outputs and statistics after loading."""

from __future__ import annotations

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import interop


class TorchFrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.FrozenBatchNorm2d, written out (torchvision is not a test dependency)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision does
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def torch_stem(norm) -> torch.nn.Module:
    """detectron2's stem: conv1 → bn1 → relu, with statistics away from 0/1."""
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    net.bn1 = norm(4)
    net.forward = lambda x: torch.relu(net.bn1(net.conv1(x)))
    with torch.no_grad():
        net.bn1.running_mean.normal_()
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.normal_()
        net.bn1.bias.normal_()
    return net.eval()


class Stem(nn.Module):
    frozen: bool = False
    momentum: float | None = 0.1

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv1")(x)
        if self.frozen:
            return nn.relu(jaxbn.FrozenBatchNorm(4, name="bn1")(x))
        return nn.relu(jaxbn.BatchNorm2d(momentum=self.momentum, name="bn1")(x, train=train))


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


def template(model: nn.Module) -> dict:
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)), train=False)
    )


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def old_checkpoint(net: torch.nn.Module) -> dict:
    """The state_dict torch < 0.4.1 saved: no counter, no version marks (a plain dict)."""
    return collections.OrderedDict(
        (k, v) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")
    )


def test_an_old_state_dict_without_counters_loads_as_torch_loads_it_and_trains_alike():
    source = torch_stem(torch.nn.BatchNorm2d)
    old = old_checkpoint(source)
    loaded = torch_stem(torch.nn.BatchNorm2d)
    loaded.bn1.momentum = None  # the one place the counter is read: the cumulative average
    loaded.load_state_dict(old, strict=True)  # torch accepts it: counter of the new model, 0
    assert int(loaded.bn1.num_batches_tracked) == 0

    model = Stem(momentum=None)
    variables = interop.torch_to_flax(old, template(model))
    count = variables["batch_stats"]["bn1"]["num_batches_tracked"]
    assert count.dtype == jnp.int32 and int(count) == 0
    with torch.no_grad():
        expected = loaded(X).numpy()
    np.testing.assert_allclose(
        model.apply(variables, nhwc(X), train=False), np.moveaxis(expected, 1, -1), atol=1e-6
    )
    # one training step with momentum=None: the counter decides the factor, 1/(0+1)
    loaded.train()
    with torch.no_grad():
        loaded(X)
    _, updates = model.apply(variables, nhwc(X), train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["mean"], loaded.bn1.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(stats["var"], loaded.bn1.running_var.numpy(), rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == int(loaded.bn1.num_batches_tracked) == 1


def test_a_missing_counter_keeps_the_receiving_models_own_as_torch_does():
    old = old_checkpoint(torch_stem(torch.nn.BatchNorm2d))
    receiving = torch_stem(torch.nn.BatchNorm2d)
    receiving.bn1.num_batches_tracked.fill_(7)
    receiving.load_state_dict(old, strict=True)
    assert int(receiving.bn1.num_batches_tracked) == 7
    own = jax.tree.map(jnp.asarray, Stem().init(jax.random.key(0), nhwc(X), train=False))
    own["batch_stats"]["bn1"]["num_batches_tracked"] = jnp.asarray(7, jnp.int32)
    variables = interop.torch_to_flax(old, own)
    assert int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 7


def test_a_counter_removed_from_a_new_state_dict_is_refused_as_torch_refuses_it():
    sd = torch_stem(torch.nn.BatchNorm2d).state_dict()  # _metadata: bn1 is BatchNorm version 2
    del sd["bn1.num_batches_tracked"]
    with pytest.raises(RuntimeError, match=re.escape('Missing key(s) in state_dict: "bn1.num')):
        torch_stem(torch.nn.BatchNorm2d).load_state_dict(sd, strict=True)
    message = (
        "bn1.num_batches_tracked is missing, but the state_dict's _metadata marks 'bn1' as a "
        "BatchNorm saved by torch >= 0.4.1, which always saves it: torch's "
        "load_state_dict(strict=True) refuses it too. If the checkpoint really predates the "
        "counter, pass dict(state_dict) (no _metadata): torch and jaxbn then load it as an old "
        "checkpoint, with the model's counter (0 for a new model), read only by momentum=None"
    )
    with pytest.raises(KeyError, match=re.escape(message)) as info:
        interop.torch_to_flax(sd, template(Stem()))
    assert "from_flax_batch_norm" not in str(info.value)  # these are not Flax statistics
    variables = interop.torch_to_flax(dict(sd), template(Stem()))  # the fix it names
    assert int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 0


@pytest.mark.parametrize("frozen", [True, False], ids=["into-FrozenBatchNorm", "into-BatchNorm2d"])
def test_torchvision_frozen_batch_norm_buffers_load_and_give_torchs_outputs(frozen):
    net = torch_stem(TorchFrozenBatchNorm2d)
    sd = net.state_dict()
    assert sorted(sd) == [
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.weight",
        "conv1.weight",
    ]
    if not frozen:  # torch loads frozen buffers into a BatchNorm2d too, with the counter at 0
        bn = torch_stem(torch.nn.BatchNorm2d)
        bn.load_state_dict(sd, strict=True)
        assert int(bn.bn1.num_batches_tracked) == 0
    model = Stem(frozen=frozen)
    variables = interop.torch_to_flax(sd, template(model))
    assert int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 0
    with torch.no_grad():
        expected = np.moveaxis(net(X).numpy(), 1, -1)
    np.testing.assert_allclose(model.apply(variables, nhwc(X), train=False), expected, atol=1e-5)
    # and back: torchvision's module drops the counter when it loads, strictly
    back = interop.flax_to_torch(variables)
    fresh = torch_stem(TorchFrozenBatchNorm2d)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for key, value in sd.items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)
