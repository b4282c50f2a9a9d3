"""torch state dicts ⇄ Equinox models with jaxbn.equinox norms (jaxbn.equinox.interop): a torch
nn.Sequential and its eqx.nn.Sequential twin give the same outputs after the import, the export
loads back into torch unchanged, and mismatches are refused as the Flax interop refuses them."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn.equinox as jbn
from jaxbn.equinox.interop import equinox_to_torch, torch_names, torch_to_equinox

C_IN, C, HIDDEN, SIDE = 2, 4, 5, 4


def torch_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(C_IN, C, 3, padding=1),
        torch.nn.BatchNorm2d(C),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(C * SIDE * SIDE, HIDDEN),
        torch.nn.BatchNorm1d(HIDDEN),
    )
    net.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics of their own, counters at 3
            net(torch.randn(6, C_IN, SIDE, SIDE) * 2 + 1)
        net[1].weight.uniform_(0.5, 1.5)
        net[5].bias.uniform_(-0.5, 0.5)
    return net.eval()


def equinox_net():
    keys = jax.random.split(jax.random.key(0), 2)
    return eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Conv2d(C_IN, C, 3, padding=1, key=keys[0]),
            jbn.BatchNorm2d(C, axis_name="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(C * SIDE * SIDE, HIDDEN, key=keys[1]),
            jbn.BatchNorm1d(HIDDEN, axis_name="batch"),
        ]
    )


def test_the_equinox_paths_name_torchs_keys():
    model, _ = equinox_net()
    assert torch_names(model) == list(torch_net().state_dict())


def test_an_imported_torch_model_evaluates_like_torch():
    net = torch_net()
    model, state = torch_to_equinox(*equinox_net(), net.state_dict())
    x = np.random.default_rng(0).normal(size=(3, C_IN, SIDE, SIDE)).astype(np.float32)
    evaluate = eqx.nn.inference_mode(model)
    y, _ = jax.vmap(evaluate, in_axes=(0, None), out_axes=(0, None))(jnp.asarray(x), state)
    np.testing.assert_allclose(y, net(torch.tensor(x)).detach().numpy(), atol=2e-5)
    assert int(state.get(model.layers[1].state_index).num_batches_tracked) == 3


def test_the_export_of_an_imported_model_is_torchs_state_dict_again():
    net = torch_net()
    model, state = torch_to_equinox(*equinox_net(), net.state_dict())
    exported = equinox_to_torch(model, state)
    torch_net().load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
        assert exported[key].dtype == value.numpy().dtype


def test_a_missing_and_an_unexpected_key_are_counted_and_named():
    sd = torch_net().state_dict()
    sd["extra.weight"] = sd.pop("4.weight")
    with pytest.raises(KeyError, match=r"1 missing keys \['4.weight'\], 1 unexpected keys"):
        torch_to_equinox(*equinox_net(), sd)


def test_a_shape_that_does_not_fit_is_refused_naming_the_key():
    sd = torch_net().state_dict()
    sd["1.running_mean"] = torch.zeros(C + 1)
    with pytest.raises(ValueError, match=r"^1.running_mean: torch shape \(5,\) does not fit"):
        torch_to_equinox(*equinox_net(), sd)


def test_an_old_checkpoint_without_counters_keeps_the_models_counter_as_torch_does():
    sd = {k: v for k, v in torch_net().state_dict().items() if "num_batches_tracked" not in k}
    model, state = torch_to_equinox(*equinox_net(), sd)
    assert int(state.get(model.layers[1].state_index).num_batches_tracked) == 0
    np.testing.assert_array_equal(
        state.get(model.layers[1].state_index).mean, sd["1.running_mean"].numpy()
    )


def test_renamed_modules_load_through_rename():
    model, state = eqx.nn.make_with_state(jbn.BatchNorm1d)(HIDDEN, axis_name="batch")
    holder = {"head": model}
    sd = {f"classifier.1.{k}": v for k, v in torch_net()[5].state_dict().items()}
    loaded, state = torch_to_equinox(holder, state, sd, rename={"head": "classifier.1"})
    np.testing.assert_array_equal(loaded["head"].bias, sd["classifier.1.bias"].numpy())


def test_an_eqx_batch_norm_is_refused_with_the_replacement():
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch", mode="batch")
    with pytest.raises(TypeError, match=r"use jaxbn.equinox.BatchNorm"):
        torch_to_equinox([model], state, {})


def test_the_tutorials_torch_convnet_loads_into_the_equinox_port_and_trains_alike():
    from jaxbn.equinox.models import TORCH_RENAME, ConvNet
    from tests.torch_models import ConvNetWithBN

    torch.manual_seed(0)
    net = ConvNetWithBN(10, 1, 8, (4, 8, 8), 8)
    with torch.no_grad():
        net(torch.randn(6, 1, 8, 8))  # running statistics of its own
    model, state = eqx.nn.make_with_state(ConvNet)(1, (4, 8, 8), 8, 10, 8, key=jax.random.key(0))
    model, state = torch_to_equinox(model, state, net.state_dict(), rename=TORCH_RENAME)
    x = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype(np.float32)
    train = jax.vmap(
        eqx.nn.inference_mode(model, False),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    y, state = train(jnp.asarray(x), state)
    np.testing.assert_allclose(y, net(torch.tensor(x)).detach().numpy(), atol=1e-5)
    exported = equinox_to_torch(model, state, rename=TORCH_RENAME)
    for key, value in net.state_dict().items():  # the statistics after that step, torch's
        np.testing.assert_allclose(exported[key], value.numpy(), atol=1e-5, err_msg=key)
