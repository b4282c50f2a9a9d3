"""A jitted Equinox training step of the tutorial's ConvNet (jaxbn.equinox.models.ConvNet, per
example inside ``jax.vmap(axis_name="batch")``) with jaxbn's BatchNorm against
``eqx.nn.BatchNorm`` (``mode="batch"``, and its default ``mode="ema"``) and without norms.

Usage:
    python -m benchmarks.equinox_step            # ConvNet 64-128-256, batch 32 of 32×32×3
    python -m benchmarks.equinox_step --quick    # tiny model and inputs, a smoke run

One process, same data and weights, warm-up, then the variants timed in turn within each round
(medians over rounds). The step: forward + backward + SGD, the state threaded through; the
model's arrays and the state go in and out of one ``jax.jit`` (the static rest closed over).
``jaxbn/this`` is jaxbn's step time over the variant's: above 1.0 jaxbn is slower. "BN overhead"
is each BN model's step over the no-norm model's, paired within rounds.
"""

from __future__ import annotations

import functools
import statistics

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.timing import benchmark_main, block, interleaved_rounds, paired_ratio
from jaxbn.equinox.models import ConvNet

ROUNDS = 10
LR = 0.01


class NoNorm(eqx.Module):
    """An empty norm slot with a stateful layer's call."""

    def __call__(self, x, state, *, key=None):
        del key
        return x, state


def norms() -> dict:
    """``{variant: (norm2d, norm1d) factories or None for jaxbn's default}``."""
    eqx_bn = lambda mode: functools.partial(eqx.nn.BatchNorm, axis_name="batch", mode=mode)
    none = lambda _: NoNorm()
    return {
        "jaxbn": (None, None),
        "eqx batch": (eqx_bn("batch"), eqx_bn("batch")),
        "eqx ema": (eqx_bn("ema"), eqx_bn("ema")),
        "none": (none, none),
    }


def make_step(model, state, x, y):
    """``run()`` → one jitted training step on ``(x, y)``, updating its own copies."""
    model = eqx.nn.inference_mode(model, False)
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def step(params, state, x, y):
        def loss(params):
            forward = jax.vmap(
                eqx.combine(params, static),
                axis_name="batch",
                in_axes=(0, None),
                out_axes=(0, None),
            )
            logits, new_state = forward(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

        grads, new_state = jax.grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), new_state

    held = [params, state]

    def run():
        held[0], held[1] = step(held[0], held[1], x, y)
        return held

    return run


def configuration(quick: bool):
    if quick:
        return (4, 3, 8, 8), dict(widths=(4, 8, 8), hidden=8)
    return (32, 3, 32, 32), dict(widths=(64, 128, 256), hidden=512)


def run(quick: bool, repeats: int) -> list[dict]:
    shape, conv = configuration(quick)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    y = jnp.asarray(rng.integers(0, 10, shape[0]).astype(np.int32))
    fns = {}
    for variant, (norm2d, norm1d) in norms().items():
        model, state = eqx.nn.make_with_state(ConvNet)(
            shape[1],
            **conv,
            num_classes=10,
            image_size=shape[2],
            key=jax.random.key(0),
            norm2d=norm2d,
            norm1d=norm1d,
        )
        step = make_step(model, state, x, y)
        fns[variant] = lambda step=step: block(step())
    per_round = interleaved_rounds(fns, repeats, ROUNDS)
    timings = {name: statistics.median(times) for name, times in per_round.items()}
    rows = [
        {
            "variant": variant,
            "ms": timings[variant] * 1e3,
            "jaxbn_over": paired_ratio(per_round["jaxbn"], per_round[variant]),
        }
        for variant in fns
    ]
    overheads = {v: paired_ratio(per_round[v], per_round["none"]) - 1 for v in fns if v != "none"}
    rows.append({"overhead": overheads})
    return rows


def format_rows(rows: list[dict]) -> str:
    header = f"{'ConvNet step':<14} {'ms':>9} {'jaxbn/this':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "overhead" in r:
            parts = ", ".join(f"{k} {v:+.1%}" for k, v in r["overhead"].items())
            lines.append(f"BN overhead vs no norm: {parts}")
            continue
        lines.append(f"{r['variant']:<14} {r['ms']:>9.2f} {r['jaxbn_over']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("python -m benchmarks.equinox_step", __doc__, run, format_rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
