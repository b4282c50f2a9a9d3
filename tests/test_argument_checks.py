"""Inputs the math does not support are refused with a clear error, never reinterpreted."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import functional as F
from tests import linen_builders

C = 3
X = jnp.asarray(np.random.default_rng(0).standard_normal((6, C)) + 2, jnp.float32)


@pytest.mark.parametrize(
    ("norm", "torch_norm"),
    [
        (jaxbn.BatchNorm1d(C), torch.nn.BatchNorm1d(C)),
        (jaxbn.GroupNorm(1, C), torch.nn.GroupNorm(1, C)),
        (jaxbn.LayerNorm(C), torch.nn.LayerNorm(C)),
    ],
)
def test_complex_input_is_refused_like_torch(norm, torch_norm):
    x = (X + 1j * X).astype(jnp.complex64)
    with pytest.raises((NotImplementedError, RuntimeError)):  # torch refuses complex input
        torch_norm(torch.from_numpy(np.array(x)))  # a writable copy: torch wants one
    with pytest.raises(TypeError, match="not implemented for complex input"):
        norm.init(jax.random.key(0), x, train=True)


def test_functional_batch_norm_refuses_complex_input():
    x = (X + 1j * X).astype(jnp.complex64)
    with pytest.raises(TypeError, match='"batch_norm" not implemented for complex input'):
        F.batch_norm(x, jnp.zeros(C), jnp.ones(C), training=True)


@pytest.mark.parametrize("train", [None, "no", 1, 0.0])
def test_train_must_be_a_python_bool(train):
    model = jaxbn.BatchNorm1d(C)
    variables = model.init(jax.random.key(0), X, train=False)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        model.apply(variables, X, train=train, mutable=["batch_stats"])


def test_a_traced_train_flag_says_how_to_make_it_static():
    model = jaxbn.BatchNorm1d(C)
    variables = model.init(jax.random.key(0), X, train=False)
    step = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]))
    with pytest.raises(TypeError, match="static_argnames='train'"):
        step(variables, X, True)


def test_functional_training_must_be_a_python_bool():
    with pytest.raises(TypeError, match="training must be a Python bool"):
        F.batch_norm(X, jnp.zeros(C), jnp.ones(C), training="no")


def test_numpy_bools_are_accepted_as_train():
    model = jaxbn.BatchNorm1d(C)
    variables = model.init(jax.random.key(0), X, train=np.bool_(False))
    y = model.apply(variables, X, train=np.bool_(True), mutable=["batch_stats"])[0]
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)


def variables_with(**stats):
    model = jaxbn.BatchNorm1d(C)
    variables = model.init(jax.random.key(0), X, train=False)
    variables["batch_stats"].update(stats)
    return model, variables


def test_running_statistics_of_another_shape_are_refused_naming_the_variable():
    model, variables = variables_with(mean=jnp.zeros((C, 1)))
    with pytest.raises(
        ValueError, match=r"batch_stats/mean should have shape \(3,\), got \(3, 1\)"
    ):
        model.apply(variables, X, train=True, mutable=["batch_stats"])


def test_an_integer_running_mean_is_refused_naming_the_variable():
    model, variables = variables_with(mean=jnp.zeros(C, jnp.int32))
    with pytest.raises(TypeError, match="batch_stats/mean must be a floating array"):
        model.apply(variables, X, train=True, mutable=["batch_stats"])


def test_a_float_batch_counter_is_refused():
    model, variables = variables_with(num_batches_tracked=jnp.zeros((), jnp.float32))
    with pytest.raises(TypeError, match="num_batches_tracked must be an integer scalar"):
        model.apply(variables, X, train=True, mutable=["batch_stats"])


def test_functional_refuses_a_running_mean_of_another_shape():
    with pytest.raises(ValueError, match=r"running_mean should have shape \(3,\)"):
        F.batch_norm(X, jnp.zeros((C, 1)), jnp.ones(C), training=True)


def test_the_batch_counter_saturates_instead_of_wrapping_with_cumulative_momentum():
    model = jaxbn.BatchNorm1d(C, momentum=None)
    top = jnp.iinfo(jnp.int32).max
    variables = model.init(jax.random.key(0), X, train=False)
    variables["batch_stats"]["num_batches_tracked"] = jnp.asarray(top - 1, jnp.int32)
    variables["batch_stats"]["mean"] = jnp.full(C, 5.0)
    for _ in range(2):  # top - 1 -> top -> top
        _, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    assert int(variables["batch_stats"]["num_batches_tracked"]) == top
    # factor 1/2**31: the running mean stays where it was (a wrapped counter gives -1/2**31+1)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], 5.0, rtol=1e-6)


class RematBlock(nn.Module):
    """The supported remat pattern: ``train`` positional in a block, marked static."""

    @nn.compact
    def __call__(self, x, train):
        return nn.relu(jaxbn.BatchNorm1d(C)(nn.Dense(C)(x), train=train))


class RematNet(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x, *, train: bool):
        block = nn.remat(RematBlock, static_argnums=(2,)) if self.remat else RematBlock
        return block(name="block")(x, train)


def test_remat_of_a_block_holding_batch_norm_equals_the_plain_block():
    plain, remat = RematNet(remat=False), RematNet(remat=True)
    variables = linen_builders.init(plain, X, seed=1, train=False)

    def loss(model, params):
        y, updates = model.apply(
            {**variables, "params": params}, X, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y**2), updates

    (l_plain, u_plain), g_plain = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(
        variables["params"]
    )
    (l_remat, u_remat), g_remat = jax.value_and_grad(lambda p: loss(remat, p), has_aux=True)(
        variables["params"]
    )
    np.testing.assert_allclose(l_remat, l_plain, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves((g_remat, u_remat)), jax.tree.leaves((g_plain, u_plain)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_of_batch_norm_itself_explains_the_supported_pattern():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.remat(jaxbn.BatchNorm1d)(C)(x, train=train)

    with pytest.raises(TypeError, match=r"nn.remat\(Block, static_argnums=\(2,\)\)"):
        Net().init(jax.random.key(0), X, train=True)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: jaxbn.BatchNorm1d(-3), RuntimeError, "negative dimension -3"),
        (lambda: jaxbn.BatchNorm2d(3.0), TypeError, "num_features must be an int"),
        (lambda: jaxbn.BatchNorm(axis=(1,)), TypeError, "axis must be an int"),
        (lambda: jaxbn.BatchNorm(axis=1.0), TypeError, "axis must be an int"),
        (lambda: jaxbn.BatchNorm(momentum="0.1"), TypeError, "momentum must be float or None"),
        (lambda: jaxbn.BatchNorm(eps="1e-5"), TypeError, "eps must be float"),
        (lambda: jaxbn.GroupNorm(-2, 4), ValueError, "num_groups must be positive"),
        (lambda: jaxbn.GroupNorm(3, 4), ValueError, r"num_channels \(4\) must be divisible"),
        (lambda: jaxbn.GroupNorm(2, 4, axis=(1,)), TypeError, "axis must be an int"),
        (lambda: jaxbn.LayerNorm(-1), RuntimeError, "negative dimension -1"),
        (lambda: jaxbn.LayerNorm(4, eps="x"), TypeError, "eps must be float"),
    ],
)
def test_constructor_arguments_are_validated_when_the_module_is_built(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_torch_words_the_negative_size_error_the_same_way():
    with pytest.raises(RuntimeError, match="Trying to create tensor with negative dimension -3"):
        torch.nn.BatchNorm1d(-3)


def test_concrete_jax_scalars_are_accepted_as_eps_momentum_and_train():
    model = jaxbn.BatchNorm1d(C, eps=jnp.float32(1e-3), momentum=jnp.float32(0.5))
    variables = model.init(jax.random.key(0), X, train=jnp.bool_(False))
    _, updates = model.apply(variables, X, train=jnp.bool_(True), mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.5 * X.mean(0), rtol=1e-6)


def test_training_a_synced_norm_outside_its_mapped_axis_names_the_axis():
    model = jaxbn.BatchNorm1d(C, axis_name="devices")
    variables = model.init(jax.random.key(0), X, train=True)  # init needs no axis
    with pytest.raises(NameError, match="axis_name='devices' in training, but no mapped axis"):
        model.apply(variables, X, train=True, mutable=["batch_stats"])
