"""PyTorch state_dict ⇄ jaxbn variables: same logits, bit-identical round trip, clear errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from tests import linen_builders
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close

PAIRS = make_pairs()


def warm_up_statistics(pair):
    """A few train-mode forwards so the running statistics are not the initial ones."""
    pair.torch_model.train()
    with torch.no_grad():
        for _ in range(3):
            pair.torch_model(torch.randn(pair.input_shape) * 2 + 0.5)


@pytest.mark.parametrize("name", list(PAIRS))
def test_imported_weights_give_torchs_eval_and_train_logits(name):
    pair = PAIRS[name]
    warm_up_statistics(pair)
    variables = pair.load_into_jax()
    x_t = torch.randn(pair.input_shape)
    x = pair.to_jax_input(x_t)
    pair.torch_model.eval()
    with torch.no_grad():
        expected_eval = pair.torch_model(x_t)
    assert_close(
        f"interop {name} eval logits",
        pair.model.apply(variables, x, train=False),
        expected_eval,
        1e-5,
        1e-5,
    )
    pair.torch_model.train()
    with torch.no_grad():
        expected_train = pair.torch_model(x_t)
    logits, _ = pair.model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_close(f"interop {name} train logits", logits, expected_train, 1e-5, 1e-5)


@pytest.mark.parametrize("name", list(PAIRS))
def test_torch_to_jaxbn_to_torch_is_bit_identical(name):
    pair = PAIRS[name]
    warm_up_statistics(pair)
    original = pair.state_dict_for_jax()
    back = jaxbn.interop.flax_to_torch(pair.load_into_jax(), flatten_shapes=pair.flatten_shapes)
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    # and loads into the torch model as is (strict: every key present, no extra)
    pair.torch_model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in pair.torch_keys(back).items()}
    )


def template(pair):
    return linen_builders.init(pair.model, jnp.zeros(pair.channels_last_shape), train=False)


def test_missing_and_unexpected_keys_are_named():
    pair = PAIRS["mlp-bn"]
    sd = dict(pair.torch_model.state_dict())
    sd["layers.9.weight"] = sd.pop("layers.1.running_var")
    with pytest.raises(KeyError) as info:
        jaxbn.interop.torch_to_flax(sd, template(pair))
    assert "missing keys ['layers.1.running_var']" in str(info.value)
    assert "unexpected keys ['layers.9.weight']" in str(info.value)


def test_a_shape_mismatch_names_the_key_and_both_shapes():
    pair = PAIRS["mlp-bn"]
    sd = dict(pair.torch_model.state_dict())
    sd["layers.3.weight"] = torch.zeros(16, 31)
    with pytest.raises(
        ValueError,
        match=r"layers\.3\.weight: torch shape \(16, 31\) does not fit "
        r"params/layers_3/kernel of shape \(32, 16\)",
    ):
        jaxbn.interop.torch_to_flax(sd, template(pair))


def test_imported_arrays_do_not_alias_the_torch_tensors():
    pair = make_pairs(seed=3)["mlp-bn"]
    variables = pair.load_into_jax()
    before = np.array(variables["params"]["layers_0"]["kernel"])
    with torch.no_grad():
        for p in pair.torch_model.parameters():
            p.add_(1.0)  # what optimizer.step() does in place
    np.testing.assert_array_equal(variables["params"]["layers_0"]["kernel"], before)
