"""The benchmark scripts run end to end on tiny shapes and print their tables (no timing is
asserted: speed lives in benchmarks/, not in tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import bn, timing, train_step


def test_the_bn_benchmark_prints_a_row_per_shape_dtype_and_mode(capsys):
    assert bn.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "fwd" in line and "x" in line.split()[0]]
    assert len(rows) == len(bn.QUICK_SHAPES) * 2 * 2  # shapes × dtypes × (fwd+bwd, fwd)
    assert "/flax" in out and "/torch" in out and "/bound" in out
    assert "allocator: glibc defaults" in out


def test_the_train_step_benchmark_compares_all_variants(capsys):
    assert train_step.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in ("ConvNet", "ResNet"):
        for variant in ("jaxbn", "flax.linen BN", "torch", "no norm (jax)"):
            assert any(line.startswith(name) and variant in line for line in out.splitlines())
    assert out.count("BN overhead vs no norm") == 2


def test_steady_allocator_reruns_the_script_with_glibc_settings():
    # glibc reads its settings at start-up, so the flag must re-run the script in a new process.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bn", "--quick", "--steady-allocator"],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
        capture_output=True,
        text=True,
        timeout=1200,  # stops a hang only: generous for a loaded machine
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = result.stdout.splitlines()[0]
    assert "allocator: steady (MALLOC_ARENA_MAX=1" in header
    assert len([line for line in result.stdout.splitlines() if " fwd" in line]) == 8


def test_a_scripts_own_flags_reach_its_run_and_are_named_in_the_header(capsys):
    seen = {}

    def run(quick, repeats, **extra):
        seen.update(quick=quick, repeats=repeats, **extra)
        return []

    argv = ["--quick", "--dtype", "bfloat16"]
    assert (
        timing.benchmark_main("p", "", run, lambda rows: "", argv, add_flags=train_step.add_flags)
        == 0
    )
    assert seen == {"quick": True, "repeats": 3, "dtype": "bfloat16"}
    assert capsys.readouterr().out.splitlines()[0].endswith(", dtype bfloat16")


def test_torch_on_the_cpu_is_timed_as_before_without_a_synchronizing_wrapper():
    def fn():
        return 1

    assert timing.torch_synced(fn, torch.device("cpu")) is fn
    assert timing.torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
