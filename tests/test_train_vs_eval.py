"""Train vs eval, stated correctly (the tutorial gets the first point wrong, PyTorch agrees):

1. the same batch fed twice in training mode gives identical outputs (no dropout: nothing random);
2. in training an example's output depends on the other examples in its batch; in eval it does not.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

import jaxbn
from tests import linen_builders
from tests.torch_models import ConvNetWithBN

MODEL = jaxbn.models.ConvNet(widths=(4, 8, 8), hidden=8)
RNG = np.random.default_rng(0)  # numpy's: JAX's generator compiles for every shape
BATCH = jnp.asarray(RNG.standard_normal((16, 8, 8, 1)), jnp.float32)
OTHER_MATES = BATCH.at[1:].set(jnp.asarray(RNG.standard_normal((15, 8, 8, 1)) * 3, jnp.float32))


def trained():
    variables = linen_builders.init(MODEL, BATCH, seed=1, train=False)
    _, updates = MODEL.apply(variables, BATCH, train=True, mutable=["batch_stats"])
    return {**variables, **updates}


def train_out(variables, x):
    return MODEL.apply(variables, x, train=True, mutable=["batch_stats"])[0]


def test_the_same_batch_twice_in_training_mode_gives_identical_outputs_as_in_torch():
    variables = trained()
    np.testing.assert_array_equal(train_out(variables, BATCH), train_out(variables, BATCH))
    net = ConvNetWithBN(10, 1, 8, (4, 8, 8), 8).train()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # the tutorial prints "outputs differ: True"


def test_in_training_an_examples_output_depends_on_its_batch_mates():
    variables = trained()
    first = train_out(variables, BATCH)[0]
    assert float(jnp.max(jnp.abs(first - train_out(variables, OTHER_MATES)[0]))) > 1e-2


def test_in_eval_an_examples_output_does_not_depend_on_its_batch_mates():
    variables = trained()
    alone = MODEL.apply(variables, BATCH[:1], train=False)[0]
    np.testing.assert_allclose(MODEL.apply(variables, BATCH, train=False)[0], alone, atol=1e-6)
    np.testing.assert_allclose(
        MODEL.apply(variables, OTHER_MATES, train=False)[0], alone, atol=1e-6
    )
