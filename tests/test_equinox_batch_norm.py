"""jaxbn.equinox.BatchNorm against torch.nn.BatchNorm*d: per example inside a named vmap and on
the whole batch — outputs, input and parameter gradients, running statistics over several
steps, float32 and float64 — and the layer's mode, rank and field checks."""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn.equinox as jbn
from jaxbn import functional as F
from jaxbn._module_logic import MomentumConventionWarning

STEPS = 3
C = 3


def torch_steps(xs, gs, momentum, dtype):
    """torch's BatchNorm2d over ``xs`` ([N, C, H, W] batches): per step y, dx, dweight, dbias
    and the running statistics after it."""
    bn = torch.nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=dtype))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, C, dtype=dtype))
    out = []
    for x, g in zip(xs, gs, strict=True):
        xt = torch.tensor(x, requires_grad=True)
        bn.zero_grad()
        y = bn(xt)
        (y * torch.tensor(g)).sum().backward()
        out.append(
            [
                t.detach().numpy().copy()
                for t in (y, xt.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
            ]
            + [int(bn.num_batches_tracked)]
        )
    return out


def with_torch_params(bn):
    dtype = bn.weight.dtype
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        bn,
        (jnp.linspace(0.5, 1.5, C, dtype=dtype), jnp.linspace(-0.2, 0.3, C, dtype=dtype)),
    )


@eqx.filter_jit
def per_example_step(bn, state, x, g):
    """One training step with ``bn`` called per example inside vmap(axis_name='batch')."""

    def loss(bn, x):
        y, new_state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )
        return jnp.sum(y * g), (y, new_state)

    (_, (y, new_state)), (dbn, dx) = _grads(loss, bn, x)
    return y, dx, dbn.weight, dbn.bias, new_state


def _grads(loss, bn, x):
    """``loss(bn, x)``'s value, aux and gradients with respect to ``bn``'s arrays and ``x``."""
    return eqx.filter_value_and_grad(lambda args: loss(*args), has_aux=True)((bn, x))


@eqx.filter_jit
def whole_batch_step(bn, state, x, g):
    """One training step with ``bn`` on the whole [N, C, H, W] batch (``axis=1``)."""

    def loss(bn, x):
        y, new_state = bn(x, state)
        return jnp.sum(y * g), (y, new_state)

    (_, (y, new_state)), (dbn, dx) = _grads(loss, bn, x)
    return y, dx, dbn.weight, dbn.bias, new_state


def jaxbn_steps(step, bn, state, xs, gs):
    out = []
    for x, g in zip(xs, gs, strict=True):
        y, dx, dw, db, state = step(bn, state, jnp.asarray(x), jnp.asarray(g))
        stats = state.get(bn.state_index)
        out.append(
            [np.asarray(a) for a in (y, dx, dw, db, stats.mean, stats.var)]
            + [int(stats.num_batches_tracked)]
        )
    return out


def batches(dtype, n=4):
    rng = np.random.default_rng(0)
    xs = [(rng.normal(size=(n, C, 4, 5)) * 2 + 1).astype(dtype) for _ in range(STEPS)]
    gs = [rng.normal(size=(n, C, 4, 5)).astype(dtype) for _ in range(STEPS)]
    return xs, gs


def assert_steps_equal(ours, theirs, atol):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
        for name, u, v in zip(names, a, b, strict=False):
            np.testing.assert_allclose(u, v, atol=atol, rtol=atol, err_msg=f"{name} step {step}")
        assert a[-1] == b[-1] == step + 1


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("form", ["per_example", "whole_batch"])
def test_training_steps_match_torch_in_float32(form, momentum):
    xs, gs = batches(np.float32)
    if form == "per_example":
        bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(
            C, momentum=momentum, axis_name="batch", inference=False
        )
        step = per_example_step
    else:
        bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(
            C, momentum=momentum, axis=1, inference=False
        )
        step = whole_batch_step
    ours = jaxbn_steps(step, with_torch_params(bn), state, xs, gs)
    assert_steps_equal(ours, torch_steps(xs, gs, momentum, torch.float32), atol=2e-5)


@pytest.mark.parametrize("form", ["per_example", "whole_batch"])
def test_training_steps_match_torch_in_float64(form):
    xs, gs = batches(np.float64)
    with jax.enable_x64(True):
        kwargs = {"axis_name": "batch"} if form == "per_example" else {"axis": 1}
        bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(C, inference=False, **kwargs)
        assert bn.weight.dtype == jnp.float64
        step = per_example_step if form == "per_example" else whole_batch_step
        ours = jaxbn_steps(step, with_torch_params(bn), state, xs, gs)
    assert_steps_equal(ours, torch_steps(xs, gs, 0.1, torch.float64), atol=1e-12)


def test_inference_uses_the_running_statistics_like_torch_eval():
    xs, gs = batches(np.float32)
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(C, axis_name="batch", inference=False)
    bn = with_torch_params(bn)
    for x, g in zip(xs, gs, strict=True):
        *_, state = per_example_step(bn, state, jnp.asarray(x), jnp.asarray(g))
    ref = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(bn.weight)))
        ref.bias.copy_(torch.tensor(np.asarray(bn.bias)))
        for x in xs:
            ref(torch.tensor(x))
    ref.eval()
    evaluate = eqx.nn.inference_mode(bn)
    y, new_state = jax.vmap(evaluate, in_axes=(0, None), out_axes=(0, None))(
        jnp.asarray(xs[0]), state
    )
    np.testing.assert_allclose(y, ref(torch.tensor(xs[0])).detach().numpy(), atol=2e-5)
    assert int(new_state.get(bn.state_index).num_batches_tracked) == STEPS  # nothing updated


def test_a_layer_without_a_mode_raises_instead_of_training():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm1d)(C, axis_name="batch")
    with pytest.raises(ValueError, match=r"BatchNorm1d has no mode: set inference=False"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            jnp.ones((4, C)), state
        )


def test_the_call_keyword_overrides_the_inference_field():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm)(C, axis=1, inference=True)
    _, new_state = bn(jnp.arange(12.0).reshape(4, C), state, inference=False)
    assert int(new_state.get(bn.state_index).num_batches_tracked) == 1


def test_inference_mode_sets_the_mode_of_every_layer_in_a_model():
    model = eqx.nn.Sequential([jbn.BatchNorm(C, axis=1), eqx.nn.Lambda(jnp.tanh)])
    model, state = eqx.nn.make_with_state(lambda: model)()
    trained = eqx.nn.inference_mode(model, False)
    assert trained.layers[0].inference is False
    _, state = trained(jnp.arange(12.0).reshape(4, C), state)
    assert int(state.get(model.layers[0].state_index).num_batches_tracked) == 1


def test_the_running_variance_is_unbiased_unlike_eqx_batch_norm():
    x = jnp.arange(8.0).reshape(4, 2)  # per channel: 0, 2, 4, 6 → biased var 5, unbiased 20/3
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm)(
        2, momentum=1.0, axis=1, inference=False, momentum_convention_checked=True
    )
    _, state = bn(x, state)
    np.testing.assert_allclose(state.get(bn.state_index).var, [20 / 3, 20 / 3], rtol=1e-6)


def test_a_momentum_above_one_half_warns_from_the_users_line_with_the_equinox_conversion():
    with pytest.warns(MomentumConventionWarning) as record:
        jbn.BatchNorm(C, momentum=0.99)
    assert "eqx.nn.BatchNorm's momentum=0.99 is jaxbn's 0.01" in str(record[0].message)
    assert record[0].filename == __file__


def test_one_example_in_training_without_axis_name_is_refused_with_the_way_out():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(C, inference=False)
    with pytest.raises(ValueError, match=r"BatchNorm2d got a 3D input, one example, in training"):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, C, 2, 2)), state)


def test_a_wrong_rank_gets_torchs_message():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(C, axis_name="b", inference=False)
    with pytest.raises(ValueError, match=r"^expected 4D input \(got 2D input\)$"):
        bn(jnp.ones((4, C)), state)


def test_one_example_of_one_value_per_channel_in_training_is_torchs_error():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm)(C, inference=False)
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training, got input size"
    ):
        bn(jnp.ones(C), state)


def test_one_example_evaluates_without_a_vmap():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm1d)(C, inference=True)
    y, _ = bn(jnp.ones(C), state)
    np.testing.assert_allclose(y, np.ones(C) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_loaded_statistics_of_a_wrong_shape_are_refused_naming_them():
    bn, _ = eqx.nn.make_with_state(jbn.BatchNorm)(C, axis=1, inference=True)
    _, state = eqx.nn.make_with_state(jbn.BatchNorm)(C + 1, axis=1)  # another model's state
    with pytest.raises(ValueError, match=r"state\[BatchNorm.state_index\]/mean should have shape"):
        bn(jnp.ones((2, C)), state)


def test_functional_batch_norm_takes_one_example_inside_a_named_vmap():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, C)), jnp.float32)
    stats = (jnp.zeros(C), jnp.ones(C))
    one = lambda row: F.batch_norm(row, *stats, training=True, axis_name="batch")
    per_example = jax.vmap(one, axis_name="batch", out_axes=(0, None, None))(x)
    whole = F.batch_norm(x, *stats, training=True)
    for a, b in zip(per_example, whole, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_functional_batch_norm_on_one_example_in_training_is_torchs_error():
    with pytest.raises(
        ValueError,
        match=r"^Expected more than 1 value per channel when training, got input size \(3,\)$",
    ):
        F.batch_norm(jnp.ones(3), jnp.zeros(3), jnp.ones(3), training=True)


def test_functional_batch_norm_on_one_example_in_eval_uses_the_running_statistics():
    y, _, _ = F.batch_norm(jnp.full(3, 2.0), jnp.ones(3), jnp.full(3, 4.0), training=False)
    np.testing.assert_allclose(y, np.full(3, 1 / np.sqrt(4 + 1e-5)), rtol=1e-6)


def test_jaxbn_imports_without_equinox_and_jaxbn_equinox_names_the_extra():
    code = (
        "import sys; sys.modules['equinox'] = None\n"
        "import jaxbn\n"
        "assert 'jaxbn.equinox' not in sys.modules\n"
        "try:\n"
        "    import jaxbn.equinox\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1200
    )
    assert "pip install 'jaxbn[equinox]'" in out.stdout


def test_inference_mode_chooses_the_mode_of_several_unset_layers_at_once():
    # eqx.tree_at cannot replace a None found in several places: the unset mode is a leaf
    model = (jbn.BatchNorm(C, axis=1), jbn.BatchNorm1d(C, axis=1))
    assert [layer.inference for layer in eqx.nn.inference_mode(model)] == [True, True]


def test_a_model_jitted_whole_gets_the_equinox_way_out_for_its_traced_mode():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm)(C, axis=1, inference=False)
    with pytest.raises(TypeError, match=r"inference is a traced value.*Use eqx.filter_jit"):
        jax.jit(lambda bn, state, x: bn(x, state))(bn, state, jnp.ones((4, C)))


def test_inference_needs_no_bound_axis_name():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(C, axis_name="batch", inference=True)
    y, _ = bn(jnp.full((C, 2, 2), 3.0), state)  # one example, no vmap: no collective in eval
    np.testing.assert_allclose(y, np.full((C, 2, 2), 3 / np.sqrt(1 + 1e-5)), rtol=1e-6)


def test_bfloat16_input_keeps_float32_statistics_and_returns_bfloat16():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm)(C, axis=1, inference=False)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, C)), jnp.bfloat16)
    y, state = bn(x, state)
    assert y.dtype == jnp.bfloat16
    stats = state.get(bn.state_index)
    assert stats.mean.dtype == stats.var.dtype == jnp.float32
    expected = 0.1 * np.asarray(x, np.float32).mean(0)
    np.testing.assert_allclose(stats.mean, expected, rtol=1e-5, atol=1e-6)
