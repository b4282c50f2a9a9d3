"""torch ⇄ NNX state dicts on NNX models of one's own: names by attribute path (``nnx.List``
and ``nnx.Sequential`` indices are torch's ``ModuleList``/``Sequential`` indices), the
tutorial-style CNN computes what its torch twin computes after ``torch_to_nnx``, and
``nnx_to_torch`` gives the torch state dict back exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn.nnx
from tests.test_nnx_tools_fold import FLATTEN, NORMS, SIDE, TorchCNN, TutorialCNN


def trained_torch_cnn() -> TorchCNN:
    net = TorchCNN()
    net.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        net(torch.randn(8, 1, SIDE, SIDE, generator=gen) * 2 + 1)
    return net.eval()


@pytest.fixture(scope="module")
def torch_cnn():
    return trained_torch_cnn()


@pytest.mark.parametrize("norm", list(NORMS))
def test_a_tutorial_style_cnn_loaded_from_torch_computes_what_torch_computes(torch_cnn, norm):
    model = TutorialCNN(NORMS[norm], rngs=nnx.Rngs(0))
    jaxbn.nnx.torch_to_nnx(torch_cnn.state_dict(), model, flatten_shapes=FLATTEN)
    x = torch.randn(4, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_cnn(x).numpy()
    model.eval()
    got = model(jax.numpy.asarray(x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", list(NORMS))
def test_nnx_to_torch_gives_the_loaded_state_dict_back_exactly(torch_cnn, norm):
    model = TutorialCNN(NORMS[norm], rngs=nnx.Rngs(0))
    state = torch_cnn.state_dict()
    jaxbn.nnx.torch_to_nnx(state, model, flatten_shapes=FLATTEN)
    back = jaxbn.nnx.nnx_to_torch(model, flatten_shapes=FLATTEN)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(back[name]), value.numpy(), err_msg=name)


class Blocks(nnx.Module):
    """Blocks in an nnx.List, each an nnx.Sequential of Linear → BatchNorm1d → relu."""

    def __init__(self, rngs):
        self.blocks = nnx.List(
            [
                nnx.Sequential(nnx.Linear(3, 3, rngs=rngs), jaxbn.nnx.BatchNorm1d(3), nnx.relu)
                for _ in range(2)
            ]
        )
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def torch_blocks() -> torch.nn.Module:
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList(
        [
            torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU())
            for _ in range(2)
        ]
    )
    net.head = torch.nn.Linear(3, 2)
    return net


def test_lists_and_sequentials_take_torchs_module_list_and_sequential_names():
    model = Blocks(nnx.Rngs(0))
    names = set(jaxbn.nnx.nnx_to_torch(model))
    assert names == set(torch_blocks().state_dict())
    assert "blocks.1.layers.1.running_var" not in names and "blocks.1.1.running_var" in names


def test_a_model_with_lists_round_trips_through_torch():
    net = torch_blocks()
    net.train()
    for block in net.blocks:
        block(torch.randn(6, 3))
    net.eval()
    model = Blocks(nnx.Rngs(1))
    jaxbn.nnx.torch_to_nnx(net.state_dict(), model)
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = net.head(net.blocks[1](net.blocks[0](x))).numpy()
    model.eval()
    np.testing.assert_allclose(model(jax.numpy.asarray(x.numpy())), expected, rtol=1e-5, atol=1e-6)
    back = jaxbn.nnx.nnx_to_torch(model)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(np.asarray(back[name]), value.numpy(), err_msg=name)


def test_an_attribute_named_with_a_trailing_number_keeps_its_torch_name():
    class Net(nnx.Module):
        def __init__(self):
            self.conv_1 = nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))
            self.bn_1 = jaxbn.nnx.BatchNorm2d(2)

    assert sorted(jaxbn.nnx.nnx_to_torch(Net())) == [
        "bn_1.bias",
        "bn_1.num_batches_tracked",
        "bn_1.running_mean",
        "bn_1.running_var",
        "bn_1.weight",
        "conv_1.bias",
        "conv_1.weight",
    ]
