"""inspect_batchnorm lists every batch norm and flags the tutorial's debugging cases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from jaxbn.tools.inspect_bn import FLOAT_COUNTER, NEVER_UPDATED
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


# --- stacked statistics: a row per member ---------------------------------------------------


class Cell(nn.Module):
    """An RNN-style cell: the same Dense→BN at every step of an ``nn.scan``."""

    train: bool = False

    @nn.compact
    def __call__(self, carry, x):
        h = jaxbn.BatchNorm(name="bn")(nn.Dense(3)(carry + x), train=self.train)
        return h, h


class Scanned(nn.Module):
    """Four cells with their own parameters and statistics (``[4, 3]`` each)."""

    @nn.compact
    def __call__(self, xs, train: bool = False):
        cell = nn.scan(
            Cell,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=4,
        )(train, name="cell")
        return cell(jnp.zeros_like(xs[0]), xs)[1]


XS = jnp.asarray(np.random.default_rng(2).standard_normal((4, 5, 3)), jnp.float32)


@pytest.fixture(scope="module")
def scanned():
    model = Scanned()
    variables = model.init(jax.random.key(0), XS)
    _, updates = model.apply(variables, XS, train=True, mutable=["batch_stats"])
    return model, {**variables, **updates}


def test_a_layer_under_nn_scan_gets_a_row_per_step(scanned):
    _, variables = scanned
    stats = variables["batch_stats"]["cell"]["bn"]
    assert stats["mean"].shape == (4, 3) and stats["num_batches_tracked"].shape == (4,)
    report = jaxbn.inspect_batchnorm(variables)
    assert [layer.path for layer in report.layers] == [f"cell/bn[{t}]" for t in range(4)]
    for t, layer in enumerate(report.layers):
        np.testing.assert_array_equal(layer.mean, stats["mean"][t])
        np.testing.assert_array_equal(layer.scale, variables["params"]["cell"]["bn"]["scale"][t])
        assert layer.num_batches_tracked == 1 and layer.channels == 3
    assert report.problems == []
    assert "cell/bn[3]" in str(report)


def test_pmap_replicated_statistics_get_a_row_per_device():
    variables = trained_variables()
    replicated = jax.pmap(lambda v: v)(jax.tree.map(lambda a: jnp.stack([a, a]), variables))
    assert replicated["batch_stats"]["features_1"]["mean"].shape == (2, 4)
    report = jaxbn.inspect_batchnorm(replicated)
    paths = [layer.path for layer in report.layers]  # pmap sorted the keys: numeric order
    assert paths[:4] == ["classifier_1[0]", "classifier_1[1]", "features_1[0]", "features_1[1]"]
    assert len(paths) == 8
    np.testing.assert_array_equal(
        report.layers[3].var, variables["batch_stats"]["features_1"]["var"]
    )
    assert report.problems == []


def test_one_stacked_member_with_trouble_is_flagged_by_its_index(scanned):
    _, variables = scanned
    stats = dict(variables["batch_stats"]["cell"]["bn"])
    stats["var"] = stats["var"].at[2, 0].set(0.0)
    stats["num_batches_tracked"] = stats["num_batches_tracked"].at[1].set(0)
    broken = {**variables, "batch_stats": {"cell": {"bn": stats}}}
    assert jaxbn.inspect_batchnorm(broken).problems == [
        f"cell/bn[1]: {NEVER_UPDATED}",
        "cell/bn[2]: 1 channel(s) with collapsed variance (< 1e-6)",
    ]


def test_nnx_vmapped_layers_get_a_row_per_member():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs):
        return jaxbn.nnx.BatchNorm(4, rngs=rngs)

    stack = make(nnx.Rngs(0))
    report = jaxbn.nnx.inspect_batchnorm(stack)
    assert [layer.path for layer in report.layers] == ["(top)[0]", "(top)[1]", "(top)[2]"]
    assert all(layer.channels == 4 and layer.num_batches_tracked == 0 for layer in report.layers)


def test_a_counter_averaged_as_a_float_is_flagged():
    variables = trained_variables()
    stats = variables["batch_stats"]["features_1"]
    stats["num_batches_tracked"] = jnp.float32(2.5)  # what pmean of batch_stats leaves
    report = jaxbn.inspect_batchnorm(variables)
    assert report.layers[0].num_batches_tracked == 2.5
    assert report.problems == [f"features_1: {FLOAT_COUNTER}"]


def test_statistics_whose_shapes_do_not_fit_one_layer_are_one_flagged_row():
    variables = {"batch_stats": {"bn": {**bn_stats(3), "num_batches_tracked": jnp.ones(2, int)}}}
    (layer,) = jaxbn.inspect_batchnorm(variables).layers
    assert layer.problems == [
        "shapes do not fit one layer: mean (3,), var (3,), num_batches_tracked (2,)"
    ]


# --- each layer's kind, from the model ------------------------------------------------------


class AllKinds(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = jaxbn.BatchNorm(name="trained")(nn.Dense(4)(x), train=train)
        x = jaxbn.BatchNorm(track_running_stats=False, name="untracked")(x, train=train)
        x = jaxbn.FrozenBatchNorm(name="frozen")(nn.Dense(4)(x), train=train)
        x = jaxbn.GhostBatchNorm(virtual_batch_size=2, name="ghost")(nn.Dense(4)(x), train=train)
        return jaxbn.BatchRenorm(name="renorm")(nn.Dense(4)(x), train=train)


KINDS_X = jnp.asarray(np.random.default_rng(3).standard_normal((4, 4)), jnp.float32)


@pytest.fixture(scope="module")
def all_kinds():
    model = AllKinds()
    variables = model.init(jax.random.key(0), KINDS_X, train=False)
    _, updates = model.apply(variables, KINDS_X, train=True, mutable=["batch_stats"])
    return model, {**variables, **updates}


def test_given_the_model_every_layer_is_listed_with_its_kind(all_kinds):
    model, variables = all_kinds
    report = jaxbn.inspect_batchnorm(variables, model, KINDS_X)
    assert [(layer.path, layer.kind) for layer in report.layers] == [
        ("trained", "trained"),
        ("untracked", "untracked"),
        ("frozen", "frozen"),
        ("ghost", "ghost"),
        ("renorm", "renorm"),
    ]
    untracked = report.layers[1]
    assert untracked.mean is None and untracked.num_batches_tracked is None
    assert untracked.channels == 4
    # a frozen layer's counter stays 0: its statistics are constants, not "never updated"
    assert report.layers[2].num_batches_tracked == 0 and report.problems == []
    header, _, *rows = str(report).splitlines()
    assert header.split()[:3] == ["layer", "kind", "C"]
    assert rows[1].split()[:4] == ["untracked", "untracked", "4", "-"]


def test_without_the_model_a_frozen_layers_zero_counter_is_flagged_and_no_kind_shown(all_kinds):
    _, variables = all_kinds
    report = jaxbn.inspect_batchnorm(variables)
    assert [layer.path for layer in report.layers] == ["trained", "frozen", "ghost", "renorm"]
    assert report.problems == [f"frozen: {NEVER_UPDATED}"]
    assert "kind" not in str(report).splitlines()[0]


def test_a_freeze_batch_norm_result_shows_its_frozen_layers(all_kinds):
    model, variables = all_kinds
    frozen = jaxbn.freeze_batch_norm(model, variables, where=lambda path: path != "untracked")
    report = jaxbn.inspect_batchnorm(frozen.variables, frozen.model, KINDS_X)
    assert [layer.kind for layer in report.layers] == [
        "frozen",
        "untracked",
        "frozen",
        "frozen",
        "frozen",
    ]


def test_a_scanned_layer_has_its_kind_on_every_member(scanned):
    model, variables = scanned
    report = jaxbn.inspect_batchnorm(variables, model, XS)
    assert [(layer.path, layer.kind) for layer in report.layers] == [
        (f"cell/bn[{t}]", "trained") for t in range(4)
    ]


def test_a_model_without_its_example_input_is_refused_saying_what_to_pass(all_kinds):
    model, variables = all_kinds
    with pytest.raises(TypeError) as error:
        jaxbn.inspect_batchnorm(variables, model)
    assert str(error.value) == (
        "inspect_batchnorm(variables, model, x): give AllKinds's example input after the model "
        "(the layers' kinds come from tracing one eval call), or leave the model out"
    )


def test_a_batch_of_one_with_an_untracked_layer_is_refused_in_one_line(all_kinds):
    model, variables = all_kinds
    with pytest.raises(ValueError) as error:
        jaxbn.inspect_batchnorm(variables, model, KINDS_X[:1])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("inspect_batchnorm could not trace AllKinds.apply(variables, ...)")
    assert "give an example batch of 2 or more rows" in message


def test_kinds_given_by_the_caller_name_the_layers_and_list_the_untracked_ones(all_kinds):
    _, variables = all_kinds
    kinds = {"trained": "trained", "untracked": "untracked", "frozen": "frozen"}
    report = jaxbn.inspect_batchnorm(variables, kinds=kinds)
    assert [(layer.path, layer.kind) for layer in report.layers] == [
        ("trained", "trained"),
        ("untracked", "untracked"),
        ("frozen", "frozen"),
        ("ghost", None),
        ("renorm", None),
    ]
    assert report.problems == []


def test_a_batch_norm_that_is_the_whole_model_is_named_top():
    bn = jaxbn.BatchNorm1d(2)
    variables = bn.init(jax.random.key(0), jnp.ones((2, 2)), train=False)
    report = jaxbn.inspect_batchnorm(variables)
    assert [layer.path for layer in report.layers] == ["(top)"]
    assert report.problems == [f"(top): {NEVER_UPDATED}"]


def test_pmap_replicated_variables_are_traced_with_one_replica_for_the_kinds():
    variables = trained_variables()
    replicated = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    report = jaxbn.inspect_batchnorm(replicated, MODEL, X)
    assert [(layer.path, layer.kind) for layer in report.layers[:2]] == [
        ("features_1[0]", "trained"),
        ("features_1[1]", "trained"),
    ]
    assert len(report.layers) == 8 and report.problems == []


def test_stored_statistics_the_traced_call_does_not_reach_are_flagged(all_kinds):
    model, variables = all_kinds
    stale = {**variables, "batch_stats": {**variables["batch_stats"], "old": bn_stats(4)}}
    report = jaxbn.inspect_batchnorm(stale, model, KINDS_X)
    assert (report.layers[-1].path, report.layers[-1].kind) == ("old", None)
    assert report.problems == [
        "old: not reached by the traced call (variables this call does not use, or stale ones)"
    ]


def test_inside_jit_it_is_refused_saying_where_to_call_it():
    variables = {"batch_stats": {"bn": bn_stats()}}
    with pytest.raises(TypeError) as error:
        jax.jit(lambda v: len(jaxbn.inspect_batchnorm(v).layers))(variables)
    assert str(error.value) == (
        "inspect_batchnorm reads the variables' values: call it outside jax.jit / vmap / scan, "
        "on the variables a step returns"
    )


def test_kinds_keyed_by_nnx_graph_paths_name_an_nnx_models_layers():
    # what jaxbn.nnx's tools can pass: nnx.iter_graph's paths (tuples; () is the model)
    from jaxbn.tools.layers import kind_of

    model = jaxbn.nnx.BatchNorm1d(3, track_running_stats=False)
    kinds = {path: kind for path, node in nnx.iter_graph(model) if (kind := kind_of(node))}
    assert kinds == {(): "untracked"}
    report = jaxbn.inspect_batchnorm(jaxbn.nnx.to_linen_variables(model), kinds=kinds)
    assert [(layer.path, layer.kind, layer.channels) for layer in report.layers] == [
        ("(top)", "untracked", 3)
    ]
