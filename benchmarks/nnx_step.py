"""A jitted Flax NNX training step of the NNX MNIST tutorial's CNN with
``jaxbn.nnx.flax_compat.BatchNorm`` (the one-line switch) against ``flax.nnx.BatchNorm``.

Usage:
    python -m benchmarks.nnx_step              # the tutorial's CNN, 28×28×1, batch 32
    python -m benchmarks.nnx_step --quick      # tiny model and inputs, a smoke run

The CNN is the tutorial's (conv 32 → dropout → BN → ReLU → avg-pool, conv 64 → dropout → BN
→ ReLU → avg-pool, Linear 3136 → 256 → ReLU, Linear 256 → 10), built three times from the same
seed: with ``flax.nnx.BatchNorm``, with ``jaxbn.nnx.flax_compat.BatchNorm`` and without a norm.
The step is the tutorial's: ``nnx.value_and_grad`` of the cross entropy, ``nnx.Optimizer(adamw)``
update, under ``nnx.jit`` ("nnx.jit": what a tutorial user runs, NNX's Python graph handling
included) and as ``jax.jit`` of the split state ("jax.jit": the compiled step alone). One
process, same data, all cores, warm-up, the variants timed in turn within each round, medians.
It prints each step time and ``jaxbn/flax``, the compat class's time over Flax's (below 1:
jaxbn is faster), as the median of the ratios within a round.
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.timing import benchmark_main, block, interleaved_rounds, paired_ratio
from jaxbn.nnx import flax_compat

ROUNDS = 10


def tutorial_cnn(norm, widths=(32, 64), side=28, hidden=256):
    """The tutorial's CNN class with ``norm(features, rngs=)`` as its batch norm (None: none)."""

    class CNN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, widths[0], kernel_size=(3, 3), rngs=rngs)
            self.batch_norm1 = norm(widths[0], rngs=rngs) if norm else None
            self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
            self.conv2 = nnx.Conv(widths[0], widths[1], kernel_size=(3, 3), rngs=rngs)
            self.batch_norm2 = norm(widths[1], rngs=rngs) if norm else None
            self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear((side // 4) ** 2 * widths[1], hidden, rngs=rngs)
            self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
            self.linear2 = nnx.Linear(hidden, 10, rngs=rngs)

        def norm(self, module, x):
            return x if module is None else module(x)

        def __call__(self, x):
            x = self.norm(self.batch_norm1, self.dropout1(self.conv1(x)))
            x = self.avg_pool(nnx.relu(x))
            x = self.norm(self.batch_norm2, self.dropout2(self.conv2(x)))
            x = self.avg_pool(nnx.relu(x))
            x = x.reshape(x.shape[0], -1)  # flatten
            x = nnx.relu(self.linear1(x))
            return self.linear2(x)

    return CNN


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(model, optimizer, images, labels):
    """The tutorial's step: loss and gradients, then the optimizer's update, in place."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


def steps(cnn_class, images, labels) -> dict:
    """``{"nnx.jit": run, "jax.jit": run}``: one step each (on their own model copies)."""
    runs = {}
    model = cnn_class(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(0.005, 0.9), wrt=nnx.Param)
    model.train()
    nnx_step = nnx.jit(train_step)
    runs["nnx.jit"] = lambda model=model, optimizer=optimizer: block(
        nnx_step(model, optimizer, images, labels)
    )

    model = cnn_class(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(0.005, 0.9), wrt=nnx.Param)
    model.train()
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=0)
    def pure_step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        loss = train_step(model, optimizer, images, labels)
        return nnx.state((model, optimizer)), loss

    holder = {"state": state}

    def run_pure():
        holder["state"], loss = pure_step(holder["state"], images, labels)
        return block(loss)

    runs["jax.jit"] = run_pure
    return runs


def run(quick: bool, repeats: int) -> list[dict]:
    widths, side, hidden, batch = ((4, 8), 8, 16, 8) if quick else ((32, 64), 28, 256, 32)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, side, side, 1), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    variants = {
        "jaxbn": flax_compat.BatchNorm,
        "flax": nnx.BatchNorm,
        "none": None,
    }
    fns = {}
    for name, norm in variants.items():
        cnn = tutorial_cnn(norm, widths, side, hidden)
        for how, fn in steps(cnn, images, labels).items():
            fns[(name, how)] = fn
    per_round = interleaved_rounds(fns, repeats, 2 if quick else ROUNDS)
    rows = []
    for how in ("nnx.jit", "jax.jit"):
        times = {name: statistics.median(per_round[(name, how)]) for name in variants}
        rows.append(
            {
                "step": how,
                **{f"{name}_ms": t * 1e3 for name, t in times.items()},
                "ratio": paired_ratio(per_round[("jaxbn", how)], per_round[("flax", how)]),
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'step':<8} {'jaxbn compat ms':>16} {'flax.nnx BN ms':>15} {'no norm ms':>11} "
        f"{'jaxbn/flax':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['step']:<8} {r['jaxbn_ms']:>16.3f} {r['flax_ms']:>15.3f} {r['none_ms']:>11.3f} "
            f"{r['ratio']:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("python -m benchmarks.nnx_step", __doc__, run, format_rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
