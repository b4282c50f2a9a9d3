"""One training step of a Linen norm module on ``x`` with upstream gradient ``g``: its output,
the input and parameter gradients and the new ``batch_stats`` (what the PyTorch cross-checks
compare after ``y.backward(g)``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=0)
def bn_train_step(model, variables, x, g):
    """``(y, dx, dparams, new batch_stats)`` of ``sum(model(x) * g)``; ``model`` is static."""

    def loss(params, x):
        y, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y * g), (y, updates)

    (dparams, dx), (y, updates) = jax.grad(loss, (0, 1), has_aux=True)(variables["params"], x)
    return y, dx, dparams, updates["batch_stats"]
