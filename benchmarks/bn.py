"""Batch norm layer speed: jaxbn vs flax.linen.BatchNorm vs torch.nn.BatchNorm* (eager).

Usage:
    python -m benchmarks.bn                  # the full table (about a minute on 2 cores)
    python -m benchmarks.bn --quick          # tiny shapes, a smoke run

One process, same inputs, all cores for both XLA and PyTorch, warm-up then the median of
repeats, the three contenders timed in turn within each repeat. Training mode throughout (batch
statistics + running-statistics update); fwd+bwd returns the output y too, as a layer's output
is always used. Ratios < 1 mean jaxbn is faster.

"bound" is the memory-bandwidth bound: a fwd+bwd must move at least 8 tensor-sized passes
(forward: 1 read for the statistics, 1 read + 1 write for y; backward: 2 reads for Σdy and
Σdy·x̂, 2 reads + 1 write for dx), a fwd 3, timed at the measured in-place copy bandwidth. It
leaves out the cost of fresh output pages: with glibc, a buffer of 32 MiB or more is mapped
anew on every allocation, and faulting its pages in costs more than the traffic (see the
README); every contender pays it for y and dx. Where PyTorch has CUDA its layer runs there,
synchronized after every call.
"""

from __future__ import annotations

import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn
from benchmarks.timing import (
    benchmark_main,
    block,
    copy_bandwidth,
    interleaved_medians,
    torch_device,
    torch_synced,
)

FULL_SHAPES = [(128, 32, 32, 64), (64, 16, 16, 256), (4096, 1024)]
QUICK_SHAPES = [(8, 4, 4, 8), (32, 16)]
PASSES_FWD_BWD, PASSES_FWD = 8, 3


def bytes_moved(shape, dtype, passes: int = PASSES_FWD_BWD) -> int:
    """Bytes a batch norm must move: ``passes`` reads or writes of a tensor of ``shape`` and
    ``dtype`` (the per-channel statistics and parameters are negligible and left out)."""
    return passes * math.prod(shape) * np.dtype(dtype).itemsize


def jax_layer(kind: str, channels: int, dtype=None):
    """jaxbn.BatchNorm, or flax.linen.BatchNorm with PyTorch's momentum and eps; ``dtype``
    the output's (None: jaxbn's is the input's, Flax's the promotion of input and float32)."""
    if kind == "jaxbn":
        return jaxbn.BatchNorm(channels, dtype=dtype)
    return fnn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)


def jax_functions(kind, x, dtype=None):
    """``(variables, fwd_bwd, fwd)`` of one training call of the layer, jitted:
    ``fwd_bwd(params, x, g) → (y, (dparams, dx), updates)``, ``fwd(params, x) → (y, updates)``
    (``updates["batch_stats"]``: the running statistics after the call)."""
    layer = jax_layer(kind, x.shape[-1], dtype)
    variables = (
        layer.init(jax.random.key(0), x[:2])
        if kind == "flax"
        else layer.init(jax.random.key(0), x[:2], train=False)
    )
    kwargs = {} if kind == "flax" else {"train": True}

    def forward(params, x):
        y, updates = layer.apply(
            {**variables, "params": params}, x, mutable=["batch_stats"], **kwargs
        )
        return y, updates

    @jax.jit
    def fwd_bwd(params, x, g):
        # y is returned too: a layer's output is always used, and PyTorch computes it as well.
        (y, updates), vjp = jax.vjp(lambda p, x: forward(p, x), params, x)
        zeros = jax.tree.map(jnp.zeros_like, updates)
        return y, vjp((g.astype(y.dtype), zeros)), updates

    return variables, fwd_bwd, jax.jit(forward)


def jax_fns(kind, x, g):
    """Thunks (fwd+bwd, fwd) of one training call of the layer that wait for their results."""
    variables, fwd_bwd, fwd = jax_functions(kind, x)
    params = variables["params"]
    return (lambda: block(fwd_bwd(params, x, g))), (lambda: block(fwd(params, x)))


def torch_layer(x_np, g_np, dtype, *, device=None, channels_last: bool = False):
    """``(bn, x, g)``: a training-mode ``torch.nn.BatchNorm1d/2d`` (float32 parameters) and
    the NHWC / [N, C] numpy ``x_np``, ``g_np`` as torch tensors of ``dtype`` on ``device``
    (default: the CPU), channels-first, in the channels_last memory format when asked."""
    device = device or torch.device("cpu")
    channels = x_np.shape[-1]
    cls = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[x_np.ndim]
    bn = cls(channels).train().to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def to_torch(a):
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))).to(device, dtype)
        return t.contiguous(memory_format=fmt) if channels_last else t

    return bn, to_torch(x_np).requires_grad_(), to_torch(g_np)


def torch_closures(bn, x, g):
    """``(fwd_bwd, fwd)``, each returning ``y``; ``fwd_bwd`` leaves the gradients in ``x.grad``,
    ``bn.weight.grad``, ``bn.bias.grad``. Neither synchronizes a GPU."""

    def fwd_bwd():
        x.grad = None
        bn.weight.grad = bn.bias.grad = None
        y = bn(x)
        y.backward(g)
        return y

    def fwd():
        with torch.no_grad():
            return bn(x)

    return fwd_bwd, fwd


def torch_fns(x_np, g_np, dtype, device=None):
    """Thunks (fwd+bwd, fwd) of torch's layer on ``device`` that wait for their results."""
    device = device or torch.device("cpu")
    fwd_bwd, fwd = torch_closures(*torch_layer(x_np, g_np, dtype, device=device))
    return torch_synced(fwd_bwd, device), torch_synced(fwd, device)


def run(shapes, dtypes, repeats: int) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        for shape in shapes:
            rng = np.random.default_rng(0)
            x_np = rng.standard_normal(shape, np.float32) * 2 + 1
            g_np = rng.standard_normal(shape, np.float32)
            x, g = jnp.asarray(x_np, jdtype), jnp.asarray(g_np, jdtype)
            bandwidth = copy_bandwidth(shape, jdtype, repeats)
            fns = {kind: jax_fns(kind, x, g) for kind in ("jaxbn", "flax")}
            fns["torch"] = torch_fns(x_np, g_np, tdtype, torch_device())
            fwd_bwd = interleaved_medians({k: v[0] for k, v in fns.items()}, repeats)
            fwd = interleaved_medians({k: v[1] for k, v in fns.items()}, repeats)
            timings = {k: (fwd_bwd[k], fwd[k]) for k in fns}
            for mode, index, passes in (("fwd+bwd", 0, PASSES_FWD_BWD), ("fwd", 1, PASSES_FWD)):
                bound = bytes_moved(shape, jdtype, passes) / bandwidth
                mine = timings["jaxbn"][index]
                rows.append(
                    {
                        "shape": "x".join(map(str, shape)),
                        "dtype": dtype_name,
                        "mode": mode,
                        "jaxbn_ms": mine * 1e3,
                        "flax_ms": timings["flax"][index] * 1e3,
                        "torch_ms": timings["torch"][index] * 1e3,
                        "vs_flax": mine / timings["flax"][index],
                        "vs_torch": mine / timings["torch"][index],
                        "bound_ms": bound * 1e3,
                        "vs_bound": mine / bound,
                    }
                )
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'shape':<16} {'dtype':<8} {'mode':<7} {'jaxbn ms':>9} {'flax ms':>8} {'torch ms':>9}"
        f" {'/flax':>6} {'/torch':>7} {'bound ms':>9} {'/bound':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['shape']:<16} {r['dtype']:<8} {r['mode']:<7} {r['jaxbn_ms']:>9.2f}"
            f" {r['flax_ms']:>8.2f} {r['torch_ms']:>9.2f} {r['vs_flax']:>6.2f}"
            f" {r['vs_torch']:>7.2f} {r['bound_ms']:>9.2f} {r['vs_bound']:>7.2f}"
        )
    return "\n".join(lines)


def measure(quick: bool, repeats: int) -> list[dict]:
    return run(QUICK_SHAPES if quick else FULL_SHAPES, ["float32", "bfloat16"], repeats)


def main(argv: list[str] | None = None) -> int:
    return benchmark_main("python -m benchmarks.bn", __doc__, measure, format_rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
