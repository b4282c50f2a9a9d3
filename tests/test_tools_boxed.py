"""The tools on a model whose parameters carry Flax's sharding boxes (``nn.with_partitioning``,
or jaxbn's ``scale_metadata``): the same results as on the unboxed variables."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(
            4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "m"))
        )(x)
        bn = jaxbn.BatchNorm1d(
            4, scale_init=nn.with_partitioning(nn.initializers.ones, ("m",)), name="bn"
        )
        return bn(x, train=train)


def trained():
    x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, (8, 3)), jnp.float32)
    variables = Net().init(jax.random.key(0), x, train=False)
    _, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    boxed = {**variables, **updates}
    assert isinstance(boxed["params"]["bn"]["scale"], nn.Partitioned)  # the case under test
    return x, boxed, nn.meta.unbox(boxed)


def test_fold_folds_a_boxed_model_as_the_unboxed_one():
    x, boxed, plain = trained()
    result = jaxbn.fold_batch_norm(Net(), boxed, x)
    assert result.folded == {"bn": "Dense_0"} and result.left == {}
    expected = Net().apply(plain, x, train=False)
    np.testing.assert_allclose(
        result.model.apply(result.variables, x, train=False), expected, atol=1e-5
    )


def test_freeze_runs_a_boxed_model_as_the_unboxed_one():
    x, boxed, plain = trained()
    frozen_model, _ = jaxbn.freeze_batch_norm(Net(), boxed)
    got = frozen_model.apply(boxed, x, train=True)
    np.testing.assert_array_equal(got, Net().apply(plain, x, train=False))


def test_inspect_reads_a_boxed_model_as_the_unboxed_one():
    _, boxed, plain = trained()
    assert str(jaxbn.inspect_batchnorm(boxed)) == str(jaxbn.inspect_batchnorm(plain))
