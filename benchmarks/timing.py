"""Timing helpers shared by the benchmarks: interleaved medians of repeats, copy bandwidth."""

from __future__ import annotations

import os
import statistics
import sys
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


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_rounds(
    fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 5
) -> dict[str, list[float]]:
    """Per round, the median wall time of each ``fn()``; the contenders take turns each round.

    This machine's speed drifts (other tenants, turbo); timing each contender in one block
    would fold that drift into the ratios. So each round gives every contender, in rotating
    order, one untimed call (which also brings the memory allocator back to that contender's
    steady state — PyTorch and XLA share glibc's heap) and then its share of the timed repeats.
    """
    names = list(fns)
    per_round = max(1, -(-repeats // rounds))
    medians: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fns[name]()
            medians[name].append(statistics.median(_seconds(fns[name]) for _ in range(per_round)))
    return medians


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 5
) -> dict[str, float]:
    """Median over rounds of each contender's time (see :func:`interleaved_rounds`)."""
    per_round = interleaved_rounds(fns, repeats, rounds)
    return {name: statistics.median(times) for name, times in per_round.items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the ratio of two contenders' times measured in the same round.

    Pairing within a round cancels the drift between rounds, which on this machine is larger
    than the few percent a ratio like BN's overhead is about.
    """
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def block(tree):
    return jax.block_until_ready(tree)


def copy_bandwidth(shape, dtype, repeats: int) -> float:
    """Bytes per second of an XLA elementwise pass (read + write) over an array of ``shape``.

    The pass runs in place (donated buffer): a fresh output buffer would add the cost of the
    allocator handing out new pages, which is not memory bandwidth (see the README's note).
    The fastest of the repeats is taken: the bound is what the memory system can do, and on a
    shared machine noise only ever adds time.
    """
    scale = jax.jit(lambda a: a * 2, donate_argnums=0)
    holder = [jnp.ones(shape, dtype)]

    def one_pass():
        holder[0] = block(scale(holder[0]))

    one_pass()  # warm-up
    seconds = min(_seconds(one_pass) for _ in range(repeats))
    return 2 * holder[0].size * holder[0].dtype.itemsize / seconds


# glibc settings under which freed memory is reused instead of handed back to the OS: one
# arena, no mmap for big buffers, no trimming. Then a fresh output buffer costs no page faults.
STEADY_ALLOCATOR = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**32),
    "MALLOC_TRIM_THRESHOLD_": str(2**32),
    "MALLOC_TOP_PAD_": str(2**28),
}


def benchmark_main(prog: str, description: str, run, format_rows, argv=None) -> int:
    """Shared ``main`` of the benchmark scripts: flags, a header, the table.

    ``run(quick, repeats)`` measures and returns rows; ``format_rows(rows)`` makes the table.
    ``--steady-allocator`` re-runs the script in a new process with :data:`STEADY_ALLOCATOR`
    set (glibc reads them at start-up only).
    """
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median)")
    parser.add_argument(
        "--steady-allocator",
        action="store_true",
        help="run with glibc settings that reuse freed memory (no page faults per call)",
    )
    args = parser.parse_args(argv)
    steady = all(os.environ.get(k) == v for k, v in STEADY_ALLOCATOR.items())
    if args.steady_allocator and not steady:
        sys.stdout.flush()
        module = prog.split()[-1]
        os.execve(
            sys.executable,
            [sys.executable, "-m", module, *argv],
            {**os.environ, **STEADY_ALLOCATOR},
        )
    threads = same_threads()
    repeats = 3 if args.quick else args.repeats
    allocator = "steady (" + " ".join(f"{k}={v}" for k, v in STEADY_ALLOCATOR.items()) + ")"
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, {threads} threads, median of "
        f"{repeats}, allocator: {allocator if steady else 'glibc defaults'}"
    )
    print(format_rows(run(args.quick, repeats)))
    return 0
