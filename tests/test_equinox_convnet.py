"""The Equinox port of the tutorial's ConvNet (jaxbn.equinox.models.ConvNet, per example inside a
named vmap, or on the whole batch) trains like the Flax one (jaxbn.models.ConvNet, NHWC): the
same weights and SGD steps in float64 give the same parameters and running statistics to a few
ulps (measured ≤ 3e-16 after 3 steps). Not bit for bit: the port flattens in PyTorch's
(C, H, W) order where Flax flattens (H, W, C), so the first dense layer sums in another order
(the logits of one forward already differ by ~1e-15); per example, the members' (count, mean,
M2) are also merged (Chan) instead of one reduction over the batch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn import models
from jaxbn.equinox.models import ConvNet

WIDTHS, HIDDEN, SIDE, N, STEPS, LR = (4, 8, 8), 8, 8, 6, 3, 0.1
CONVS = ("features_0", "features_4", "features_8")
NORMS = ("features_1", "features_5", "features_9")


def flax_to_equinox(model, state, params, batch_stats):
    """The Flax ConvNet's variables in the Equinox ConvNet ``model``/``state``."""
    side = SIDE // 4

    def dense(kernel, flat_chw=False):
        if flat_chw:  # Flax flattens (H, W, C), the Equinox port (C, H, W) as PyTorch
            kernel = kernel.reshape(side, side, WIDTHS[-1], -1).transpose(2, 0, 1, 3)
            kernel = kernel.reshape(-1, kernel.shape[-1])
        return kernel.T

    new = eqx.tree_at(
        lambda m: (
            [c.weight for c in m.convs]
            + [c.bias for c in m.convs]
            + [n.weight for n in m.norms]
            + [n.bias for n in m.norms]
            + [m.hidden_linear.weight, m.hidden_linear.bias, m.hidden_norm.weight]
            + [m.hidden_norm.bias, m.output_linear.weight, m.output_linear.bias]
        ),
        model,
        [params[c]["kernel"].transpose(3, 2, 0, 1) for c in CONVS]
        + [params[c]["bias"][:, None, None] for c in CONVS]
        + [params[n]["scale"] for n in NORMS]
        + [params[n]["bias"] for n in NORMS]
        + [dense(params["classifier_0"]["kernel"], True), params["classifier_0"]["bias"]]
        + [params["classifier_1"]["scale"], params["classifier_1"]["bias"]]
        + [dense(params["classifier_3"]["kernel"]), params["classifier_3"]["bias"]],
    )
    for layer, name in (*zip(model.norms, NORMS, strict=True), (model.hidden_norm, "classifier_1")):
        stats = state.get(layer.state_index)
        state = state.set(layer.state_index, type(stats)(**batch_stats[name]))
    return new, state


def batches():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(STEPS, N, SIDE, SIDE, 1)))  # NHWC
    return xs, jnp.asarray(rng.integers(0, 10, size=(STEPS, N)))


@pytest.fixture(scope="module")
def flax_trained():
    """The Flax ConvNet's initial and trained (params, batch_stats), float64."""
    with jax.enable_x64(True):
        xs, labels = batches()
        flax_model = models.ConvNet(
            widths=WIDTHS, hidden=HIDDEN, num_classes=10, param_dtype=jnp.float64
        )
        variables = flax_model.init(jax.random.key(0), xs[0], train=False)

        @jax.jit
        def flax_step(params, batch_stats, x, y):
            def loss(params):
                logits, updates = flax_model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return ce, updates["batch_stats"]

            grads, batch_stats = jax.grad(loss, has_aux=True)(params)
            return jax.tree.map(lambda p, g: p - LR * g, params, grads), batch_stats

        params, batch_stats = variables["params"], variables["batch_stats"]
        for t in range(STEPS):
            params, batch_stats = flax_step(params, batch_stats, xs[t], labels[t])
        return (variables["params"], variables["batch_stats"]), (params, batch_stats)


def train_equinox(flax_trained, whole_batch):
    """The Equinox ConvNet from the Flax initial weights after the same SGD steps, and the
    trained Flax weights in the same Equinox form."""
    initial, final = flax_trained
    with jax.enable_x64(True):
        xs, labels = batches()
        model, state = eqx.nn.make_with_state(ConvNet)(
            1, WIDTHS, HIDDEN, 10, SIDE, key=jax.random.key(1), whole_batch=whole_batch
        )
        model, state = flax_to_equinox(model, state, *initial)
        model = eqx.nn.inference_mode(model, False)

        @eqx.filter_jit
        def eqx_step(model, state, x, y):
            def loss(model):
                call = model
                if not whole_batch:
                    call = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
                logits, state_out = call(x, state)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return ce, state_out

            grads, state = eqx.filter_grad(loss, has_aux=True)(model)
            return eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads)), state

        for t in range(STEPS):
            model, state = eqx_step(model, state, jnp.moveaxis(xs[t], -1, 1), labels[t])
        clone = jax.tree.unflatten(*reversed(jax.tree.flatten(state)))  # set() consumes it
        expected, expected_state = flax_to_equinox(model, clone, *final)
        return model, state, expected, expected_state


@pytest.fixture(scope="module", params=["per_example", "whole_batch"])
def trained(request, flax_trained):
    return request.param, train_equinox(flax_trained, request.param == "whole_batch")


#: a few ulps (see the module docstring for why not 0)
TOLERANCE = {"per_example": 1e-13, "whole_batch": 1e-13}


def test_parameters_after_sgd_steps_equal_the_flax_convnets_in_float64(trained):
    form, (model, _, expected, _) = trained
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    expected_leaves = jax.tree.leaves(eqx.filter(expected, eqx.is_inexact_array))
    assert all(a.dtype == jnp.float64 for a in leaves)
    for a, b in zip(leaves, expected_leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE[form])


def test_running_statistics_after_sgd_steps_equal_the_flax_convnets_in_float64(trained):
    form, (model, state, _, expected_state) = trained
    for layer in (*model.norms, model.hidden_norm):
        ours, theirs = state.get(layer.state_index), expected_state.get(layer.state_index)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == STEPS
        np.testing.assert_allclose(ours.mean, theirs.mean, rtol=0, atol=TOLERANCE[form])
        np.testing.assert_allclose(ours.var, theirs.var, rtol=0, atol=TOLERANCE[form])
