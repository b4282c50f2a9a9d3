"""jaxbn.equinox GroupNorm, LayerNorm and FrozenBatchNorm against torch (GroupNorm, LayerNorm,
torchvision-style frozen batch norm = BatchNorm2d in eval with no parameter gradients)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn.equinox as jbn

RNG = np.random.default_rng(0)
X = (RNG.normal(size=(3, 6, 4, 5)) * 2 + 1).astype(np.float32)  # [N, C, H, W]
G = RNG.normal(size=X.shape).astype(np.float32)
WEIGHT = np.linspace(0.5, 1.5, 6).astype(np.float32)
BIAS = np.linspace(-0.3, 0.2, 6).astype(np.float32)


def torch_out_and_grads(module, x, *params):
    xt = torch.tensor(x, requires_grad=True)
    y = module(xt)
    (y * torch.tensor(G[tuple(slice(0, d) for d in y.shape)])).sum().backward()
    return [y.detach().numpy(), xt.grad.numpy()] + [p.grad.numpy() for p in params]


def ours_out_and_grads(layer, call, x):
    def loss(args):
        layer, x = args
        y = call(layer, x)
        return jnp.sum(y * G[tuple(slice(0, d) for d in y.shape)]), y

    (_, y), (dlayer, dx) = eqx.filter_value_and_grad(loss, has_aux=True)((layer, jnp.asarray(x)))
    return [np.asarray(y), np.asarray(dx), dlayer]


def with_params(layer, weight, bias):
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, (jnp.asarray(weight), jnp.asarray(bias))
    )


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_group_norm_per_example_matches_torch(groups):
    layer = with_params(jbn.GroupNorm(groups, 6), WEIGHT, BIAS)
    ref = torch.nn.GroupNorm(groups, 6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(WEIGHT))
        ref.bias.copy_(torch.tensor(BIAS))
    y, dx, dlayer = ours_out_and_grads(layer, lambda m, x: jax.vmap(m)(x), X)
    y_ref, dx_ref, dw_ref, db_ref = torch_out_and_grads(ref, X, ref.weight, ref.bias)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5)
    np.testing.assert_allclose(dlayer.weight, dw_ref, atol=5e-5)
    np.testing.assert_allclose(dlayer.bias, db_ref, atol=5e-5)


def test_group_norm_takes_a_state_and_returns_it_like_equinoxs():
    layer = jbn.GroupNorm(2, 6)
    state = eqx.nn.State(layer)
    y, same = layer(jnp.asarray(X[0]), state)
    assert same is state
    np.testing.assert_array_equal(y, layer(jnp.asarray(X[0])))


def test_group_norm_with_groups_that_do_not_divide_the_channels_is_refused():
    with pytest.raises(ValueError, match=r"^num_channels \(6\) must be divisible by num_groups"):
        jbn.GroupNorm(4, 6)


def test_layer_norm_over_an_examples_trailing_dims_matches_torch():
    shape = (6, 4, 5)
    w = RNG.normal(size=shape).astype(np.float32)
    b = RNG.normal(size=shape).astype(np.float32)
    layer = with_params(jbn.LayerNorm(shape), w, b)
    ref = torch.nn.LayerNorm(shape)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref.bias.copy_(torch.tensor(b))
    y, dx, dlayer = ours_out_and_grads(layer, lambda m, x: jax.vmap(m)(x), X)
    y_ref, dx_ref, dw_ref, db_ref = torch_out_and_grads(ref, X, ref.weight, ref.bias)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5)
    np.testing.assert_allclose(dlayer.weight, dw_ref, atol=5e-5)
    np.testing.assert_allclose(dlayer.bias, db_ref, atol=5e-5)


def test_layer_norm_of_a_wrong_trailing_shape_gets_torchs_message():
    with pytest.raises(RuntimeError, match=r"^Given normalized_shape=\[5\], expected input"):
        jbn.LayerNorm(5)(jnp.ones((2, 4)))


def frozen_and_torch():
    bn, state = eqx.nn.make_with_state(jbn.BatchNorm2d)(6, axis_name="batch", inference=False)
    bn = with_params(bn, WEIGHT, BIAS)
    _, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        jnp.asarray(X), state
    )
    ref = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(WEIGHT))
        ref.bias.copy_(torch.tensor(BIAS))
        ref(torch.tensor(X))
    return jbn.FrozenBatchNorm.from_batch_norm(bn, state), state, ref.eval()


def test_frozen_batch_norm_from_a_trained_layer_is_torchs_eval_with_constant_parameters():
    frozen, state, ref = frozen_and_torch()
    x = X[::-1].copy()

    def call(m, x):
        return jax.vmap(m, in_axes=(0, None), out_axes=(0, None))(x, state)[0]

    y, dx, dlayer = ours_out_and_grads(frozen, call, x)
    y_ref, dx_ref = torch_out_and_grads(ref, x)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5)
    for leaf in (dlayer.weight, dlayer.bias, dlayer.running_mean, dlayer.running_var):
        np.testing.assert_array_equal(leaf, 0)  # constants


def test_frozen_batch_norm_returns_the_state_untouched_in_training_too():
    frozen, state, _ = frozen_and_torch()
    y_train, new_state = frozen(jnp.asarray(X[0]), state, inference=False)
    assert new_state is state
    np.testing.assert_array_equal(y_train, frozen(jnp.asarray(X[0]), state, inference=True)[0])


def test_freezing_a_layer_without_running_statistics_is_refused():
    bn = jbn.BatchNorm(6, track_running_stats=False)
    with pytest.raises(ValueError, match=r"track_running_stats=False has no running statistics"):
        jbn.FrozenBatchNorm.from_batch_norm(bn, eqx.nn.State(bn))
