"""The NNX batch norm variants (BatchRenorm, GhostBatchNorm, FrozenBatchNorm) and
freeze_batch_norm / unfreeze_batch_norm on NNX models: bit-identical to their Linen twins."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
import jaxbn.nnx
from jaxbn._module_logic import MomentumConventionWarning
from tests.nnx_builders import build

C = 3
X = [
    jax.random.normal(jax.random.key(i), (8, 2, C)) * (1 + i) + i for i in range(3)
]  # three training batches [N, L, C]
MASK = (jnp.arange(8) % 3 != 0)[:, None, None] & jnp.ones((1, 2, 1), bool)


def linen_variables(bn: nnx.Module) -> dict:
    """The Linen tree of an NNX batch norm's variables."""
    out = {"batch_stats": {}}
    if bn.scale is not None:
        out["params"] = {"scale": bn.scale[...], "bias": bn.bias[...]}
    if bn.mean is not None:
        for name in ("mean", "var", "num_batches_tracked"):
            out["batch_stats"][name] = getattr(bn, name)[...]
    return out


def set_params(bn: nnx.Module) -> nnx.Module:
    bn.scale[...] = jnp.linspace(0.5, 2.0, C)
    bn.bias[...] = jnp.linspace(-1.0, 1.0, C)
    return bn


def assert_twins_equal(nnx_bn, linen_bn, calls):
    """Trains both on ``calls`` (kwargs per call, ``x`` included), then compares outputs,
    gradients (wrt x and the parameters) and the variables bit for bit, then eval."""
    variables = linen_variables(nnx_bn)

    def nnx_loss(bn, x, kwargs):
        return jnp.sum(bn(x, train=True, **kwargs) * jnp.arange(1.0, C + 1)), None

    def linen_loss(params, x, stats, kwargs):
        y, updates = linen_bn.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mutable=["batch_stats"],
            **kwargs,
        )
        return jnp.sum(y * jnp.arange(1.0, C + 1)), updates["batch_stats"]

    for kwargs in calls:
        kwargs = dict(kwargs)
        x = kwargs.pop("x")
        (dbn, dx), _ = nnx.grad(nnx_loss, argnums=(0, 1), has_aux=True)(nnx_bn, x, kwargs)
        (dparams, dx_linen), stats = jax.grad(linen_loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x, variables["batch_stats"], kwargs
        )
        variables["batch_stats"] = stats
        np.testing.assert_array_equal(dx, dx_linen)
        np.testing.assert_array_equal(dbn["scale"][...], dparams["scale"])
        np.testing.assert_array_equal(dbn["bias"][...], dparams["bias"])
    for name, value in variables["batch_stats"].items():
        np.testing.assert_array_equal(getattr(nnx_bn, name)[...], value, err_msg=name)
    x = X[0] * 0.5
    np.testing.assert_array_equal(nnx_bn(x, train=False), linen_bn.apply(variables, x, train=False))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None, "warmup_steps": 2},
        {"update_rule": "keras", "momentum": 0.3, "r_max": 1.5, "d_max": 0.2},
    ],
)
def test_nnx_batch_renorm_is_bit_identical_to_the_linen_one(kwargs):
    nnx_bn = set_params(jaxbn.nnx.BatchRenorm(C, **kwargs))
    linen_bn = jaxbn.BatchRenorm(C, **kwargs)
    calls = [{"x": X[0]}, {"x": X[1], "mask": MASK}, {"x": X[2], "r_max": 1.2, "d_max": 0.1}]
    assert_twins_equal(nnx_bn, linen_bn, calls)
    assert int(nnx_bn.num_batches_tracked[...]) == 3


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"track_running_stats": False}])
def test_nnx_ghost_batch_norm_is_bit_identical_to_the_linen_one(kwargs):
    nnx_bn = set_params(jaxbn.nnx.GhostBatchNorm(C, 4, **kwargs))
    linen_bn = jaxbn.GhostBatchNorm(C, 4, **kwargs)
    calls = [{"x": X[0]}, {"x": X[1], "mask": MASK}, {"x": X[2]}]
    if kwargs.get("track_running_stats") is False:
        variables = linen_variables(nnx_bn)
        for call in calls:
            y = nnx_bn(call["x"], train=False)
            np.testing.assert_array_equal(y, linen_bn.apply(variables, call["x"], train=False))
        return
    assert_twins_equal(nnx_bn, linen_bn, calls)
    assert int(nnx_bn.num_batches_tracked[...]) == 6  # two splits a call


def test_nnx_frozen_batch_norm_is_bit_identical_to_the_linen_one_and_has_no_gradient():
    nnx_bn = set_params(jaxbn.nnx.FrozenBatchNorm(C, 1e-3))
    nnx_bn.mean[...] = jnp.asarray([0.5, -1.0, 2.0])
    nnx_bn.var[...] = jnp.asarray([0.25, 4.0, 1.5])
    variables = linen_variables(nnx_bn)
    linen_bn = jaxbn.FrozenBatchNorm(C, 1e-3)
    for train in (True, False):
        np.testing.assert_array_equal(
            nnx_bn(X[1], train=train, mask=MASK),
            linen_bn.apply(variables, X[1], train=train, mask=MASK),
        )
    grads = nnx.grad(lambda bn: jnp.sum(bn(X[1]) ** 2))(nnx_bn)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
    assert isinstance(nnx_bn.scale, jaxbn.nnx.FrozenParam) and isinstance(nnx_bn.scale, nnx.Param)


@pytest.fixture(scope="module")
def trained_convnet():
    model = build(lambda: jaxbn.nnx.ConvNet(1, 6, (4, 4), 8, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(5), (6, 6, 6, 1)) + 0.5
    model(x, train=True)
    return model, x


def test_freezing_an_nnx_model_gives_the_linen_frozen_models_numbers(trained_convnet):
    model, x = trained_convnet
    model = nnx.clone(model)
    linen = model.linen_twin()
    frozen_linen, variables = jaxbn.freeze_batch_norm(linen, jaxbn.nnx.to_linen_variables(model))
    expected = frozen_linen.apply(variables, x, train=True)
    frozen = jaxbn.nnx.freeze_batch_norm(model)
    assert frozen is model
    kinds = {type(node).__name__ for _, node in nnx.iter_graph(model)}
    assert "FrozenBatchNorm" in kinds and "BatchNorm2d" not in kinds
    np.testing.assert_array_equal(model(x, train=True), expected)
    # the variables keep their names: the Linen tree is the same
    assert jax.tree.structure(jaxbn.nnx.to_linen_variables(model)) == jax.tree.structure(variables)


def test_an_optimizer_with_wrt_trainable_leaves_frozen_batch_norms_alone(trained_convnet):
    model, x = trained_convnet
    model = jaxbn.nnx.freeze_batch_norm(nnx.clone(model))
    optimizer = nnx.Optimizer(model, optax.adamw(0.1, weight_decay=0.5), wrt=jaxbn.nnx.trainable)

    @nnx.jit
    def step(model, optimizer, x):
        loss = lambda model: jnp.sum(model(x, train=True) ** 2)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, jaxbn.nnx.trainable))(model)
        optimizer.update(model, grads)

    before = nnx.clone(nnx.state(model))
    step(model, optimizer, x)
    after = nnx.state(model)
    frozen = nnx.state(model, jaxbn.nnx.FrozenParam)
    assert jax.tree.leaves(frozen)  # there are frozen parameters, and they did not move
    for path, value in nnx.to_flat_state(after):
        old = dict(nnx.to_flat_state(before))[path][...]
        moved = not np.array_equal(old, value[...])
        assert moved == (
            isinstance(value, nnx.Param) and not isinstance(value, jaxbn.nnx.FrozenParam)
        ), path


def test_unfreezing_puts_the_original_layers_back_with_the_current_values(trained_convnet):
    model, x = trained_convnet
    model = nnx.clone(model)
    kinds = [type(node) for _, node in nnx.iter_graph(model)]
    expected = model(x, train=False)
    model = jaxbn.nnx.unfreeze_batch_norm(jaxbn.nnx.freeze_batch_norm(model))
    assert [type(node) for _, node in nnx.iter_graph(model)] == kinds
    assert not jax.tree.leaves(nnx.state(model, jaxbn.nnx.FrozenParam))
    np.testing.assert_array_equal(model(x, train=False), expected)
    model(x, train=True)  # trains again
    assert int(model.features_1.num_batches_tracked[...]) == 2


def test_freezing_covers_every_batch_norm_kind_in_lists_and_refuses_untracked_ones():
    rngs = nnx.Rngs(0)
    layers = nnx.List(
        [
            jaxbn.nnx.flax_compat.BatchNorm(C, rngs=rngs),
            nnx.BatchNorm(C, rngs=rngs),
            jaxbn.nnx.BatchRenorm(C),
            jaxbn.nnx.GhostBatchNorm(C, 2),
        ]
    )
    x = X[0]
    for layer in layers:
        layer(x, use_running_average=False)
    expected = [layer(x, use_running_average=True) for layer in layers]
    frozen = jaxbn.nnx.freeze_batch_norm(layers)
    assert all(isinstance(layer, jaxbn.nnx.FrozenBatchNorm) for layer in frozen)
    for layer, y in zip(frozen, expected, strict=True):
        np.testing.assert_allclose(layer(x), y, rtol=1e-6, atol=1e-6)
    untracked = nnx.List([jaxbn.nnx.BatchNorm1d(C, track_running_stats=False)])
    with pytest.raises(ValueError, match=re.escape("cannot freeze the batch norm at 0: it has")):
        jaxbn.nnx.freeze_batch_norm(untracked)
    with pytest.raises(ValueError, match="where= selects none"):
        jaxbn.nnx.freeze_batch_norm(untracked, where=lambda path: path == "9")
    bn = jaxbn.nnx.freeze_batch_norm(jaxbn.nnx.BatchNorm2d(C))  # a batch norm as the model
    with pytest.raises(ValueError, match=re.escape("expected 4D input (got 3D input)")):
        bn(x)


def test_variant_fields_are_checked_and_warned_like_the_linen_ones():
    for linen, ours in (
        (lambda: jaxbn.GhostBatchNorm(C, 0), lambda: jaxbn.nnx.GhostBatchNorm(C, 0)),
        (lambda: jaxbn.BatchRenorm(C, r_max=0.5), lambda: jaxbn.nnx.BatchRenorm(C, r_max=0.5)),
        (
            lambda: jaxbn.FrozenBatchNorm(C, scale_init=1.0),
            lambda: jaxbn.nnx.FrozenBatchNorm(C, scale_init=1.0),
        ),
    ):
        with pytest.raises(Exception) as expected:
            linen()
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            ours()
    with pytest.warns(MomentumConventionWarning, match=re.escape("jaxbn.nnx.BatchRenorm(mom")):
        jaxbn.nnx.BatchRenorm(C, momentum=0.99)
    with pytest.warns(MomentumConventionWarning, match="Keras's momentum=0.99 is jaxbn's 0.01"):
        jaxbn.nnx.BatchRenorm(C, momentum=0.99)
