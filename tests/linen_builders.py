"""Variables of linen models without JAX's random number generator, for tests where the initial
weights only need to be some weights: each initializer of ``model.init`` compiles JAX's hash for
its own shape, which costs seconds per model (more than the rest of a small test). The tree
(names, shapes, dtypes and init's key order) comes from ``jax.eval_shape`` of ``model.init``,
which computes nothing; the weights from numpy, like ``tests/nnx_builders.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def template(model, *args, **kwargs) -> dict[str, Any]:
    """``model.init(key, *args, **kwargs)``'s tree of ``jax.ShapeDtypeStruct`` leaves, keys in
    init's order (the model's order; ``jax.eval_shape`` alone returns them sorted)."""
    orders = []

    def run():
        variables = model.init(jax.random.key(0), *args, **kwargs)
        orders.append(_skeleton(variables))
        return variables

    shapes = jax.eval_shape(run)

    def reorder(skeleton: Mapping, tree: Mapping) -> dict:
        return {
            name: tree[name] if sub is None else reorder(sub, tree[name])
            for name, sub in skeleton.items()
        }

    return reorder(orders[0], shapes)


def init(model, *args, seed: int = 0, **kwargs) -> dict[str, Any]:
    """What ``model.init(jax.random.key(seed), *args, **kwargs)`` returns, in the same order,
    with kernels ~ N(0, 1/fan_in), norms at PyTorch's init (scale 1, bias 0, mean 0, var 1,
    counter 0), dense/conv biases ~ N(0, 0.1²) and any other leaf 0."""
    rng = np.random.default_rng(seed)

    def fill(tree: Mapping) -> dict:
        out = {}
        for name, shape in tree.items():
            if isinstance(shape, Mapping):
                out[name] = fill(shape)
                continue
            if name == "kernel":
                value = rng.normal(size=shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))
            elif name in ("scale", "var"):
                value = np.ones(shape.shape)
            elif name == "bias" and "kernel" in tree:
                value = rng.normal(size=shape.shape) * 0.1
            else:  # a norm's bias, mean, num_batches_tracked
                value = np.zeros(shape.shape)
            out[name] = jnp.asarray(value.astype(shape.dtype))
        return out

    return fill(template(model, *args, **kwargs))


def _skeleton(tree: Mapping) -> dict:
    return {k: _skeleton(v) if isinstance(v, Mapping) else None for k, v in tree.items()}
