"""Builds jaxbn.nnx models without JAX's random number generator (whose per-shape compiles
dominate a small test's time): the structure from ``nnx.eval_shape``, the weights from numpy."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxbn.nnx


def build(make: Callable[[], nnx.Module], seed: int = 0, dtype=None) -> nnx.Module:
    """``make()``'s model with kernels ~ N(0, 1/fan_in), norms at PyTorch's init (scale 1,
    bias 0, mean 0, var 1, counter 0) and dense/conv biases ~ N(0, 0.1²). ``dtype``: the float
    dtype of every float leaf (default: the model's)."""
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        dt = (
            shape.dtype if dtype is None or not jnp.issubdtype(shape.dtype, jnp.floating) else dtype
        )
        if name == "kernel":
            value = rng.normal(size=shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))
        elif name in ("scale", "var"):
            value = np.ones(shape.shape)
        elif name == "bias" and "kernel" not in parents[path[:-1]]:
            value = np.zeros(shape.shape)
        elif name == "bias":
            value = rng.normal(size=shape.shape) * 0.1
        else:  # mean, num_batches_tracked
            value = np.zeros(shape.shape)
        return jnp.asarray(value.astype(dt))

    variables = jaxbn.nnx.to_linen_variables(model)
    parents: dict = {}
    for collection in variables.values():
        for path, _ in jax.tree_util.tree_flatten_with_path(collection)[0]:
            parents.setdefault(path[:-1], set()).add(path[-1].key)
    filled = {
        name: jax.tree_util.tree_map_with_path(leaf, tree) for name, tree in variables.items()
    }
    return jaxbn.nnx.from_linen_variables(model, filled)
