"""The models' ``norm`` is a string shorthand or a module factory (Flax's convention), and the
models take ``dtype`` / ``param_dtype``: bfloat16 computation with float32 parameters and
statistics, or float64 throughout for exact ports."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxbn
from jaxbn import models
from tests import linen_builders
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close

# The "rbg" generator: JAX's default one (threefry) compiles for about a second per weight shape,
# more than the rest of this file costs; the inits compared here are compared with one key.
KEY = jax.random.key(0, impl="rbg")


def images(shape=(4, 8, 8, 3), dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5, dtype)


def floats(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]


def train_step(model, variables, x, labels):
    """One SGD step; (logits, new variables)."""

    def loss_fn(params):
        logits, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)

    (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return logits, {"params": params, **updates}


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- a factory is the string, to the bit ---------------------------------------------------


def test_a_batch_norm_factory_trains_exactly_like_the_batch_string():
    small = dict(widths=(4, 8, 8), hidden=8)
    by_string = models.ConvNet(**small, bn_momentum=0.2)
    by_factory = models.ConvNet(**small, norm=functools.partial(jaxbn.BatchNorm, momentum=0.2))
    x, labels = images(), jnp.array([0, 1, 2, 3])
    start = by_string.init(KEY, x, train=False)
    assert_trees_identical(by_factory.init(KEY, x, train=False), start)

    logits_s, after_s = train_step(by_string, start, x, labels)
    logits_f, after_f = train_step(by_factory, start, x, labels)
    assert_trees_identical(logits_f, logits_s)
    assert_trees_identical(after_f, after_s)
    # The factory's momentum is the one used: 0.1 would give other running statistics.
    _, after_default = train_step(models.ConvNet(**small), start, x, labels)
    mean = after_f["batch_stats"]["features_1"]["mean"]
    assert not np.array_equal(mean, after_default["batch_stats"]["features_1"]["mean"])
    eval_s = by_string.apply(after_s, x, train=False)
    assert_trees_identical(by_factory.apply(after_f, x, train=False), eval_s)


def test_a_group_norm_factory_equals_the_group_string_where_the_group_counts_match():
    # 8 channels in every slot: norm="group" picks 8 groups, as partial(GroupNorm, 8) does.
    small = dict(stage_sizes=(1, 1), widths=(8, 8))
    by_string = models.ResNet(**small, norm="group")
    by_factory = models.ResNet(**small, norm=functools.partial(jaxbn.GroupNorm, 8))
    x = images()
    variables = by_string.init(KEY, x, train=False)
    assert_trees_identical(by_factory.init(KEY, x, train=False), variables)
    expected = by_string.apply(variables, x, train=True)
    assert_trees_identical(by_factory.apply(variables, x, train=True), expected)
    # Another group count is really another normalization.
    four = models.ResNet(**small, norm=functools.partial(jaxbn.GroupNorm, 4))
    assert not np.array_equal(four.apply(variables, x, train=True), expected)


def test_a_group_norm_factory_whose_group_count_does_not_divide_a_slot_is_refused():
    model = models.ConvNet(widths=(8, 8, 8), hidden=8, norm=functools.partial(jaxbn.GroupNorm, 3))
    with pytest.raises(ValueError, match=r"num_channels \(8\) must be divisible by num_groups"):
        model.init(KEY, images(), train=False)


RECORDED: dict[str, tuple[int, int, bool]] = {}


class RecordingNorm(nn.Module):
    """A user's own norm: a ``num_features`` field, called as (x, train=...); records both."""

    num_features: int

    @nn.compact
    def __call__(self, x, *, train):
        RECORDED["/".join(self.path)] = (self.num_features, x.shape[-1], train)
        return x * self.param("scale", nn.initializers.ones, (self.num_features,))


@pytest.mark.parametrize(
    "model, shape, sizes",
    [
        (models.MLP(hidden=(6, 5)), (2, 7), {"layers_1": 6, "layers_4": 5}),
        (
            models.ConvNet(widths=(4, 6, 8), hidden=5),
            (2, 8, 8, 3),
            {"features_1": 4, "features_5": 6, "features_9": 8, "classifier_1": 5},
        ),
        (
            models.ResNet((1, 1), (4, 6)),
            (2, 8, 8, 3),
            {
                "bn1": 4,
                "layer1_0/bn1": 4,
                "layer1_0/bn2": 4,
                "layer2_0/shortcut_1": 6,
                "layer2_0/bn1": 6,
                "layer2_0/bn2": 6,
            },
        ),
    ],
    ids=["mlp", "convnet", "resnet"],
)
def test_a_users_norm_class_is_built_with_each_slots_feature_count(model, shape, sizes):
    model = model.clone(norm=RecordingNorm)
    variables = linen_builders.init(model, jnp.ones(shape), train=False)
    RECORDED.clear()
    model.apply(variables, jnp.ones(shape), train=True)
    expected = {path: (size, size, True) for path, size in sizes.items()}
    assert dict(RECORDED) == expected
    RECORDED.clear()
    model.apply(variables, jnp.ones(shape), train=False)
    assert {train for _, _, train in RECORDED.values()} == {False}


# --- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [models.MLP, models.ConvNet, models.ResNet], ids=lambda c: c.__name__
)
@pytest.mark.parametrize(
    "norm, error, message",
    [
        ("batchnorm", ValueError, r"norm must be one of \('batch', 'group', 'layer', 'none'\) "),
        ("Batch", ValueError, r"or a factory called as factory\(num_features, name=...\), got 'B"),
        (3, TypeError, r"got int \(3\)"),
        (None, TypeError, r"got NoneType \(None\)"),
        (
            jaxbn.BatchNorm(),
            TypeError,
            r"got a module instance \(BatchNorm\); pass its class or a functools.partial",
        ),
    ],
    ids=["unknown-string", "wrong-case", "int", "none-object", "module-instance"],
)
def test_a_bad_norm_is_refused_when_the_model_is_built(cls, norm, error, message):
    with pytest.raises(error, match=message):
        cls(norm=norm)


def test_a_factory_that_returns_no_module_is_named_in_the_error():
    model = models.MLP(hidden=(4,), norm=lambda num_features, name: num_features)
    with pytest.raises(TypeError, match="returned int, which cannot be called as module"):
        model.init(KEY, jnp.ones((2, 3)), train=False)


def test_bn_momentum_next_to_a_factory_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match=r"bn_momentum=0\.2 applies to norm='batch' only"):
        models.ConvNet(norm=jaxbn.BatchNorm, bn_momentum=0.2)


def test_norm_and_the_dtypes_are_keyword_only():
    with pytest.raises(TypeError, match="ResNet: norm, bn_momentum, dtype and param_dtype are k"):
        models.ResNet((1, 1), (4, 8), 10, "group")
    with pytest.raises(TypeError, match=r"got <class 'jax\.numpy\.bfloat16'> as an extra"):
        models.MLP((4,), 10, jnp.bfloat16)
    assert models.resnet18(7, "group", dtype=jnp.bfloat16).norm == "group"


# --- dtypes ----------------------------------------------------------------------------------


class PromotingNorm(nn.Module):
    """A user's norm without a dtype: its float32 scale turns bfloat16 inputs into float32."""

    num_features: int

    @nn.compact
    def __call__(self, x, *, train):
        return x * self.param("scale", nn.initializers.ones, (self.num_features,), jnp.float32)


# hidden=64: "group" on the [N, hidden] slot needs more than one value per group.
BF16_CONVNET = models.ConvNet(widths=(4, 8, 8), hidden=64)
BF16_RESNET = models.ResNet((1, 1), (4, 8))


@pytest.mark.parametrize(
    "model, norm",
    [
        (BF16_CONVNET, "batch"),
        (BF16_CONVNET, "group"),
        (BF16_CONVNET, "layer"),
        (BF16_CONVNET, functools.partial(jaxbn.BatchNorm, momentum=0.2)),
        (BF16_RESNET, "batch"),
        (BF16_RESNET, PromotingNorm),
    ],
    ids=[
        "convnet-batch",
        "convnet-group",
        "convnet-layer",
        "convnet-factory",
        "resnet-batch",
        "resnet-promoting-user-norm",
    ],
)
def test_a_bfloat16_model_computes_in_bfloat16_with_float32_params_and_statistics(model, norm):
    model = model.clone(norm=norm, dtype=jnp.bfloat16)
    x = images()  # float32 input: the model casts, nobody casts by hand
    variables = linen_builders.init(model, x, train=False)  # init's dtypes, numpy's values
    assert {leaf.dtype for leaf in floats(variables)} == {jnp.dtype(jnp.float32)}
    logits, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        # Every module's output but a PromotingNorm's own (float32, cast by the model after it):
        # the residual blocks' outputs (bn2 + shortcut) show the cast.
        capture_intermediates=lambda module, method: (
            method == "__call__" and not isinstance(module, PromotingNorm)
        ),
    )
    assert logits.dtype == jnp.bfloat16
    activations = floats(state["intermediates"])
    assert len(activations) > 5
    assert {a.dtype for a in activations} == {jnp.dtype(jnp.bfloat16)}
    stats = floats(state.get("batch_stats", {}))
    assert {s.dtype for s in stats} <= {jnp.dtype(jnp.float32)}
    if norm not in ("group", "layer", PromotingNorm):
        assert stats  # batch norm: running statistics exist, updated in float32
        assert not any(
            np.array_equal(s, v)
            for s, v in zip(stats, floats(variables["batch_stats"]), strict=True)
        )


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_a_float64_model_computes_and_stores_in_float64(norm):
    with jax.enable_x64(True):
        model = models.ConvNet(widths=(4, 8, 8), hidden=64, norm=norm, param_dtype=jnp.float64)
        x = images(dtype=jnp.float64)
        variables = linen_builders.init(model, x, train=False)  # init's dtypes, numpy's values
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        assert logits.dtype == jnp.float64
        assert {leaf.dtype for leaf in floats(variables)} == {jnp.dtype(jnp.float64)}
        assert {leaf.dtype for leaf in floats(updates)} <= {jnp.dtype(jnp.float64)}
        # dtype=float64 computes in float64 also from a float32 input.
        computing = model.clone(dtype=jnp.float64)
        assert computing.apply(variables, x.astype(jnp.float32), train=False).dtype == jnp.float64


def test_torch_weights_ported_into_a_float64_template_stay_float64_and_match_torch():
    pair = make_pairs(seed=3)["convnet"]
    net = pair.torch_model.double().train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the initial ones
            net(torch.randn(pair.input_shape, dtype=torch.float64) * 2 + 0.5)
    net.eval()
    x_t = torch.randn(pair.input_shape, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x_t).numpy()
    with jax.enable_x64(True):
        model = pair.model.clone(param_dtype=jnp.float64)
        template = linen_builders.template(
            model, jnp.zeros(pair.channels_last_shape, jnp.float64), train=False
        )
        variables = jaxbn.interop.torch_to_flax(
            pair.state_dict_for_jax(), template, flatten_shapes=pair.flatten_shapes
        )
        assert {leaf.dtype for leaf in floats(variables)} == {jnp.dtype(jnp.float64)}
        got = model.apply(variables, pair.to_jax_input(x_t), train=False)
        assert got.dtype == jnp.float64
        assert_close("float64 port convnet eval logits", got, expected, 1e-12, 1e-12)


# --- folding --------------------------------------------------------------------------------


def test_a_factory_model_whose_batch_norms_all_fold_becomes_the_none_model():
    model = models.ConvNet(
        widths=(4, 8, 8), hidden=8, norm=functools.partial(jaxbn.BatchNorm, momentum=0.2)
    )
    x = images()
    _, variables = train_step(model, linen_builders.init(model, x, train=False), x, jnp.arange(4))
    result = jaxbn.fold_batch_norm(model, variables, x[:1])
    assert not result.left
    assert result.model.norm == "none"
    assert "batch_stats" not in result.variables
    expected = model.apply(variables, x, train=False)
    assert_close(
        "fold factory convnet",
        result.model.apply(result.variables, x, train=False),
        expected,
        1e-5,
        1e-5,
    )
