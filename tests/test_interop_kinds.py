"""Interop on every batch norm kind (trained, untracked, frozen, ghost, renorm, flax_compat;
Linen and NNX) from every checkpoint source (torch state_dicts new and old, orbax-restored jaxbn
variables, flax.linen.BatchNorm variables): the right numbers, or a one-line refusal that says
what to do (stacked layers, a model without counters). PyTorch is the oracle."""

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

X = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
X_NHWC = jnp.asarray(np.moveaxis(X.numpy(), 1, -1))


def trained_torch_bn(track_running_stats: bool = True) -> torch.nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, track_running_stats=track_running_stats).train()
    with torch.no_grad():
        bn(X * 2 + 1)
        bn(X)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


def torch_eval(bn: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return np.moveaxis(bn(X).numpy(), 1, -1)


def without_counter(state_dict) -> dict:
    """What torch < 0.4.1 saved: no counter, no version marks."""
    return collections.OrderedDict(
        (k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    )


KINDS = {
    "trained": lambda: jaxbn.BatchNorm2d(3),
    "untracked": lambda: jaxbn.BatchNorm2d(3, track_running_stats=False),
    "frozen": lambda: jaxbn.FrozenBatchNorm(3),
    "ghost": lambda: jaxbn.GhostBatchNorm(3, virtual_batch_size=4),
    "renorm": lambda: jaxbn.BatchRenorm(3),
    "flax_compat": lambda: jaxbn.flax_compat.BatchNorm(use_running_average=True, momentum=0.9),
}


@pytest.mark.parametrize("source", ["torch-new", "torch-old"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_loads_a_torch_state_dict_gives_torchs_eval_and_round_trips_strictly(
    kind, source
):
    bn = trained_torch_bn(track_running_stats=kind != "untracked")
    state_dict = bn.state_dict() if source == "torch-new" else without_counter(bn.state_dict())
    module = KINDS[kind]()
    variables = interop.torch_module_to_flax(bn, module, X, input_layout="channels_first")
    variables = interop.torch_to_flax(state_dict, variables)  # the source under test
    flags = {"train": False} if kind in ("trained", "untracked", "ghost", "renorm") else {}
    np.testing.assert_allclose(module.apply(variables, X_NHWC, **flags), torch_eval(bn), atol=1e-5)
    assert interop.verify_port(bn, module, variables, X, input_layout="channels_first") < 1e-5
    back = interop.flax_to_torch(variables)
    fresh = torch.nn.BatchNorm2d(3, track_running_stats=kind != "untracked")
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize(
    "kind", ["BatchNorm2d", "FrozenBatchNorm", "GhostBatchNorm", "BatchRenorm"]
)
def test_nnx_kinds_load_an_old_state_dict_and_save_torchs_int64_counter(kind):
    extra = {"virtual_batch_size": 4} if kind == "GhostBatchNorm" else {}
    model = getattr(jaxbn.nnx, kind)(3, **extra)
    bn = trained_torch_bn()
    jaxbn.nnx.torch_to_nnx(without_counter(bn.state_dict()), model)
    model.eval()
    np.testing.assert_allclose(model(X_NHWC), torch_eval(bn), atol=1e-5)
    back = jaxbn.nnx.nnx_to_torch(model)
    assert back["num_batches_tracked"].dtype == np.int64
    assert int(back["num_batches_tracked"]) == 0  # the model's own, as torch keeps it
    torch.nn.BatchNorm2d(3).load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})


def test_orbax_restored_jaxbn_variables_convert_both_ways(tmp_path):
    import orbax.checkpoint as ocp

    bn = trained_torch_bn()
    module = jaxbn.BatchNorm2d(3)
    variables = interop.torch_module_to_flax(bn, module, X, input_layout="channels_first")
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(tmp_path / "checkpoint", variables)
    restored = checkpointer.restore(tmp_path / "checkpoint")
    back = interop.flax_to_torch(restored)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    again = interop.torch_to_flax(bn.state_dict(), restored)  # restored trees as templates
    assert again["batch_stats"]["num_batches_tracked"].dtype == jnp.int32


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jaxbn.BatchNorm2d(3, name="bn")(x, train=False), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=3,
        )
        return blocks(name="blocks")(x, None)[0]


def test_a_stacked_batch_norm_is_refused_both_ways_saying_how_to_convert_it():
    variables = Scanned().init(jax.random.key(0), X_NHWC, train=False)
    where = "batch_stats/blocks/bn: a stacked batch norm (counter of shape (3,): the members of "
    with pytest.raises(
        ValueError,
        match=re.escape(where) + r".*" + re.escape("(jax.tree.map(lambda a: a[i], variables))"),
    ):
        interop.flax_to_torch(variables)
    with pytest.raises(ValueError, match=re.escape(where) + r".*" + re.escape("then stack them")):
        interop.torch_to_flax(trained_torch_bn().state_dict(), variables)


def test_torch_statistics_into_a_flax_linen_batch_norm_name_the_counters_it_cannot_keep():
    template = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), X_NHWC)
    with pytest.raises(
        KeyError,
        match=re.escape(
            "the model keeps no num_batches_tracked, the state_dict has ['num_batches_tracked']"
        ),
    ):
        interop.torch_to_flax(trained_torch_bn().state_dict(), template)
    # the way it names: without the counters, Flax's eval gives torch's outputs
    bn = trained_torch_bn()
    variables = interop.torch_to_flax(without_counter(bn.state_dict()), template)
    got = nn.BatchNorm(use_running_average=True).apply(variables, X_NHWC)
    np.testing.assert_allclose(got, torch_eval(bn), atol=1e-5)


def test_flax_linen_batch_norm_variables_go_to_torch_as_they_are_with_flaxs_eval_outputs():
    model = nn.BatchNorm(use_running_average=True)
    variables = jax.tree.map(lambda a: a + 0.5, model.init(jax.random.key(0), X_NHWC))
    back = interop.flax_to_torch(variables)
    bn = torch.nn.BatchNorm2d(3)
    bn.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # counter: 0
    np.testing.assert_allclose(torch_eval(bn.eval()), model.apply(variables, X_NHWC), atol=1e-5)
