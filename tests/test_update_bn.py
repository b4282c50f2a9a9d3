"""update_bn recomputes every batch norm's statistics like torch.optim.swa_utils.update_bn."""

from __future__ import annotations

import flax.core
import jax
import jax.numpy as jnp
import torch
from torch.optim.swa_utils import update_bn as torch_update_bn

import jaxbn
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close


def test_update_bn_matches_torch_swa_utils_update_bn_on_the_convnet():
    pair = make_pairs(seed=5)["convnet"]
    pair.torch_model.train()
    with torch.no_grad():  # some stale statistics to be replaced
        pair.torch_model(torch.randn(pair.input_shape) * 5)
    variables = pair.load_into_jax()
    batches_t = [(torch.randn(pair.input_shape) * 2 + 1, torch.zeros(8)) for _ in range(4)]
    torch_update_bn(batches_t, pair.torch_model)
    batches = [(pair.to_jax_input(x), y.numpy()) for x, y in batches_t]
    updated = jaxbn.update_bn(pair.model.apply, variables, batches)
    expected = jaxbn.interop.torch_to_flax(
        pair.state_dict_for_jax(), variables, flatten_shapes=pair.flatten_shapes
    )
    for path, stats, _ in jaxbn.tools._tree.batch_norm_layers(updated):
        ref = jaxbn.tools._tree.get_path(expected["batch_stats"], path)
        assert_close("update_bn running_mean", stats["mean"], ref["mean"], 2e-5, 2e-5)
        assert_close("update_bn running_var", stats["var"], ref["var"], 2e-5, 2e-5)
        assert int(stats["num_batches_tracked"]) == int(ref["num_batches_tracked"]) == 4
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updated["params"], variables["params"]))


def test_update_bn_is_the_plain_average_of_batch_statistics():
    model = jaxbn.BatchNorm1d(3, momentum=0.5)  # the module's own momentum is ignored here
    batches = [jax.random.normal(jax.random.key(i), (6, 3)) * (i + 1) for i in range(3)]
    variables = model.init(jax.random.key(0), batches[0], train=False)
    updated = jaxbn.update_bn(model.apply, variables, batches)
    expected_mean = sum(b.mean(0) for b in batches) / 3
    expected_var = sum(b.var(0, ddof=1) for b in batches) / 3
    assert_close(
        "update_bn average mean", updated["batch_stats"]["mean"], expected_mean, 1e-5, 1e-6
    )
    assert_close("update_bn average var", updated["batch_stats"]["var"], expected_var, 1e-5, 1e-6)


def test_update_bn_leaves_a_model_without_batch_norm_alone():
    model = jaxbn.models.MLP(hidden=(4,), norm="none")
    variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    assert jaxbn.update_bn(model.apply, variables, [jnp.ones((2, 3))]) == variables


def test_update_bn_accepts_frozen_variables_and_leaves_them_untouched():
    model = jaxbn.BatchNorm1d(3)
    batch = jax.random.normal(jax.random.key(0), (6, 3)) + 2
    variables = flax.core.freeze(model.init(jax.random.key(0), batch, train=False))
    updated = jaxbn.update_bn(model.apply, variables, [batch])
    assert_close("update_bn frozen mean", updated["batch_stats"]["mean"], batch.mean(0), 1e-6, 1e-6)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
