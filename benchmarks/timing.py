"""Timing helpers shared by the benchmarks: interleaved medians of repeats, copy bandwidth."""

from __future__ import annotations

import argparse
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
    fns: dict[str, Callable[[], object]],
    repeats: int,
    rounds: int = 5,
    *,
    timers: dict[str, Callable[[Callable[[], object]], float]] | None = None,
) -> dict[str, list[float]]:
    """Per round, the median wall time of each ``fn()``; the contenders take turns each round.

    This machine's speed drifts (other tenants, turbo); timing each contender in one block
    would fold that drift into the ratios. So each round gives every contender, in rotating
    order, one untimed call (which also brings the memory allocator back to that contender's
    steady state — PyTorch and XLA share glibc's heap) and then its share of the timed repeats.

    ``timers[name](fn)`` measures one repeat of that contender in seconds per call (default:
    the wall time of one ``fn()``, which must then wait for its own result); see
    :func:`jax_timer` and :func:`torch_timer` for asynchronous devices.
    """
    names = list(fns)
    timers = timers or {}
    per_round = max(1, -(-repeats // rounds))
    medians: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fns[name]()
            timer = timers.get(name, _seconds)
            medians[name].append(statistics.median(timer(fns[name]) for _ in range(per_round)))
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


def jax_timer(calls: int) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of a JAX ``fn`` that returns without waiting (asynchronous dispatch):
    ``calls`` calls queued back to back, then one wait for the last result. Per-call waits
    would add the host's round trip to every call of a microsecond-scale kernel on a GPU."""

    def timer(fn: Callable[[], object]) -> float:
        block(fn())  # whatever was queued before is done, untimed
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        block(out)  # one device stream: the last result is ready after all the others
        return (time.perf_counter() - start) / calls

    return timer


def torch_device() -> torch.device:
    """CUDA when PyTorch has it (where a GPU is, the comparison is on the GPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` that returns only when its CUDA work is done (unchanged on the CPU), so that a
    wall-clock timer measures the work, not the launch."""
    if device.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return synced


def torch_timer(calls: int, device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of a PyTorch ``fn``, ``calls`` calls back to back: CUDA events on a
    GPU (the device's own clock; ``fn`` must not synchronize), the wall clock on the CPU."""
    if device.type != "cuda":
        return lambda fn: sum(_seconds(fn) for _ in range(calls)) / calls

    def timer(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls  # elapsed_time is in milliseconds

    return timer


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


def script_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A benchmark script's parser; ``--help`` keeps the docstring's usage lines as written."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def benchmark_main(
    prog: str,
    description: str,
    run,
    format_rows,
    argv=None,
    *,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Shared ``main`` of the benchmark scripts: flags, a header, the table.

    ``run(quick, repeats, **extra)`` measures and returns rows; ``format_rows(rows)`` makes the
    table. ``add_flags(parser)`` adds a script's own flags; their values reach ``run`` as the
    keywords ``extra`` and are named at the end of the header. ``--steady-allocator`` re-runs
    the script in a new process with :data:`STEADY_ALLOCATOR` set (glibc reads them at
    start-up only).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = script_parser(prog, description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median)")
    parser.add_argument(
        "--steady-allocator",
        action="store_true",
        help="run with glibc settings that reuse freed memory (no page faults per call)",
    )
    common = set(vars(parser.parse_args([])))
    if add_flags is not None:
        add_flags(parser)
    args = parser.parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in common}
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
    device = torch_device()
    on_gpu = ""
    if device.type == "cuda":
        on_gpu = f", jax on {jax.devices()[0].device_kind}, torch on {device}"
    flags = "".join(f", {k.replace('_', ' ')} {v}" for k, v in extra.items())
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, {threads} threads, median of "
        f"{repeats}, allocator: {allocator if steady else 'glibc defaults'}{on_gpu}{flags}"
    )
    print(format_rows(run(args.quick, repeats, **extra)))
    return 0
