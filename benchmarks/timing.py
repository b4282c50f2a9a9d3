"""Timing helpers shared by the benchmarks: warm-up, medians of repeats, copy bandwidth."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import torch


def same_threads() -> int:
    """PyTorch gets as many threads as XLA's CPU client uses (all cores)."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each ``fn()``, the contenders timed in turn within every repeat.

    This machine's speed drifts (other tenants, turbo, the allocator's state); timing each
    contender in its own block of repeats would fold that drift into the ratios. Interleaved,
    a slow spell hits every contender alike, and the order rotates so none always goes first.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def block(tree):
    return jax.block_until_ready(tree)


def copy_bandwidth(shape, dtype, repeats: int) -> float:
    """Bytes per second of an XLA elementwise pass (read + write) over an array of ``shape``.

    The pass runs in place (donated buffer): a fresh output buffer would add the cost of the
    allocator handing out new pages, which is not memory bandwidth (see the README's note).
    """
    scale = jax.jit(lambda a: a * 2, donate_argnums=0)
    holder = [jnp.ones(shape, dtype)]

    def one_pass():
        holder[0] = block(scale(holder[0]))

    seconds = median_seconds(one_pass, repeats)
    return 2 * holder[0].size * holder[0].dtype.itemsize / seconds


def benchmark_main(prog: str, description: str, run, format_rows, argv=None) -> int:
    """Shared ``main`` of the benchmark scripts: ``--quick``/``--repeats``, a header, the table.

    ``run(quick, repeats)`` measures and returns rows; ``format_rows(rows)`` makes the table.
    """
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (median)")
    args = parser.parse_args(argv)
    threads = same_threads()
    repeats = 3 if args.quick else args.repeats
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, {threads} threads, median of {repeats}"
    )
    print(format_rows(run(args.quick, repeats)))
    return 0
