"""The ``batch_moments`` report (what update_bn averages) exists only when the caller names the
collection explicitly in ``mutable``, whatever form the filter takes: a training loop with
``mutable=True`` or ``flax.core.DenyList("params")`` keeps its variables and its one trace."""

from __future__ import annotations

import flax.core
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

C = 3
DENY_PARAMS = flax.core.DenyList("params")


class Net(nn.Module):
    """Every trainable kind, and a scan over layers whose variable_axes lists batch_moments
    (update_bn's advice), so that a report could appear at every depth."""

    @nn.compact
    def __call__(self, x, *, train):
        x = jaxbn.BatchNorm1d(C)(x, train=train)
        x = jaxbn.GhostBatchNorm(C, 2)(x, train=train)
        x = jaxbn.BatchRenorm(C)(x, train=train)
        x = jaxbn.flax_compat.BatchNorm(name="compat")(x, use_running_average=not train)
        body = nn.scan(
            Layer,
            variable_axes={"params": 0, "batch_stats": 0, "batch_moments": 0},
            split_rngs={"params": True},
            length=2,
        )
        return body(train=train)(x, None)[0]


class Layer(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x, _):
        return jaxbn.BatchNorm1d(C)(nn.Dense(C)(x), train=self.train), None


@pytest.fixture(scope="module")
def setup():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, C)), jnp.float32)
    return Net(), Net().init(jax.random.key(0), x, train=False), x


def reporters(updates):
    """The paths of the layers that reported, ``/``-joined."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(updates.get("batch_moments", {})))
    return sorted({"/".join(path[:-1]) for path in flat})


EVERY_LAYER = ["BatchNorm1d_0", "BatchRenorm_0", "GhostBatchNorm_0", "ScanLayer_0/BatchNorm1d_0"]
EVERY_LAYER = sorted([*EVERY_LAYER, "compat/norm"])


@pytest.mark.parametrize(
    "mutable, named",
    [
        (["batch_stats"], False),
        (("batch_stats",), False),
        ("batch_stats", False),
        (True, False),
        (DENY_PARAMS, False),
        (flax.core.DenyList(["params", "intermediates"]), False),
        (["batch_stats", "batch_moments"], True),
        (("batch_stats", "batch_moments"), True),
        (frozenset({"batch_stats", "batch_moments"}), True),
        # a string filter naming only batch_moments leaves batch_stats immutable: no training
    ],
    # a set's repr follows string hashing, which differs between processes: xdist's workers
    # must collect the same ids
    ids=lambda value: repr(sorted(value)) if isinstance(value, frozenset) else repr(value),
)
def test_a_batch_norm_reports_its_moments_only_when_the_caller_names_the_collection(
    setup, mutable, named
):
    model, variables, x = setup
    _, updates = model.apply(variables, x, train=True, mutable=mutable)
    if named:
        assert [p.split("/", 1)[0] for p in reporters(updates)] == [
            p.split("/", 1)[0] for p in EVERY_LAYER
        ]
    else:
        assert "batch_moments" not in updates


def test_a_callable_mutable_filter_is_refused_by_flax_before_any_report(setup):
    model, variables, x = setup
    with pytest.raises(flax.errors.InvalidFilterError):
        model.apply(variables, x, train=True, mutable=lambda collection: collection != "params")


def test_a_training_loop_with_mutable_denylist_keeps_its_variables_and_traces_once(setup):
    model, variables, x = setup
    traces = []

    @jax.jit
    def step(variables, x):
        traces.append(1)  # runs once per trace
        _, updates = model.apply(variables, x, train=True, mutable=DENY_PARAMS)
        return {**variables, **updates}

    leaves = len(jax.tree.leaves(variables))
    for _ in range(4):
        variables = step(variables, x)
        assert len(jax.tree.leaves(variables)) == leaves
    assert set(variables) == {"params", "batch_stats"}
    assert len(traces) == 1


def test_update_bn_reads_the_reports_that_a_denylist_leaves_out(setup):
    model, variables, x = setup
    updated = jaxbn.update_bn(model.apply, variables, [x, x * 2])
    counts = {
        "/".join(path): np.asarray(stats["num_batches_tracked"]).tolist()
        for path, (stats, _) in jaxbn.tools.layers.stored_layers(updated).items()
    }
    assert counts == {
        "BatchNorm1d_0": 2,
        "GhostBatchNorm_0": 4,
        "BatchRenorm_0": 2,
        "compat": 2,
        "ScanLayer_0/BatchNorm1d_0": [2, 2],
    }
