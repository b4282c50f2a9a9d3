"""A full training step: jaxbn models vs the same models with flax.linen.BatchNorm, without
normalization, and the PyTorch twins; plus XLA's temporary memory of the compiled step.

Usage:
    python -m benchmarks.train_step             # ConvNet and a small ResNet, 32×32×3 inputs
    python -m benchmarks.train_step --quick     # tiny models and inputs, a smoke run

One process, same data, all cores for XLA and PyTorch, warm-up then medians of repeats,
the variants timed in turn within each round. The step is forward + backward +
SGD-with-momentum update. "BN overhead" is the BN model's step time over the same model without
normalization: the median over rounds of the ratio within a round (the two are timed side by
side, so drift between rounds cancels). The flax.linen variant is the same jaxbn model given
``flax.linen.BatchNorm`` (momentum 0.9, eps 1e-5: PyTorch's defaults) as its ``norm`` factory.
"""

from __future__ import annotations

import functools
import statistics

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks.timing import benchmark_main, block, interleaved_rounds, paired_ratio
from jaxbn import models
from tests import torch_models


def train_flag_norm(factory):
    """A Flax-style norm factory (``use_running_average`` at call time) as a jaxbn models' norm
    factory: called as ``(num_features, name=...)``, its module as ``(x, train=...)``."""

    def make(num_features, *, name):
        del num_features  # Flax's norms take it from the input
        module = factory(name=name)
        return lambda x, *, train: module(x, use_running_average=not train)

    return make


# flax.linen.BatchNorm with the settings of jaxbn's default (PyTorch's momentum 0.1 and eps).
FLAX_BATCH_NORM = train_flag_norm(functools.partial(fnn.BatchNorm, momentum=0.9, epsilon=1e-5))
NORMS = {"jaxbn": "batch", "flax": FLAX_BATCH_NORM, "none": "none"}


def jax_step(model, x, y):
    """(run one step, temporary bytes of the compiled step)."""
    variables = model.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.01, momentum=0.9)
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "opt": tx.init(variables["params"]),
    }

    def step(state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates.get("batch_stats", {})

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats,
            "opt": opt,
        }, loss

    compiled = jax.jit(step, donate_argnums=0).lower(state, x, y).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    holder = {"state": state}

    def run():
        holder["state"], loss = compiled(holder["state"], x, y)
        block(loss)

    return run, temp


def torch_step(net, x_np, y_np):
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1)))
    y = torch.from_numpy(y_np.astype(np.int64))

    def run():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return run


ROUNDS = 10  # more rounds than the BN benchmark: the overhead is a ratio of a few percent


def configurations(quick: bool):
    if quick:
        conv = dict(widths=(4, 8, 8), hidden=8)
        res = dict(stage_sizes=(1, 1), widths=(4, 8))
        return (4, 8, 8, 3), conv, res
    conv = dict(widths=(64, 128, 256), hidden=512)
    res = dict(stage_sizes=(2, 2, 2), widths=(32, 64, 128))
    return (32, 32, 32, 3), conv, res


def run(quick: bool, repeats: int) -> list[dict]:
    shape, conv, res = configurations(quick)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape, np.float32)
    y_np = rng.integers(0, 10, shape[0]).astype(np.int32)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    side = shape[1]
    nets = {
        "ConvNet": (
            lambda norm: models.ConvNet(**conv, norm=norm),
            lambda: torch_models.ConvNetWithBN(10, 3, side, conv["widths"], conv["hidden"]),
        ),
        "ResNet": (
            lambda norm: models.ResNet(**res, norm=norm),
            lambda: torch_models.ResNet(res["stage_sizes"], res["widths"], 10, 3),
        ),
    }
    rows = []
    for name, (make, make_torch) in nets.items():
        steps, temps = {}, {}
        for variant in ("jaxbn", "flax", "none"):
            steps[variant], temps[variant] = jax_step(make(NORMS[variant]), x, y)
        steps["torch"] = torch_step(make_torch(), x_np, y_np)
        per_round = interleaved_rounds(steps, repeats, ROUNDS)
        timings = {name: statistics.median(times) for name, times in per_round.items()}
        for variant in ("jaxbn", "flax", "torch", "none"):
            rows.append(
                {
                    "model": name,
                    "variant": {"none": "no norm (jax)", "flax": "flax.linen BN"}.get(
                        variant, variant
                    ),
                    "ms": timings[variant] * 1e3,
                    "jaxbn_over": timings["jaxbn"] / timings[variant],
                    "temp_mb": temps.get(variant, float("nan")) / 2**20,
                }
            )
        rows.append(
            {
                "model": name,
                "overhead": paired_ratio(per_round["jaxbn"], per_round["none"]) - 1,
                "flax_overhead": paired_ratio(per_round["flax"], per_round["none"]) - 1,
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    header = f"{'model':<8} {'variant':<16} {'step ms':>9} {'jaxbn/this':>11} {'temp MB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "overhead" in r:
            lines.append(
                f"{r['model']:<8} BN overhead vs no norm: jaxbn {r['overhead']:+.1%}, "
                f"flax.linen {r['flax_overhead']:+.1%}"
            )
            continue
        temp = "-" if np.isnan(r["temp_mb"]) else f"{r['temp_mb']:.1f}"
        lines.append(
            f"{r['model']:<8} {r['variant']:<16} {r['ms']:>9.2f} {r['jaxbn_over']:>11.2f} {temp:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("python -m benchmarks.train_step", __doc__, run, format_rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
