"""A Flax codebase switches to jaxbn in one line (issue 18): Flax's ImageNet example ResNet with
``nn.BatchNorm`` → ``jaxbn.flax_compat.BatchNorm``, and each trap of the switch fixed or refused
with a message: Flax's spelling, the momentum convention, init in training mode, the
cross-replica mean of ``batch_stats``, Flax checkpoints."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.linen.batch_norm import MomentumConventionWarning

ModuleDef = Any


def normal(seed, shape):
    """Test data from NumPy: compiling JAX's random sampler costs seconds per shape here."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# --- Flax's examples/imagenet/models.py, cut to two stages; the norm class is a field ---


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


def kernel_init(key, shape, dtype=jnp.float32):
    """Deterministic, lecun-scaled: compiling JAX's random initializers would take most of this
    file's time on two busy cores, and no number under test depends on them."""
    del key
    fan_in = int(np.prod(shape[:-1]))
    values = np.sin(np.arange(int(np.prod(shape))) * 1.7).reshape(shape) * np.sqrt(3 / fan_in)
    return jnp.asarray(values, dtype)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 4
    dtype: Any = jnp.float32
    conv: ModuleDef = functools.partial(nn.Conv, kernel_init=kernel_init)  # the example: nn.Conv
    batch_norm: ModuleDef = jaxbn.flax_compat.BatchNorm  # the one changed line: nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            self.batch_norm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name="batch",
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(
                    self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=nn.relu
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init)(x)
        return jnp.asarray(x, self.dtype)


IMAGE = 8  # 8×8 → conv 4×4 → pool 2×2 → stage 1 at 1×1: one value per channel per image
ONE_IMAGE = jnp.ones((1, IMAGE, IMAGE, 3))


def resnet(dtype=jnp.float32, batch_norm=jaxbn.flax_compat.BatchNorm):
    return ResNet(stage_sizes=[1, 1], num_classes=3, dtype=dtype, batch_norm=batch_norm)


@pytest.fixture(scope="module")
def variables():
    """train.py's ``initialized``: jit(model.init) on one image, in training mode (the model's
    default), so stage 1 sees one value per channel; its params are float32 for any dtype."""
    return jax.jit(resnet().init)({"params": jax.random.key(0)}, ONE_IMAGE)


def pmapped_train_forward(model, devices):
    """train.py's train_step up to the new batch_stats (loss, grads, optimizer left out)."""

    def forward(variables, images):
        logits, new_model_state = model.apply(variables, images, mutable=["batch_stats"])
        return new_model_state["batch_stats"], logits

    return jax.pmap(forward, axis_name="batch", in_axes=(None, 0), devices=jax.devices()[:devices])


def cross_replica_mean(batch_stats, devices):
    """train.py's ``sync_batch_stats``, with jaxbn's counter-keeping average."""
    sync = jax.pmap(
        lambda s: jaxbn.sync_batch_stats(s, "batch"), "batch", devices=jax.devices()[:devices]
    )
    return sync(batch_stats)


@pytest.mark.parametrize(
    "dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)], ids=["float32", "bfloat16"]
)
def test_imagenet_resnet_with_one_changed_line_syncs_stats_equal_to_one_device_on_the_whole_batch(
    variables, dtype, tol
):
    model = resnet(dtype)
    images = jnp.asarray(normal(1, (8, IMAGE, IMAGE, 3)) * 2 + 1, dtype)
    stats4, logits4 = pmapped_train_forward(model, 4)(
        variables, images.reshape(4, 2, *ONE_IMAGE.shape[1:])
    )
    stats1, logits1 = pmapped_train_forward(model, 1)(variables, images[None])

    assert logits4.dtype == dtype
    for leaf in jax.tree.leaves(stats4):  # already identical on every device
        assert bool(jnp.all(leaf == leaf[0]))
    synced = cross_replica_mean(stats4, 4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), synced, stats4)
    assert synced["bn_init"]["num_batches_tracked"].dtype == jnp.int32
    for path, a in jax.tree_util.tree_leaves_with_path(synced):
        b = functools.reduce(lambda tree, key: tree[key.key], path, stats1)
        np.testing.assert_allclose(a[0], b[0], tol, tol, err_msg=jax.tree_util.keystr(path))
    assert int(synced["ResNetBlock_1"]["norm_proj"]["num_batches_tracked"][0]) == 1
    np.testing.assert_allclose(
        logits4.reshape(logits1.shape).astype(jnp.float32), logits1.astype(jnp.float32), tol, tol
    )


def test_the_swapped_model_has_flax_variables_plus_the_counter_and_a_zero_init_scale(variables):
    flax_vars = jax.eval_shape(resnet(batch_norm=nn.BatchNorm).init, jax.random.key(0), ONE_IMAGE)

    def described(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(path): (a.shape, a.dtype) for path, a in leaves}

    ours, theirs = described(variables), described(flax_vars)
    counters = [path for path in ours if path.endswith("['num_batches_tracked']")]
    assert len(counters) == sum(path.endswith("['mean']") for path in theirs) == 6
    assert {ours.pop(path) for path in counters} == {((), jnp.dtype(jnp.int32))}
    assert ours == theirs
    assert all(int(c) == 0 for c in jax.tree.leaves(variables["batch_stats"]) if c.ndim == 0)
    assert not jnp.any(variables["params"]["ResNetBlock_0"]["BatchNorm_1"]["scale"])
    assert bool(jnp.all(variables["params"]["ResNetBlock_0"]["BatchNorm_0"]["scale"] == 1))


# --- the Flax-spelled door is jaxbn.BatchNorm with the converted momentum ---


def test_flax_spelling_gives_the_numbers_of_jaxbn_batchnorm_with_the_converted_momentum():
    assert jaxbn.flax_compat.momentum_from_flax(0.9) == 0.1
    flax_spelled = jaxbn.flax_compat.BatchNorm(momentum=0.9, epsilon=1e-3)
    plain = jaxbn.BatchNorm(momentum=0.1, eps=1e-3)
    x0 = jnp.zeros((4, 3, 3, 5))
    v_f = flax_spelled.init(jax.random.key(0), x0, use_running_average=False)
    v_p = plain.init(jax.random.key(0), x0, train=True)
    v_f["params"] = v_p["params"] = {"scale": jnp.linspace(0.5, 2, 5), "bias": jnp.arange(5.0)}

    def loss(apply, variables, params, x):
        y, updates = apply({**variables, "params": params}, x)
        return jnp.sum(jnp.sin(y)), (y, updates)

    flax_apply = functools.partial(
        flax_spelled.apply, use_running_average=False, mutable=["batch_stats"]
    )
    plain_apply = functools.partial(plain.apply, train=True, mutable=["batch_stats"])
    grad = jax.jit(jax.grad(loss, (2, 3), has_aux=True), static_argnums=0)
    for step in range(3):
        x = jnp.asarray(normal(step, (4, 3, 3, 5)) * 3 + step)
        g_f, (y_f, up_f) = grad(flax_apply, v_f, v_f["params"], x)
        g_p, (y_p, up_p) = grad(plain_apply, v_p, v_p["params"], x)
        np.testing.assert_array_equal(y_f, y_p)
        jax.tree.map(np.testing.assert_array_equal, (g_f, up_f), (g_p, up_p))
        v_f, v_p = {**v_f, **up_f}, {**v_p, **up_p}
    assert int(v_f["batch_stats"]["num_batches_tracked"]) == 3
    y_f = flax_spelled.apply(v_f, x, use_running_average=True)
    np.testing.assert_array_equal(y_f, plain.apply(v_p, x, train=False))


def test_use_running_average_is_a_field_or_a_call_argument_like_flax():
    x = jnp.arange(12.0).reshape(4, 3)
    as_field = jaxbn.flax_compat.BatchNorm(use_running_average=False)
    at_call = jaxbn.flax_compat.BatchNorm()
    variables = at_call.init(jax.random.key(0), x, use_running_average=False)
    y1, s1 = as_field.apply(variables, x, mutable=["batch_stats"])
    y2, s2 = at_call.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(y1, y2)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    with pytest.raises(ValueError, match="passed to the constructor and at call time"):
        as_field.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


def test_the_mode_is_never_implicit():
    bn = jaxbn.flax_compat.BatchNorm()
    with pytest.raises(ValueError, match=r"needs the mode: pass use_running_average=False"):
        bn.init(jax.random.key(0), jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="use_running_average must be a Python bool"):
        jaxbn.flax_compat.BatchNorm(use_running_average="no")


def test_flax_spelled_training_on_one_value_per_channel_raises_pytorchs_error():
    bn = jaxbn.flax_compat.BatchNorm(use_running_average=False)
    x = jnp.ones((1, 1, 1, 3))
    variables = bn.init(jax.random.key(0), x)  # init: fine
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        bn.apply(variables, x, mutable=["batch_stats"])


def test_use_scale_and_use_bias_leave_out_their_parameter_like_flax():
    x = jnp.ones((4, 3))
    for use_scale, use_bias in [(False, True), (True, False), (False, False)]:
        ours = jaxbn.flax_compat.BatchNorm(use_scale=use_scale, use_bias=use_bias)
        theirs = nn.BatchNorm(use_scale=use_scale, use_bias=use_bias)
        p_ours = ours.init(jax.random.key(0), x, use_running_average=True).get("params", {})
        p_theirs = theirs.init(jax.random.key(0), x, use_running_average=True).get("params", {})
        assert set(p_ours) == set(p_theirs)


def test_unsupported_flax_options_are_refused_not_ignored():
    with pytest.raises(ValueError, match="force_float32_reductions=False is not supported"):
        jaxbn.flax_compat.BatchNorm(force_float32_reductions=False)
    with pytest.raises(TypeError, match="axis must be an int"):
        jaxbn.flax_compat.BatchNorm(axis=(1, 2))


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: jaxbn.BatchNorm(**kw),
        lambda **kw: jaxbn.BatchNorm2d(4, **kw),
        lambda **kw: jaxbn.GroupNorm(2, **kw),
        lambda **kw: jaxbn.LayerNorm((3, 3, 4), **kw),
        lambda **kw: jaxbn.flax_compat.BatchNorm(use_running_average=True, **kw),
    ],
    ids=["BatchNorm", "BatchNorm2d", "GroupNorm", "LayerNorm", "flax_compat.BatchNorm"],
)
def test_every_jaxbn_norm_takes_flax_scale_init_and_bias_init(make):
    module = make(scale_init=nn.initializers.zeros_init(), bias_init=nn.initializers.constant(0.5))
    x = jnp.ones((2, 3, 3, 4))
    kwargs = {} if isinstance(module, jaxbn.flax_compat.BatchNorm) else {"train": False}
    params = module.init(jax.random.key(0), x, **kwargs)["params"]
    assert not jnp.any(params["scale"])
    assert bool(jnp.all(params["bias"] == 0.5))


def test_a_non_callable_initializer_is_refused_when_the_module_is_built():
    with pytest.raises(TypeError, match="scale_init must be an initializer"):
        jaxbn.BatchNorm(scale_init=0.0)
    with pytest.raises(TypeError, match="bias_init must be an initializer"):
        jaxbn.GroupNorm(2, bias_init="zeros")


# --- trap 2: the momentum convention ---


def test_a_flax_momentum_on_jaxbn_batchnorm_warns_naming_both_conventions():
    with pytest.warns(
        MomentumConventionWarning,
        match=r"BatchNorm\(momentum=0\.9\): jaxbn follows PyTorch, where momentum is the weight "
        r"of the new batch.*Flax and Keras use the weight of the old value.*pass momentum=0\.1",
    ) as record:
        jaxbn.BatchNorm(momentum=0.9)
    assert record[0].filename == __file__  # the user's line, not jaxbn's or Flax's


def test_the_momentum_warning_comes_once_per_value():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(3):
            for momentum in (0.9, 0.8):
                model = jaxbn.BatchNorm(momentum=momentum)
                model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    assert [str(w.message).split(":")[0] for w in record] == [
        "jaxbn.BatchNorm(momentum=0.9)",
        "jaxbn.BatchNorm(momentum=0.8)",
    ]


def test_a_pytorch_momentum_on_the_flax_spelled_class_warns_too():
    with pytest.warns(
        MomentumConventionWarning,
        match=r"flax_compat.BatchNorm\(momentum=0\.1\): this class takes Flax's convention, "
        r"where momentum is the weight of the old value.*PyTorch and jaxbn.BatchNorm use the "
        r"weight of the new batch.*pass momentum=0\.9",
    ):
        jaxbn.flax_compat.BatchNorm(momentum=0.1)


def test_momentum_convention_checked_silences_the_warning_and_defaults_never_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", MomentumConventionWarning)
        model = jaxbn.BatchNorm(momentum=0.9, momentum_convention_checked=True)
        model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
        jaxbn.flax_compat.BatchNorm(momentum=0.1, momentum_convention_checked=True)
        jaxbn.BatchNorm(), jaxbn.BatchNorm(momentum=0.5), jaxbn.BatchNorm(momentum=None)
        jaxbn.flax_compat.BatchNorm(), jaxbn.flax_compat.BatchNorm(momentum=0.5)
        jax.eval_shape(resnet().init, jax.random.key(0), ONE_IMAGE)  # Flax's momentum=0.9


# --- trap 3: init in training mode creates variables only ---


@pytest.mark.parametrize(
    "module,kwargs",
    [
        (jaxbn.BatchNorm2d(3, axis_name="batch"), {"train": True}),
        (jaxbn.flax_compat.BatchNorm(axis_name="batch"), {"use_running_average": False}),
    ],
    ids=["BatchNorm2d", "flax_compat.BatchNorm"],
)
def test_init_in_training_mode_on_one_image_with_a_1x1_map_creates_variables_only(module, kwargs):
    x = jnp.full((1, 1, 1, 3), 7.0)  # one value per channel, outside any mapped axis
    stats = module.init(jax.random.key(0), x, **kwargs)["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], jnp.zeros(3))
    np.testing.assert_array_equal(stats["var"], jnp.ones(3))
    assert stats["num_batches_tracked"].dtype == jnp.int32
    assert int(stats["num_batches_tracked"]) == 0


# --- trap 4: the cross-replica mean of batch_stats ---


class Net(nn.Module):
    synced: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(
            jaxbn.flax_compat.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            axis_name="batch" if self.synced else None,
        )
        return norm()(x)


def test_pmean_of_batch_stats_makes_the_counter_a_float_and_apply_names_it():
    model, x = Net(), jnp.arange(24.0).reshape(8, 3)
    variables = model.init(jax.random.key(0), x)
    replicated = jax.tree.map(lambda a: jnp.stack([a, a]), variables["batch_stats"])
    averaged = jax.pmap(lambda s: jax.lax.pmean(s, "batch"), "batch", devices=jax.devices()[:2])(
        replicated
    )
    variables = {**variables, "batch_stats": jax.tree.map(lambda a: a[0], averaged)}
    with pytest.raises(
        TypeError,
        match=r"batch_stats/BatchNorm_0/num_batches_tracked must be an integer scalar, got "
        r"shape \(\) and dtype float32",
    ):
        model.apply(variables, x, mutable=["batch_stats"])


def test_sync_batch_stats_averages_per_device_statistics_and_keeps_the_counter_an_integer():
    model = Net()  # no axis_name: statistics per device, as Flax's example kept them
    x = jnp.asarray(normal(1, (4, 6, 3)) * np.arange(1.0, 5.0)[:, None, None])
    variables = model.init(jax.random.key(0), x[0])

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0), devices=jax.devices()[:4])
    def step_and_sync(variables, x):
        _, updates = model.apply(variables, x, mutable=["batch_stats"])
        return updates["batch_stats"], jaxbn.sync_batch_stats(updates["batch_stats"], "batch")

    local, synced = step_and_sync(variables, x)
    for key in ("mean", "var"):
        layer = synced["BatchNorm_0"][key]
        np.testing.assert_allclose(
            layer, jnp.broadcast_to(local["BatchNorm_0"][key].mean(0), layer.shape), rtol=1e-6
        )
    counter = synced["BatchNorm_0"]["num_batches_tracked"]
    assert counter.dtype == jnp.int32
    np.testing.assert_array_equal(counter, [1, 1, 1, 1])


def test_sync_batch_stats_refuses_a_counter_already_averaged_as_a_float():
    stats = {"BatchNorm_0": {"mean": jnp.zeros((2, 3)), "num_batches_tracked": jnp.ones(2)}}
    sync = jax.pmap(
        lambda s: jaxbn.sync_batch_stats(s, "batch"), "batch", devices=jax.devices()[:2]
    )
    with pytest.raises(
        TypeError,
        match=r"sync_batch_stats: BatchNorm_0/num_batches_tracked must be an integer counter, "
        r"got dtype float32: it was averaged as a float",
    ):
        sync(stats)


# --- trap 5: Flax checkpoints ---


def flax_and_jaxbn_runs(steps=3, shape=(6, 2, 2, 3)):
    """The same batches through flax.linen.BatchNorm(momentum=0.9) and jaxbn.BatchNorm(0.1)."""
    flax_bn = nn.BatchNorm(momentum=0.9, use_fast_variance=False)
    ours = jaxbn.BatchNorm(momentum=0.1)
    x0 = jnp.zeros(shape)
    v_flax = flax_bn.init(jax.random.key(0), x0, use_running_average=True)
    v_ours = ours.init(jax.random.key(0), x0, train=False)
    for step in range(steps):
        x = jnp.asarray(normal(step, shape) * (step + 1) + step)
        _, up = flax_bn.apply(v_flax, x, use_running_average=False, mutable=["batch_stats"])
        v_flax = {**v_flax, **up}
        _, up = ours.apply(v_ours, x, train=True, mutable=["batch_stats"])
        v_ours = {**v_ours, **up}
    return v_flax, v_ours


def test_a_converted_flax_batch_norm_has_jaxbns_running_statistics():
    v_flax, v_ours = flax_and_jaxbn_runs()
    converted = jaxbn.from_flax_batch_norm(
        v_flax, batch_count=6 * 2 * 2, num_batches_tracked=3, flax_momentum=0.9
    )
    assert "num_batches_tracked" not in v_flax["batch_stats"]  # the input is not changed
    np.testing.assert_allclose(
        converted["batch_stats"]["mean"], v_ours["batch_stats"]["mean"], 1e-6
    )
    np.testing.assert_allclose(converted["batch_stats"]["var"], v_ours["batch_stats"]["var"], 1e-6)
    assert converted["batch_stats"]["num_batches_tracked"].dtype == jnp.int32
    assert int(converted["batch_stats"]["num_batches_tracked"]) == 3
    x = jnp.ones((6, 2, 2, 3))
    np.testing.assert_allclose(
        jaxbn.BatchNorm().apply(converted, x, train=False),
        jaxbn.BatchNorm().apply(v_ours, x, train=False),
        rtol=1e-6,
    )


@pytest.mark.parametrize("train", [True, False], ids=["training", "eval"])
def test_flax_statistics_without_a_counter_are_refused_naming_the_converter(train):
    v_flax, _ = flax_and_jaxbn_runs(steps=1)
    x = jnp.ones((6, 2, 2, 3))
    with pytest.raises(
        ValueError,
        match=r"batch_stats/BatchNorm_0/num_batches_tracked missing next to mean, var: "
        r"statistics without a counter come from flax.linen.BatchNorm.*jaxbn.from_flax_batch_norm",
    ):
        nested = {collection: {"BatchNorm_0": tree} for collection, tree in v_flax.items()}
        Net().apply(nested, x, train=train, mutable=["batch_stats"])


def test_a_flax_checkpoint_restored_with_orbax_is_refused_then_converted(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    v_flax, v_ours = flax_and_jaxbn_runs(steps=2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "flax", v_flax)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "flax")
    x = jnp.ones((6, 2, 2, 3))
    with pytest.raises(ValueError, match="num_batches_tracked missing"):
        jaxbn.BatchNorm().apply(restored, x, train=False)
    converted = jaxbn.from_flax_batch_norm(
        restored, batch_count=24, num_batches_tracked=2, flax_momentum=0.9
    )
    np.testing.assert_allclose(converted["batch_stats"]["var"], v_ours["batch_stats"]["var"], 1e-6)


def test_the_converter_takes_a_count_per_layer_and_replicated_state():
    stats = {
        "a": {"mean": jnp.zeros((2, 3)), "var": jnp.full((2, 3), 0.5)},
        "b": {"mean": jnp.zeros(3), "var": jnp.ones(3)},
    }
    converted = jaxbn.from_flax_batch_norm(
        {"batch_stats": stats},
        batch_count={"a": 2, "b": 5},
        num_batches_tracked=0,
        flax_momentum=0.9,
    )["batch_stats"]
    # t = 0: only the initial 1 is there, and it stays 1; the rest is scaled by n/(n-1)
    np.testing.assert_allclose(
        converted["a"]["var"], jnp.full((2, 3), 0.0), atol=1e-7
    )  # 2·(0.5-1)+1
    np.testing.assert_allclose(converted["b"]["var"], jnp.ones(3))
    assert converted["a"]["num_batches_tracked"].shape == (2,)


@pytest.mark.parametrize(
    "variables,kwargs,error,message",
    [
        ({"params": {}}, {}, ValueError, "has no 'batch_stats' collection"),
        (
            {
                "batch_stats": {
                    "BatchNorm_0": {
                        "mean": jnp.zeros(3),
                        "var": jnp.ones(3),
                        "num_batches_tracked": jnp.int32(1),
                    }
                }
            },
            {},
            ValueError,
            r"batch_stats/BatchNorm_0 already has num_batches_tracked: these are jaxbn statistics",
        ),
        (
            {"batch_stats": {"bn": {"mean": jnp.zeros(3)}}},
            {},
            ValueError,
            r"batch_stats/bn has only \['mean'\]",
        ),
        (
            {"batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}},
            {"batch_count": 1},
            ValueError,
            r"batch_count for bn must be in \[2",
        ),
        (
            {"batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}},
            {"batch_count": {"bm": 4}},
            ValueError,
            r"batch_count has no entry for \['bn'\]",
        ),
        (
            {"batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}},
            {"flax_momentum": 0.1 + 1},
            ValueError,
            "flax_momentum is Flax's",
        ),
        (
            {"batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}},
            {"num_batches_tracked": 2.0},
            TypeError,
            "num_batches_tracked must be an int",
        ),
    ],
    ids=[
        "no batch_stats",
        "already jaxbn",
        "mean without var",
        "n=1",
        "count map",
        "momentum",
        "float counter",
    ],
)
def test_the_converter_refuses_what_it_cannot_convert(variables, kwargs, error, message):
    kwargs = {"batch_count": 4, "num_batches_tracked": 1, "flax_momentum": 0.9, **kwargs}
    with pytest.raises(error, match=message):
        jaxbn.from_flax_batch_norm(variables, **kwargs)


# --- mask: Flax's meaning (statistics from the selected elements, every element normalized) ---

MASK_X = normal(20, (5, 2, 2, 3)) * 2 + 1
MASK = np.array([True, False, True, True, False])[:, None, None, None]  # [N, 1, 1, 1]: rows


def masked_runs(mask=None, x=MASK_X):
    """(flax.linen.BatchNorm, jaxbn.flax_compat.BatchNorm): (module, variables, y, updates) of
    one training call with ``mask`` (default :data:`MASK`), from the same parameters."""
    if mask is None:
        return default_masked_runs()
    runs = []
    for cls in (nn.BatchNorm, jaxbn.flax_compat.BatchNorm):
        bn = cls(momentum=0.9)
        variables = bn.init(jax.random.key(0), x, use_running_average=False)
        variables["params"] = {"scale": jnp.asarray([0.5, 2.0, -1.0]), "bias": jnp.ones(3)}
        y, updates = bn.apply(
            variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
        )
        runs.append((bn, variables, y, updates["batch_stats"]))
    return runs


@functools.cache
def default_masked_runs():
    return masked_runs(MASK)


def test_a_masked_training_call_normalizes_every_element_with_the_masks_statistics_like_flax():
    (_, _, y_flax, flax_stats), (_, _, y, stats) = masked_runs()
    assert float(jnp.max(jnp.abs(y[~MASK[:, 0, 0, 0]]))) > 0.5  # rows outside the mask too
    np.testing.assert_allclose(y, y_flax, atol=2e-5)
    np.testing.assert_allclose(stats["mean"], flax_stats["mean"], atol=1e-6)
    n = int(MASK.sum()) * 2 * 2  # the masked count per channel
    flax_batch_var = (flax_stats["var"] - 0.9) / 0.1  # flax: 0.9·1 + 0.1·biased
    np.testing.assert_allclose((stats["var"] - 0.9) / 0.1, flax_batch_var * n / (n - 1), rtol=2e-5)
    assert int(stats["num_batches_tracked"]) == 1


def test_a_masked_eval_call_ignores_the_mask_like_flax():
    (flax_bn, _, _, _), (bn, variables, _, stats) = masked_runs()
    # the same running statistics in both: Flax's eval reads its mean and var as they are
    flax_vars = {
        "params": variables["params"],
        "batch_stats": {k: stats[k] for k in ("mean", "var")},
    }
    jaxbn_vars = {"params": variables["params"], "batch_stats": stats}
    y_flax = flax_bn.apply(flax_vars, MASK_X, use_running_average=True, mask=MASK)
    y = bn.apply(jaxbn_vars, MASK_X, use_running_average=True, mask=MASK)
    assert float(jnp.max(jnp.abs(y[~MASK[:, 0, 0, 0]]))) > 0.5
    np.testing.assert_allclose(y, y_flax, atol=2e-5)


def test_masked_training_gradients_equal_flaxs():
    grads = []
    for bn, variables, _, _ in masked_runs():

        def loss(params, x, bn=bn, variables=variables):
            y, _ = bn.apply(
                {**variables, "params": params},
                x,
                use_running_average=False,
                mask=MASK,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y))  # a cotangent that differs per element

        grads.append(jax.grad(loss, argnums=(0, 1))(variables["params"], jnp.asarray(MASK_X)))
    (flax_params, flax_x), (params, dx) = grads
    np.testing.assert_allclose(dx, flax_x, atol=5e-5)
    np.testing.assert_allclose(params["scale"], flax_params["scale"], atol=5e-5)
    np.testing.assert_allclose(params["bias"], flax_params["bias"], atol=5e-5)


def test_an_elementwise_mask_with_nan_outside_it_leaks_only_where_flax_outputs_nan_too():
    mask = np.random.default_rng(3).random(MASK_X.shape) < 0.7
    x = np.where(mask, MASK_X, np.nan).astype(np.float32)
    (_, _, y_flax, flax_stats), (_, _, y, stats) = masked_runs(mask, x)
    assert np.all(np.isfinite(stats["mean"])) and np.all(np.isfinite(stats["var"]))
    np.testing.assert_allclose(stats["mean"], flax_stats["mean"], atol=1e-6)
    np.testing.assert_array_equal(np.isnan(y), ~mask)  # the NaN inputs themselves, as in Flax
    np.testing.assert_allclose(y, y_flax, atol=2e-5)


def test_jaxbn_batchnorm_keeps_its_meaning_of_the_mask_masked_elements_output_zero():
    bn = jaxbn.BatchNorm()
    variables = bn.init(jax.random.key(0), MASK_X, train=False)
    y, _ = bn.apply(variables, MASK_X, train=True, mask=MASK, mutable=["batch_stats"])
    rows_out = ~MASK[:, 0, 0, 0]
    assert np.all(np.asarray(y)[rows_out] == 0) and np.all(np.asarray(y)[~rows_out] != 0)


def test_a_mask_of_any_dtype_selects_its_nonzero_elements_like_flax():
    y_bool = masked_runs()[1][2]
    (_, _, y_flax, _), (_, _, y, _) = masked_runs(MASK.astype(np.int32))
    np.testing.assert_allclose(y, y_flax, atol=2e-5)
    np.testing.assert_array_equal(y, y_bool)


def test_a_channel_with_no_selected_element_outputs_nan_like_flaxs_empty_mean():
    mask = np.ones(MASK_X.shape, bool)
    mask[..., 1] = False  # channel 1: nothing selected
    (_, _, y_flax, _), (_, _, y, _) = masked_runs(mask)
    assert np.all(np.isnan(y[..., 1])) and np.all(np.isnan(y_flax[..., 1]))
    np.testing.assert_allclose(y[..., [0, 2]], y_flax[..., [0, 2]], atol=2e-5)


def test_a_masked_call_synced_over_uneven_members_equals_one_call_on_the_whole_batch():
    # jaxbn's numbers: statistics merged count-weighted (Flax averages per-device means)
    variables = masked_runs()[1][1]
    bn = jaxbn.flax_compat.BatchNorm(momentum=0.9, axis_name="batch")
    x = np.concatenate([MASK_X, MASK_X[:3] - 1])  # 8 rows: 4 members of 2
    mask = np.concatenate([MASK, np.array([False, True, False])[:, None, None, None]])
    whole = jaxbn.flax_compat.BatchNorm(momentum=0.9)
    y_whole, updates = whole.apply(
        variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
    )

    @functools.partial(jax.vmap, in_axes=(0, 0), axis_name="batch")
    def member(x, mask):
        return bn.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])

    y, synced = member(x.reshape(4, 2, *x.shape[1:]), mask.reshape(4, 2, *mask.shape[1:]))
    np.testing.assert_allclose(y.reshape(x.shape), y_whole, atol=2e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            synced["batch_stats"][name][3], updates["batch_stats"][name], rtol=1e-6
        )
