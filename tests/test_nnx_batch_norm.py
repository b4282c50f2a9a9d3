"""jaxbn.nnx.BatchNorm* against torch.nn.BatchNorm* (outputs, gradients, running statistics over
10 steps, then eval), against the Linen module (bit-identical), the mode rules and the errors."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
import jaxbn.nnx
from tests.parity_report import assert_close
from tests.torch_twins import to_jax, to_numpy

SHAPES = {
    "1d-NC": (jaxbn.nnx.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    "1d-NCL": (jaxbn.nnx.BatchNorm1d, torch.nn.BatchNorm1d, (5, 4, 3)),
    "2d": (jaxbn.nnx.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5)),
    "3d": (jaxbn.nnx.BatchNorm3d, torch.nn.BatchNorm3d, (3, 3, 2, 3, 4)),
}
TORCH_DTYPES = {jnp.float32: torch.float32, jnp.float64: torch.float64}


def run_against_torch(name, channels_last, momentum, affine, track, dtype, tol, group, steps=10):
    jax_cls, torch_cls, shape = SHAPES[name]
    torch_dtype = TORCH_DTYPES[dtype]
    channels = shape[1]
    gen = torch.Generator().manual_seed(sum(map(ord, f"{name}{momentum}{affine}{track}")))
    tm = torch_cls(channels, momentum=momentum, affine=affine, track_running_stats=track)
    tm = tm.to(torch_dtype)
    bn = jax_cls(
        channels,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        axis=-1 if channels_last else 1,
        param_dtype=dtype,
    )
    if affine:
        with torch.no_grad():
            tm.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
            tm.bias.copy_(torch.randn(channels, generator=gen))
        bn.scale[...] = jnp.asarray(tm.weight.detach().numpy())
        bn.bias[...] = jnp.asarray(tm.bias.detach().numpy())

    @nnx.jit
    def step(bn, x, g):
        def loss(bn, x):
            y = bn(x)
            return jnp.sum(y * g), y

        return nnx.grad(loss, argnums=(0, 1), has_aux=True)(bn, x)

    bn.train()
    tm.train()
    for _ in range(steps):
        x_t = (torch.randn(shape, generator=gen) * 2 + 0.5).to(torch_dtype).requires_grad_()
        g_t = torch.randn(shape, generator=gen).to(torch_dtype)
        y_t = tm(x_t)
        (y_t * g_t).sum().backward()
        (dbn, dx), y = step(bn, to_jax(x_t, channels_last), to_jax(g_t, channels_last))
        assert_close(f"{group} y", to_numpy(y, channels_last), y_t.detach(), tol, tol)
        assert_close(f"{group} dx", to_numpy(dx, channels_last), x_t.grad, tol, tol)
        if affine:
            assert_close(f"{group} dscale", dbn.scale[...], tm.weight.grad, tol, tol)
            assert_close(f"{group} dbias", dbn.bias[...], tm.bias.grad, tol, tol)
            tm.weight.grad = tm.bias.grad = None
        if track:
            assert_close(f"{group} running_mean", bn.mean[...], tm.running_mean, tol, tol)
            assert_close(f"{group} running_var", bn.var[...], tm.running_var, tol, tol)
            assert int(bn.num_batches_tracked[...]) == int(tm.num_batches_tracked)
        else:
            assert nnx.state(bn, nnx.BatchStat) == nnx.State({})

    bn.eval()
    tm.eval()
    x_t = torch.randn(shape, generator=gen).to(torch_dtype)
    y_eval = nnx.jit(lambda bn, x: bn(x))(bn, to_jax(x_t, channels_last))
    with torch.no_grad():
        assert_close(f"{group} eval y", to_numpy(y_eval, channels_last), tm(x_t), tol, tol)


@pytest.mark.parametrize(
    "name,channels_last,momentum,affine,track",
    [
        ("1d-NCL", False, 0.3, False, True),
        ("2d", True, None, True, True),
        ("3d", False, 0.1, True, False),
    ],
)
def test_nnx_float32_training_and_eval_match_torch_batchnorm(
    name, channels_last, momentum, affine, track
):
    run_against_torch(
        name, channels_last, momentum, affine, track, jnp.float32, 2e-5, f"nnx bn float32 {name}"
    )


@pytest.mark.parametrize("name,momentum", [("1d-NC", None), ("2d", 0.1)])
def test_nnx_float64_training_and_eval_match_torch_batchnorm_tightly(name, momentum):
    with jax.enable_x64(True):
        run_against_torch(
            name, True, momentum, True, True, jnp.float64, 1e-11, f"nnx bn float64 {name}"
        )


# --- the NNX module and the Linen module compute the same bits ------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_nnx_and_linen_batch_norm_are_bit_identical_over_steps(momentum):
    rng = np.random.default_rng(0)
    x_all = rng.normal(1.0, 3.0, (3, 6, 5, 5, 4)).astype(np.float32)
    g = rng.normal(size=(6, 5, 5, 4)).astype(np.float32)
    mask = rng.random((6, 5, 5, 1)) < 0.7
    linen = jaxbn.BatchNorm2d(4, momentum=momentum)
    bn = jaxbn.nnx.BatchNorm2d(4, momentum=momentum)
    params = {"scale": np.linspace(0.5, 2, 4, dtype=np.float32)}
    params["bias"] = np.linspace(-1, 1, 4, dtype=np.float32)
    stats = jaxbn.nnx.to_linen_variables(bn)["batch_stats"]  # the fresh statistics Linen makes
    jaxbn.nnx.from_linen_variables(bn, {"params": params, "batch_stats": stats})

    def linen_loss(params, stats, x):
        y, updates = linen.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mask=mask,
            mutable=["batch_stats"],
        )  # fmt: skip
        return jnp.sum(y * g), (y, updates["batch_stats"])

    def nnx_loss(bn, x):
        y = bn(x, train=True, mask=mask)
        return jnp.sum(y * g), y

    linen_step = jax.jit(jax.grad(linen_loss, (0, 2), has_aux=True))
    nnx_step = nnx.jit(nnx.grad(nnx_loss, argnums=(0, 1), has_aux=True))
    for x in x_all:
        (dp, dx), (y, stats) = linen_step(params, stats, x)
        (dbn, dx_n), y_n = nnx_step(bn, x)
        np.testing.assert_array_equal(y_n, y)
        np.testing.assert_array_equal(dx_n, dx)
        np.testing.assert_array_equal(dbn.scale[...], dp["scale"])
        np.testing.assert_array_equal(dbn.bias[...], dp["bias"])
        ours = jaxbn.nnx.to_linen_variables(bn)["batch_stats"]
        assert ours.keys() == stats.keys()
        for key, value in stats.items():
            np.testing.assert_array_equal(ours[key], value)
    y_eval = jax.jit(lambda v, x: linen.apply(v, x, train=False))(
        {"params": params, "batch_stats": stats}, x_all[0]
    )
    eval_view = nnx.view(bn, use_running_average=True)
    np.testing.assert_array_equal(nnx.jit(lambda bn, x: bn(x))(eval_view, x_all[0]), y_eval)


def test_nnx_and_linen_group_and_layer_norm_are_bit_identical():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (2, 4, 4, 8)).astype(np.float32)
    for linen, module in (
        (jaxbn.GroupNorm(4, 8), jaxbn.nnx.GroupNorm(4, 8)),
        (jaxbn.LayerNorm((4, 4, 8)), jaxbn.nnx.LayerNorm((4, 4, 8))),
    ):
        shape = module.scale.shape
        params = {k: rng.normal(size=shape).astype(np.float32) for k in ("scale", "bias")}
        jaxbn.nnx.from_linen_variables(module, {"params": params})
        expected = jax.jit(linen.apply)({"params": params}, x)
        np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(module, x), expected)


def test_nnx_group_norm_and_layer_norm_match_torch():
    x_t = torch.randn(3, 6, 4, 4) * 2 + 1
    gn_t, gn = torch.nn.GroupNorm(3, 6), jaxbn.nnx.GroupNorm(3, 6)
    ln_t, ln = torch.nn.LayerNorm([6, 4, 4]), jaxbn.nnx.LayerNorm((4, 4, 6))
    with torch.no_grad():
        for m in (gn_t, ln_t):
            m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape))
    gn.scale[...], gn.bias[...] = jnp.asarray(gn_t.weight.detach()), jnp.asarray(gn_t.bias.detach())
    ln.scale[...] = jnp.asarray(np.moveaxis(ln_t.weight.detach().numpy(), 0, -1))
    ln.bias[...] = jnp.asarray(np.moveaxis(ln_t.bias.detach().numpy(), 0, -1))
    x = to_jax(x_t, True)
    y_gn, y_ln = nnx.jit(lambda gn, ln, x: (gn(x), ln(x, train=True)))(gn, ln, x)
    with torch.no_grad():
        assert_close("nnx group norm y", to_numpy(y_gn, True), gn_t(x_t), 2e-5, 2e-5)
        assert_close("nnx layer norm y", to_numpy(y_ln, True), ln_t(x_t), 2e-5, 2e-5)


# --- the mode ----------------------------------------------------------------------------------


def test_a_model_never_put_in_a_mode_raises_on_its_first_call():
    class Net(nnx.Module):
        def __init__(self):
            self.bn = jaxbn.nnx.BatchNorm1d(3)

        def __call__(self, x):
            return self.bn(x)

    with pytest.raises(TypeError, match=re.escape("call model.train() or model.eval() first")):
        Net()(jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="without a mode"):
        nnx.jit(lambda m, x: m(x))(Net(), jnp.ones((4, 3)))


def test_train_and_eval_set_the_mode_and_a_call_overrides_it():
    bn = jaxbn.nnx.BatchNorm1d(3)
    x = jnp.arange(12.0).reshape(4, 3)
    bn.eval()
    np.testing.assert_allclose(bn(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)  # running stats 0, 1
    assert int(bn.num_batches_tracked[...]) == 0
    bn(x, train=True)  # per-call override: trains once
    assert int(bn.num_batches_tracked[...]) == 1
    bn(x, use_running_average=True)  # Flax's spelling of eval
    assert int(bn.num_batches_tracked[...]) == 1
    bn.train()
    bn(x)
    assert int(bn.num_batches_tracked[...]) == 2
    bn(x, False)  # positional use_running_average, like flax.nnx.BatchNorm
    assert int(bn.num_batches_tracked[...]) == 3
    view = nnx.view(bn, use_running_average=True)
    view(x)
    assert int(bn.num_batches_tracked[...]) == 3


def test_conflicting_per_call_modes_and_non_bool_modes_are_refused():
    bn = jaxbn.nnx.BatchNorm1d(3)
    with pytest.raises(ValueError, match="disagree"):
        bn(jnp.ones((4, 3)), train=True, use_running_average=True)
    with pytest.raises(TypeError, match=re.escape("train must be a Python bool")):
        bn(jnp.ones((4, 3)), train="yes")
    with pytest.raises(TypeError, match="use_running_average must be a Python bool"):
        jaxbn.nnx.BatchNorm1d(3, use_running_average=1)


def test_nnx_jit_traces_each_mode_and_never_reuses_the_other_modes_trace():
    bn = jaxbn.nnx.BatchNorm1d(3)
    x = jnp.arange(12.0).reshape(4, 3)
    run = nnx.jit(lambda bn, x: bn(x))
    bn.eval()
    y_eval = run(bn, x)
    bn.train()
    y_train = run(bn, x)
    assert int(bn.num_batches_tracked[...]) == 1
    bn.eval()
    np.testing.assert_array_equal(run(bn, x), bn(x))
    assert int(bn.num_batches_tracked[...]) == 1
    assert not np.allclose(y_eval, y_train)


def test_the_counter_saturates_like_the_linen_module():
    bn = jaxbn.nnx.BatchNorm1d(3, momentum=None)
    top = jnp.iinfo(jnp.int32).max
    bn.num_batches_tracked[...] = jnp.asarray(top, jnp.int32)
    bn(jnp.arange(12.0).reshape(4, 3), train=True)
    assert int(bn.num_batches_tracked[...]) == top
    assert bool(jnp.all(jnp.isfinite(bn.var[...])))


# --- errors: the Linen module's messages ---------------------------------------------------------


def linen_message(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize(
    "linen_cls,nnx_cls,shape",
    [
        (jaxbn.BatchNorm1d, jaxbn.nnx.BatchNorm1d, (2, 3, 2, 2)),
        (jaxbn.BatchNorm2d, jaxbn.nnx.BatchNorm2d, (2, 3)),
        (jaxbn.BatchNorm3d, jaxbn.nnx.BatchNorm3d, (2, 3, 2, 2)),
    ],
)
def test_wrong_rank_is_refused_with_the_linen_message(linen_cls, nnx_cls, shape):
    x = jnp.ones(shape)
    expected = linen_message(lambda: linen_cls(3).init(jax.random.key(0), x, train=False))
    with pytest.raises(ValueError, match=re.escape(expected)):
        nnx_cls(3)(x, train=True)


@pytest.mark.parametrize(
    "x,kwargs",
    [
        (jnp.ones((1, 3)), {}),  # one value per channel
        (jnp.ones((5, 4)), {}),  # wrong num_features
        (jnp.ones((5, 4)), {"affine": False, "track_running_stats": False}),
        (jnp.ones((5, 3), jnp.complex64), {}),
    ],
)
def test_input_errors_carry_the_linen_messages(x, kwargs):
    linen = jaxbn.BatchNorm1d(3, **kwargs)
    v = linen.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    expected = linen_message(lambda: linen.apply(v, x, train=True, mutable=["batch_stats"]))
    with pytest.raises(Exception, match=re.escape(expected)):
        nnx.jit(lambda bn, x: bn(x, train=True))(jaxbn.nnx.BatchNorm1d(3, **kwargs), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_features": -1},
        {"num_features": 2.0},
        {"num_features": 3, "eps": "small"},
        {"num_features": 3, "momentum": "0.1"},
        {"num_features": 3, "axis": 1.0},
        {"num_features": 3, "scale_init": 1.0},
    ],
)
def test_field_errors_carry_the_linen_messages(kwargs):
    expected = linen_message(lambda: jaxbn.BatchNorm(**kwargs))
    with pytest.raises(Exception, match=re.escape(expected)):
        jaxbn.nnx.BatchNorm(**kwargs)


def test_a_negative_eps_is_refused_with_the_linen_message_when_training():
    x = jnp.ones((5, 3))

    def linen():
        bn = jaxbn.BatchNorm1d(3, eps=-1.0)
        bn.apply(bn.init(jax.random.key(0), x, train=True), x, train=True, mutable=True)

    expected = linen_message(linen)
    with pytest.raises(ValueError, match=re.escape(expected)):
        jaxbn.nnx.BatchNorm1d(3, eps=-1.0)(x, train=True)


def test_num_features_is_required_like_torch():
    with pytest.raises(TypeError, match="num_features must be an int"):
        jaxbn.nnx.BatchNorm(None)


def test_loaded_statistics_of_the_wrong_shape_or_a_float_counter_are_refused():
    bn = jaxbn.nnx.BatchNorm1d(3)
    bn.mean[...] = jnp.zeros(3)
    bn.num_batches_tracked = nnx.BatchStat(jnp.zeros(()))
    with pytest.raises(TypeError, match="num_batches_tracked must be an integer scalar"):
        bn(jnp.ones((4, 3)), train=True)
    bn = jaxbn.nnx.BatchNorm1d(3)
    bn.var = nnx.BatchStat(jnp.ones(4))
    with pytest.raises(ValueError, match=re.escape("BatchNorm1d/var should have shape (3,)")):
        bn(jnp.ones((4, 3)), train=False)


def test_a_flax_style_momentum_warns_like_the_linen_module():
    with pytest.warns(UserWarning, match=re.escape("jaxbn.nnx.BatchNorm2d(momentum=0.9)")):
        jaxbn.nnx.BatchNorm2d(4, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxbn.nnx.BatchNorm2d(4, momentum=0.9, momentum_convention_checked=True)


def test_group_and_layer_norm_field_errors_carry_the_linen_messages():
    for linen, nnx_fn in (
        (lambda: jaxbn.GroupNorm(3, 4), lambda: jaxbn.nnx.GroupNorm(3, 4)),
        (lambda: jaxbn.GroupNorm(0, 4), lambda: jaxbn.nnx.GroupNorm(0, 4)),
        (lambda: jaxbn.LayerNorm((2, -1)), lambda: jaxbn.nnx.LayerNorm((2, -1))),
    ):
        with pytest.raises(Exception, match=re.escape(linen_message(linen))):
            nnx_fn()
    x = jnp.ones((2, 3, 3, 6))
    gn = jaxbn.GroupNorm(2, 4, affine=False)
    expected = linen_message(lambda: gn.apply(gn.init(jax.random.key(0), x), x))
    with pytest.raises(ValueError, match=re.escape(expected)):
        jaxbn.nnx.GroupNorm(2, 4, affine=False)(x)


def test_torch_s_bias_false_learns_scale_only_with_torch_s_numbers():
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(6, 3, 4, generator=gen) * 2 + 1
    torch_bn = torch.nn.BatchNorm1d(3, bias=False)
    with torch.no_grad():
        torch_bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    bn = jaxbn.nnx.BatchNorm1d(3, axis=1, bias=False)
    bn.scale[...] = jnp.asarray([0.5, 1.0, 2.0])
    assert bn.bias is None and sorted(nnx.to_pure_dict(nnx.state(bn, nnx.Param))) == ["scale"]
    y_t = torch_bn(x_t)
    y_t.backward(torch.ones_like(y_t) * torch.arange(3.0)[:, None])
    loss = lambda bn, x: jnp.sum(bn(x, train=True) * jnp.arange(3.0)[:, None])
    grads = nnx.grad(loss)(bn, jnp.asarray(x_t.numpy()))
    torch_bn.eval()
    bn.eval()
    x_t = x_t * 0.5
    np.testing.assert_allclose(bn(jnp.asarray(x_t.numpy())), torch_bn(x_t).detach(), atol=1e-5)
    np.testing.assert_allclose(grads["scale"][...], torch_bn.weight.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(bn.var[...], torch_bn.running_var.numpy(), atol=1e-6)


def test_use_scale_and_use_bias_apart_give_one_parameter_each():
    x = jnp.arange(12.0).reshape(4, 3) ** 1.5
    for use_scale, use_bias in ((True, False), (False, True)):
        bn = jaxbn.nnx.BatchNorm1d(3, use_scale=use_scale, use_bias=use_bias)
        bn.eval()
        assert (bn.scale is None, bn.bias is None) == (not use_scale, not use_bias)
        flax_bn = nnx.BatchNorm(3, use_scale=use_scale, use_bias=use_bias, rngs=nnx.Rngs(0))
        np.testing.assert_allclose(bn(x), flax_bn(x, use_running_average=True), atol=1e-5)
    assert jaxbn.nnx.BatchNorm1d(3, affine=False, bias=True).scale is None


def test_parameter_metadata_and_random_initializers_follow_flax_nnx_batch_norm():
    init = nnx.initializers.normal(1.0)
    kw = dict(scale_init=init, bias_init=init)
    ours = jaxbn.nnx.BatchNorm(
        3, scale_metadata={"tag": "s"}, bias_metadata={"tag": "b"}, rngs=nnx.Rngs(4), **kw
    )
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(4), **kw)
    np.testing.assert_array_equal(ours.scale[...], theirs.scale[...])  # one key each, scale first
    np.testing.assert_array_equal(ours.bias[...], theirs.bias[...])
    assert (ours.scale.get_metadata()["tag"], ours.bias.get_metadata()["tag"]) == ("s", "b")


def test_the_momentum_warning_shows_under_python_dash_c():
    import subprocess
    import sys

    code = (
        "import jaxbn, jaxbn.nnx\n"
        "jaxbn.BatchNorm(momentum=0.9)\n"
        "jaxbn.nnx.BatchNorm2d(3, momentum=0.99)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True
    )
    lines = [line for line in out.stderr.splitlines() if "MomentumConventionWarning" in line]
    assert [line.split(": ")[0] for line in lines] == ["<string>:2", "<string>:3"]
    assert "jaxbn.nnx.flax_compat.BatchNorm" in lines[1]
