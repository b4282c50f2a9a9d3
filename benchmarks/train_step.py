"""A full training step: jaxbn models vs the same models with flax.linen.BatchNorm, without
normalization, and the PyTorch twins; plus XLA's temporary memory of the compiled step.

Usage:
    python -m benchmarks.train_step                    # ConvNet and a small ResNet, 32×32×3
    python -m benchmarks.train_step --dtype bfloat16   # bfloat16 activations (torch: autocast)
    python -m benchmarks.train_step --quick            # tiny models and inputs, a smoke run

One process, same data, all cores for XLA and PyTorch, warm-up then medians of repeats,
the variants timed in turn within each round. The step is ``train.step``'s (the one the
training loop runs): forward + backward + SGD-with-momentum update. "BN overhead" is the BN
model's step time over the same model without normalization: the median over rounds of the
ratio within a round (the two are timed side by side, so drift between rounds cancels). The
flax.linen variant is the same jaxbn model given ``flax.linen.BatchNorm`` (momentum 0.9, eps
1e-5: PyTorch's defaults; ``dtype`` the activations') as its ``norm`` factory. With
``--dtype bfloat16`` the JAX models compute in bfloat16 with float32 parameters (the training
scripts' ``--dtype``) and PyTorch runs under ``torch.autocast`` in bfloat16. Where PyTorch has
CUDA it runs there, synchronized after every step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks.timing import (
    benchmark_main,
    block,
    interleaved_rounds,
    paired_ratio,
    torch_device,
    torch_synced,
)
from jaxbn import models
from tests import torch_models
from train import step as steps


def train_flag_norm(factory):
    """A Flax-style norm factory (``use_running_average`` at call time) as a jaxbn models' norm
    factory: called as ``(num_features, name=...)``, its module as ``(x, train=...)``."""

    def make(num_features, *, name):
        del num_features  # Flax's norms take it from the input
        module = factory(name=name)
        return lambda x, *, train: module(x, use_running_average=not train)

    return make


def flax_batch_norm(dtype=None):
    """flax.linen.BatchNorm with the settings of jaxbn's default (PyTorch's momentum 0.1 and
    eps), computing in ``dtype`` (None: Flax's promotion, float32 for bfloat16 input)."""
    return train_flag_norm(
        functools.partial(fnn.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype)
    )


FLAX_BATCH_NORM = flax_batch_norm()
NORMS = {"jaxbn": "batch", "flax": FLAX_BATCH_NORM, "none": "none"}


def norms(dtype=None) -> dict:
    """The norm of each JAX variant for models computing in ``dtype``."""
    return {**NORMS, "flax": flax_batch_norm(dtype)} if dtype is not None else NORMS


def jax_step(model, x, y):
    """(run one step without waiting for it, temporary bytes of the compiled step).

    The step is :func:`train.step.train_step`; ``run()`` returns the step's metrics.
    """
    tx = optax.sgd(0.01, momentum=0.9)
    state = steps.init_state(model, tx, x)

    def step(state, x, y):
        new_state, metrics, _ = steps.train_step(model, tx)(state, x, y)
        return new_state, metrics

    compiled = jax.jit(step, donate_argnums=0).lower(state, x, y).compile()
    memory = compiled.memory_analysis()  # None where a backend does not report it
    temp = getattr(memory, "temp_size_in_bytes", math.nan)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], x, y)
        return metrics

    return run, temp


def torch_step(
    net,
    x_np,
    y_np,
    *,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
):
    """``run()``: one SGD-with-momentum step of ``net`` on the batch (NHWC ``x_np``), on
    ``device`` (default: the CPU), under ``torch.autocast`` when ``autocast_dtype`` is given,
    in the channels_last memory format when asked. ``run`` does not synchronize."""
    device = device or torch.device("cpu")
    net = net.to(device).train()
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1))).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(net, torch_models.ConvNetWithBN):
            # its forward flattens the features with .view(), which needs NCHW-contiguous memory
            net.features.register_forward_hook(lambda module, inputs, out: out.contiguous())
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    y = torch.from_numpy(y_np.astype(np.int64)).to(device)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def run():
        opt.zero_grad()
        with autocast():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
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


def model_pairs(conv: dict, res: dict, side: int, dtype=None) -> dict:
    """``{name: (make(norm) → the jaxbn model, make_torch() → its PyTorch twin)}`` for
    ``side × side × 3`` inputs and 10 classes; the JAX models compute in ``dtype``."""
    return {
        "ConvNet": (
            lambda norm: models.ConvNet(**conv, norm=norm, dtype=dtype),
            lambda: torch_models.ConvNetWithBN(10, 3, side, conv["widths"], conv["hidden"]),
        ),
        "ResNet": (
            lambda norm: models.ResNet(**res, norm=norm, dtype=dtype),
            lambda: torch_models.ResNet(res["stage_sizes"], res["widths"], 10, 3),
        ),
    }


def run(quick: bool, repeats: int, dtype: str = "float32") -> list[dict]:
    # imported here: benchmarks.gpu uses this module without the training loop's stack (orbax)
    from train.loop import DTYPES

    shape, conv, res = configurations(quick)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape, np.float32)
    y_np = rng.integers(0, 10, shape[0]).astype(np.int32)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    jdtype = DTYPES[dtype]
    autocast = {"float32": None, "bfloat16": torch.bfloat16}[dtype]
    device = torch_device()
    rows = []
    for name, (make, make_torch) in model_pairs(conv, res, shape[1], jdtype).items():
        fns, temps = {}, {}
        for variant, norm in norms(jdtype).items():
            run_step, temps[variant] = jax_step(make(norm), x, y)
            fns[variant] = lambda run_step=run_step: block(run_step())
        step = torch_step(make_torch(), x_np, y_np, device=device, autocast_dtype=autocast)
        fns["torch"] = torch_synced(step, device)
        fns = {k: fns[k] for k in ("jaxbn", "flax", "none", "torch")}  # the order timed before
        per_round = interleaved_rounds(fns, repeats, ROUNDS)
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


def add_flags(parser) -> None:
    from train.loop import DTYPES

    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="activations of the JAX models; PyTorch under autocast for bfloat16",
    )


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(
        "python -m benchmarks.train_step", __doc__, run, format_rows, argv, add_flags=add_flags
    )


if __name__ == "__main__":
    raise SystemExit(main())
