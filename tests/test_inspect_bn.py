"""inspect_batchnorm lists every batch norm and flags the tutorial's debugging cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

MODEL = jaxbn.models.ConvNet(widths=(4, 8, 8), hidden=8)
X = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))


def trained_variables():
    variables = MODEL.init(jax.random.key(0), X, train=False)
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
    report = jaxbn.inspect_batchnorm(MODEL.init(jax.random.key(0), X, train=False))
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
