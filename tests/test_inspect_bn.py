"""inspect_batchnorm lists every batch norm and flags the tutorial's debugging cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from tests import linen_builders

MODEL = jaxbn.models.ConvNet(widths=(4, 8, 8), hidden=8)
X = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8, 8, 1)), jnp.float32)


def trained_variables():
    variables = linen_builders.init(MODEL, X, train=False)  # in the model's order, like init
    _, updates = MODEL.apply(variables, X, train=True, mutable=["batch_stats"])
    return {**variables, **updates}


def test_every_batch_norm_is_listed_with_its_statistics():
    variables = trained_variables()
    report = jaxbn.inspect_batchnorm(variables)
    paths = [layer.path for layer in report.layers]
    assert paths == ["features_1", "features_5", "features_9", "classifier_1"]  # model order
    layer = report.layers[0]
    np.testing.assert_array_equal(layer.mean, variables["batch_stats"]["features_1"]["mean"])
    assert layer.num_batches_tracked == 1 and layer.channels == 4
    assert report.problems == []
    assert "features_5" in str(report) and "ok" in str(report)


def test_statistics_never_updated_are_flagged():
    report = jaxbn.inspect_batchnorm(linen_builders.init(MODEL, X, train=False))
    assert len(report.problems) == 4
    assert all("never updated" in p for p in report.problems)


def test_nan_collapsed_variance_and_dead_channels_are_flagged():
    variables = trained_variables()
    stats = variables["batch_stats"]
    stats["features_1"]["mean"] = stats["features_1"]["mean"].at[0].set(jnp.nan)
    stats["features_5"]["var"] = stats["features_5"]["var"].at[:2].set(0.0)
    variables["params"]["features_9"]["scale"] = jnp.zeros(8).at[0].set(1.0)
    problems = jaxbn.inspect_batchnorm(variables).problems
    assert problems == [
        "features_1: NaN/Inf in statistics or parameters",
        "features_5: 2 channel(s) with collapsed variance (< 1e-6)",
        "features_9: 7 dead channel(s) (|scale| < 1e-3)",
    ]


def bn_stats(channels=2):
    return {"mean": jnp.zeros(channels), "var": jnp.ones(channels), "num_batches_tracked": 1}


def test_a_tree_sorted_by_jax_is_listed_numerically():
    # jax.jit and jax.tree functions return dicts with their keys sorted as strings
    variables = jax.jit(lambda v: v)(
        {"batch_stats": {f"features_{i}": bn_stats() for i in (1, 2, 10, 11, 20)}}
    )
    assert list(variables["batch_stats"])[:3] == ["features_1", "features_10", "features_11"]
    paths = [layer.path for layer in jaxbn.inspect_batchnorm(variables).layers]
    assert paths == ["features_1", "features_2", "features_10", "features_11", "features_20"]


def test_a_deep_model_keeps_its_order_after_a_jitted_train_step():
    model = jaxbn.models.MLP(hidden=(2,) * 5)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)
    variables = linen_builders.init(model, x, train=False)

    @jax.jit
    def step(variables):
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return {**variables, **updates}

    trained = step(variables)
    assert list(trained["batch_stats"])[:2] == ["layers_1", "layers_10"]  # sorted as strings
    report = jaxbn.inspect_batchnorm(trained)
    assert [layer.path for layer in report.layers] == [
        "layers_1",
        "layers_4",
        "layers_7",
        "layers_10",
        "layers_13",
    ]


def test_the_path_column_is_as_wide_as_the_longest_path():
    variables = {
        "batch_stats": {
            "features": {
                "norm0": bn_stats(),
                "denseblock1": {"denselayer1": {"norm1": bn_stats()}},
            }
        }
    }
    header, _, *rows = str(jaxbn.inspect_batchnorm(variables)).splitlines()
    longest = "features/denseblock1/denselayer1/norm1"
    assert [row.split()[0] for row in rows] == ["features/norm0", longest]
    # every row's channel count ends under the header's "C"
    assert {row.index(" 2 ") + 1 for row in rows} == {header.index(" C ") + 1}
    assert header.index(" C ") == len(longest) + 4  # "C" right-aligned in 5 columns
