"""update_bn recomputes every batch norm's statistics like torch.optim.swa_utils.update_bn."""

from __future__ import annotations

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn as torch_update_bn

import jaxbn
from tests import linen_builders
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close


def normal(seed, shape):
    """float32 N(0, 1) data from numpy (JAX's generator compiles for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


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
    batches = [normal(i, (6, 3)) * (i + 1) for i in range(3)]
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
    variables = linen_builders.init(model, jnp.ones((2, 3)), train=False)
    assert jaxbn.update_bn(model.apply, variables, [jnp.ones((2, 3))]) == variables


def test_update_bn_accepts_frozen_variables_and_leaves_them_untouched():
    model = jaxbn.BatchNorm1d(3)
    batch = normal(0, (6, 3)) + 2
    variables = flax.core.freeze(model.init(jax.random.key(0), batch, train=False))
    updated = jaxbn.update_bn(model.apply, variables, [batch])
    assert_close("update_bn frozen mean", updated["batch_stats"]["mean"], batch.mean(0), 1e-6, 1e-6)
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0


class _ScanBody(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jaxbn.BatchNorm1d(4)(nn.Dense(4)(x), train=True), None


class _ScannedNet(nn.Module):
    """Scan over layers (Flax's pattern); ``report`` lists batch_moments in variable_axes."""

    report: bool

    @nn.compact
    def __call__(self, x, *, train):
        x = jaxbn.BatchNorm1d(4)(x, train=train)
        axes = {"params": 0, "batch_stats": 0}
        if self.report:
            axes["batch_moments"] = 0
        body = nn.scan(_ScanBody, variable_axes=axes, split_rngs={"params": True}, length=3)
        return body()(x, None)[0]


def _scan_batches():
    return [normal(i, (8, 4)) * (i + 1) + i for i in range(3)]


def test_update_bn_averages_batch_norms_inside_nn_scan_layer_by_layer():
    model = _ScannedNet(report=True)
    batches = _scan_batches()
    variables = linen_builders.init(model, batches[0], train=False)
    updated = jaxbn.update_bn(model.apply, variables, batches)
    # the oracle: each scanned layer's input, recomputed layer by layer in numpy-free jax
    inputs = [[] for _ in range(3)]
    for x in batches:
        h = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
        for layer in range(3):
            dense = jax.tree.map(lambda a, i=layer: a[i], variables["params"]["Scan_ScanBody_0"])
            z = h @ dense["Dense_0"]["kernel"] + dense["Dense_0"]["bias"]
            inputs[layer].append(z)
            h = (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5)
    stats = updated["batch_stats"]["Scan_ScanBody_0"]["BatchNorm1d_0"]
    for layer in range(3):
        expected_mean = sum(z.mean(0) for z in inputs[layer]) / 3
        expected_var = sum(z.var(0, ddof=1) for z in inputs[layer]) / 3
        assert_close("update_bn scan mean", stats["mean"][layer], expected_mean, 1e-4, 1e-5)
        assert_close("update_bn scan var", stats["var"][layer], expected_var, 1e-4, 1e-5)
    np.testing.assert_array_equal(stats["num_batches_tracked"], [3, 3, 3])


def test_update_bn_refuses_a_scan_that_drops_the_reports_instead_of_resetting_it():
    model = _ScannedNet(report=False)
    batches = _scan_batches()
    variables = linen_builders.init(model, batches[0], train=False)
    with pytest.raises(ValueError, match=r"\[.Scan_ScanBody_0/BatchNorm1d_0.\] were trained but"):
        jaxbn.update_bn(model.apply, variables, batches)


def test_update_bn_ignores_reports_left_in_the_variables_by_an_earlier_apply():
    model = jaxbn.BatchNorm1d(3)
    batches = [normal(i, (6, 3)) * (i + 1) + i for i in range(3)]
    variables = model.init(jax.random.key(0), batches[0], train=False)
    _, stale = model.apply(
        variables, batches[0] * 100, train=True, mutable=["batch_stats", "batch_moments"]
    )
    updated = jaxbn.update_bn(model.apply, {**variables, **stale}, batches)
    expected = sum(b.mean(0) for b in batches) / 3
    assert_close("update_bn stale mean", updated["batch_stats"]["mean"], expected, 1e-5, 1e-6)
    assert int(updated["batch_stats"]["num_batches_tracked"]) == 3
    assert "batch_moments" not in updated


def test_update_bn_of_replicated_variables_under_pmap_gives_the_global_average():
    model = jaxbn.BatchNorm1d(3, axis_name="batch")
    batches = [normal(i, (4, 5, 3)) * (i + 1) + i for i in range(2)]
    variables = model.init(jax.random.key(0), batches[0][0], train=False)
    replicated = jax.tree.map(lambda a: jnp.stack([a] * 4), variables)
    mapped = jax.pmap(
        lambda v, x, mutable: model.apply(v, x, train=True, mutable=mutable),
        axis_name="batch",
        static_broadcasted_argnums=(2,),
        devices=jax.devices()[:4],
    )

    def apply_fn(variables, x, *, train, mutable):
        assert train
        return mapped(variables, x, mutable)

    updated = jaxbn.update_bn(apply_fn, replicated, batches)
    expected_mean = sum(b.reshape(-1, 3).mean(0) for b in batches) / 2
    expected_var = sum(b.reshape(-1, 3).var(0, ddof=1) for b in batches) / 2
    for device in range(4):
        stats = jax.tree.map(lambda a, d=device: a[d], updated["batch_stats"])
        assert_close("update_bn pmap mean", stats["mean"], expected_mean, 1e-5, 1e-6)
        assert_close("update_bn pmap var", stats["var"], expected_var, 1e-5, 1e-5)
