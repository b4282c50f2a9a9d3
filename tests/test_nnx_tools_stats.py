"""jaxbn.nnx.update_bn and inspect_batchnorm on NNX models of one's own: the tutorial-style CNN
re-estimated as ``torch.optim.swa_utils.update_bn`` does, GhostBatchNorm and BatchRenorm as
their Linen twins under ``jaxbn.update_bn``, stacked members one by one, frozen layers left
alone, and the inspection table with each layer's kind."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch.optim.swa_utils import update_bn as torch_update_bn

import jaxbn
import jaxbn.nnx
from jaxbn.tools.inspect_bn import NEVER_UPDATED
from tests.test_nnx_tools_fold import FLATTEN, SIDE, TorchCNN, trained_cnn

BATCHES = [np.asarray(jax.random.normal(jax.random.key(s), (8, SIDE, SIDE, 1))) for s in (5, 6, 7)]


@pytest.mark.parametrize("norm", ["BatchNorm2d", "flax_compat"])
def test_update_bn_of_a_tutorial_style_cnn_matches_torchs_swa_update_bn(norm):
    model = trained_cnn(norm)
    model.eval()  # dropout off, as the torch twin has none
    net = TorchCNN()
    net.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(v))
            for k, v in jaxbn.nnx.nnx_to_torch(model, flatten_shapes=FLATTEN).items()
        }
    )
    torch_update_bn([torch.from_numpy(b.transpose(0, 3, 1, 2).copy()) for b in BATCHES], net)
    jaxbn.nnx.update_bn(model, BATCHES)
    got = jaxbn.nnx.nnx_to_torch(model, flatten_shapes=FLATTEN)
    for name, value in net.state_dict().items():
        if "running" in name or "num_batches" in name:
            np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert model.batch_norm1.use_running_average  # the mode is left as it was


class Net(nnx.Module):
    def __init__(self, bn):
        self.l, self.b = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), bn


class LinenNet(nn.Module):
    make_bn: Any  # () -> the batch norm, named "b"

    @nn.compact
    def __call__(self, x, train):
        return self.make_bn()(nn.Dense(4, name="l")(x), train=train)


def _call(self, x):
    return self.b(self.l(x))


Net.__call__ = _call


@pytest.mark.parametrize(
    "nnx_bn, linen_bn",
    [
        (lambda: jaxbn.nnx.GhostBatchNorm(4, 2), lambda: jaxbn.GhostBatchNorm(4, 2, name="b")),
        (lambda: jaxbn.nnx.BatchRenorm(4), lambda: jaxbn.BatchRenorm(4, name="b")),
    ],
    ids=["ghost", "renorm"],
)
def test_update_bn_re_estimates_ghost_and_renorm_layers_as_their_linen_twins(nnx_bn, linen_bn):
    model = Net(nnx_bn())
    model.b.mean[...] = jnp.full((4,), 0.5)  # a renorm's correction reads the statistics
    model.b.var[...] = jnp.full((4,), 2.0)
    batches = [np.asarray(jax.random.normal(jax.random.key(s), (8, 4))) + s for s in range(3)]
    variables = jaxbn.nnx.to_linen_variables(model)
    expected = jaxbn.update_bn(LinenNet(linen_bn).apply, variables, batches)
    jaxbn.nnx.update_bn(model, batches)
    got = jaxbn.nnx.to_linen_variables(model)["batch_stats"]["b"]
    for key in ("mean", "var", "num_batches_tracked"):
        np.testing.assert_allclose(got[key], expected["batch_stats"]["b"][key], rtol=1e-6)


class Members(nnx.Module):
    """Three members made by nnx.vmap, each run on the whole batch by nnx.vmap."""

    def __init__(self, bn):
        make = lambda rngs: Net(bn())
        self.members = nnx.split_rngs(splits=3)(nnx.vmap(make, in_axes=(0,), out_axes=0))(
            nnx.Rngs(0)
        )

    def __call__(self, x):
        return nnx.vmap(lambda member, x: member(x), in_axes=(0, None))(self.members, x)


@pytest.mark.parametrize(
    "bn, per_update",
    [(lambda: jaxbn.nnx.BatchNorm(4), 8), (lambda: jaxbn.nnx.GhostBatchNorm(4, 4), 4)],
    ids=["batch_norm", "ghost"],
)
def test_update_bn_averages_stacked_members_one_by_one(bn, per_update):
    model = Members(bn)
    batches = [np.asarray(jax.random.normal(jax.random.key(s), (8, 4))) * (s + 1) for s in range(2)]
    jaxbn.nnx.update_bn(model, batches)
    stats = model.members.b
    for m in range(3):
        kernel, bias = model.members.l.kernel[...][m], model.members.l.bias[...][m]
        parts = [
            np.asarray(b @ kernel + bias)[i : i + per_update]
            for b in batches
            for i in range(0, 8, per_update)
        ]
        np.testing.assert_allclose(
            stats.mean[...][m], np.mean([p.mean(0) for p in parts], 0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            stats.var[...][m], np.mean([p.var(0, ddof=1) for p in parts], 0), rtol=1e-5
        )
    np.testing.assert_array_equal(stats.num_batches_tracked[...], [len(parts)] * 3)


def test_update_bn_leaves_frozen_layers_exactly_as_they_were():
    model = nnx.Sequential(
        nnx.Linear(4, 4, rngs=nnx.Rngs(0)),
        jaxbn.nnx.FrozenBatchNorm(4),
        jaxbn.nnx.BatchNorm1d(4),
    )
    model.layers[1].mean[...] = jnp.arange(4.0)
    before = jax.tree.map(np.asarray, jaxbn.nnx.to_linen_variables(model)["batch_stats"]["layers"])
    jaxbn.nnx.update_bn(model, [np.ones((4, 4), np.float32) * np.arange(4)[:, None]])
    after = jaxbn.nnx.to_linen_variables(model)["batch_stats"]["layers"]
    jax.tree.map(np.testing.assert_array_equal, after["1"], before["1"])
    assert int(after["2"]["num_batches_tracked"]) == 1


class Kinds(nnx.Module):
    def __init__(self):
        self.trained = jaxbn.nnx.BatchNorm(2)
        self.untracked = jaxbn.nnx.BatchNorm(2, track_running_stats=False)
        self.frozen = jaxbn.nnx.FrozenBatchNorm(2)
        self.ghost = jaxbn.nnx.GhostBatchNorm(2, 2)
        self.renorm = jaxbn.nnx.BatchRenorm(2)
        self.compat = jaxbn.nnx.flax_compat.BatchNorm(2, rngs=nnx.Rngs(0))
        self.stack = nnx.split_rngs(splits=2)(
            nnx.vmap(lambda rngs: jaxbn.nnx.BatchNorm(2), in_axes=(0,), out_axes=0)
        )(nnx.Rngs(0))


def test_inspect_batchnorm_names_each_layers_kind_and_a_row_per_stacked_member():
    report = jaxbn.nnx.inspect_batchnorm(Kinds())
    rows = {layer.path: (layer.kind, layer.problems) for layer in report.layers}
    assert rows == {
        "trained": ("trained", [NEVER_UPDATED]),
        "untracked": ("untracked", []),
        "frozen": ("frozen", []),  # constants: a counter of 0 is not a problem
        "ghost": ("ghost", [NEVER_UPDATED]),
        "renorm": ("renorm", [NEVER_UPDATED]),
        "compat": ("trained", [NEVER_UPDATED]),
        "stack[0]": ("trained", [NEVER_UPDATED]),
        "stack[1]": ("trained", [NEVER_UPDATED]),
    }
    assert "kind" in str(report).splitlines()[0]


def test_inspect_batchnorm_shows_the_statistics_update_bn_wrote():
    model = Kinds()
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 2)))

    class Run(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            inner = self.inner
            for bn in (inner.trained, inner.ghost, inner.renorm, inner.compat):
                bn(x)
            return x

    jaxbn.nnx.update_bn(Run(model), [x])
    rows = {layer.path: layer for layer in jaxbn.nnx.inspect_batchnorm(model).layers}
    assert rows["trained"].num_batches_tracked == 1 and rows["trained"].problems == []
    np.testing.assert_allclose(rows["trained"].var, x.var(0, ddof=1), rtol=1e-5)
    assert rows["ghost"].num_batches_tracked == 2 and rows["stack[0]"].num_batches_tracked == 0
