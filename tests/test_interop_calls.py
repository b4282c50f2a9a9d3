"""verify_port and torch_module_to_flax call a Flax model as it is written: an ``nn.Sequential``
(no flag), a flag named ``train``/``training``/``use_running_average``/``deterministic``
(read from its signature, as every tool reads it), explicit ``apply_kwargs``, another
``method``. PyTorch is the oracle."""

from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import interop


def torch_mlp() -> torch.nn.Sequential:
    """Linear → BatchNorm1d → ReLU → Linear with statistics away from 0/1."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    )
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.normal_()
    return net.eval()


def eval_output(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return net(x).numpy()


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def sequential() -> nn.Sequential:
    return nn.Sequential(
        [
            nn.Dense(6),
            jaxbn.flax_compat.BatchNorm(use_running_average=True, momentum=0.9),
            nn.relu,
            nn.Dense(3),
        ]
    )


def test_an_nn_sequential_model_is_ported_and_verified_without_a_train_flag_or_rename():
    # Flax's nn.Sequential names its layers layers_<i>, torch's Sequential <i>: matched as is
    model, net = sequential(), torch_mlp()
    variables = interop.torch_module_to_flax(net, model, X)
    got = model.apply(variables, jnp.asarray(X.numpy()))
    np.testing.assert_allclose(got, eval_output(net, X), atol=1e-6)
    assert sorted(variables["params"]) == ["layers_0", "layers_1", "layers_3"]
    assert interop.verify_port(net, model, variables, X) < 1e-6


def test_an_nn_sequential_model_with_an_explicit_rename_names_a_wrong_layer():
    names = {"layers_0": "0", "layers_1": "1", "layers_3": "3"}
    model, net = sequential(), torch_mlp()
    variables = interop.torch_module_to_flax(net, model, X, rename=names)
    stats = variables["batch_stats"]["layers_1"]
    stats["var"] = stats["var"] * 2
    with pytest.raises(
        ValueError, match=re.escape("layer '1' (Flax 'layers_1') differs from PyTorch")
    ):
        interop.verify_port(net, model, variables, X, rename=names)


def mlp(x, train: bool):
    """The torch MLP in Flax, named as torch names it (called inside a compact method)."""
    x = nn.Dense(6, name="0")(x)
    x = jaxbn.BatchNorm1d(6, name="1")(x, train=train)
    return nn.Dense(3, name="3")(nn.relu(x))


class WithTrain(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return mlp(x, train)


class WithTraining(nn.Module):
    @nn.compact
    def __call__(self, x, training):
        return mlp(x, training)


class WithUseRunningAverage(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average: bool):
        return mlp(x, not use_running_average)


class WithDeterministic(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        return mlp(x, not deterministic)


@pytest.mark.parametrize(
    "model_class", [WithTrain, WithTraining, WithUseRunningAverage, WithDeterministic]
)
def test_a_model_whose_eval_flag_has_any_of_the_usual_names_is_called_in_eval_mode(model_class):
    model, net = model_class(), torch_mlp()
    variables = interop.torch_module_to_flax(net, model, X)
    assert interop.verify_port(net, model, variables, X) < 1e-6


def test_explicit_apply_kwargs_and_method_are_used_for_the_template_and_the_check():
    class Encoder(nn.Module):
        def __call__(self, x, *, train):
            return self.encode(x, mode="train" if train else "eval")

        @nn.compact
        def encode(self, x, *, mode):  # no eval flag eval_kwargs could find
            return mlp(x, mode == "train")

    net = torch_mlp()
    variables = interop.torch_module_to_flax(
        net, Encoder(), X, method="encode", apply_kwargs={"mode": "eval"}
    )
    got = Encoder().apply(variables, jnp.asarray(X.numpy()), method="encode", mode="eval")
    np.testing.assert_allclose(got, eval_output(net, X), atol=1e-6)
    assert (
        interop.verify_port(
            net, Encoder(), variables, X, method="encode", apply_kwargs={"mode": "eval"}
        )
        < 1e-6
    )
