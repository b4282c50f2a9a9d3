"""``python -m benchmarks.gpu`` without a GPU: one line says so, then the correctness check and
both tables run on tiny shapes through the code the GPU run uses (no timing is asserted).
Plus the arithmetic of the bandwidth bound and the refusal of a failed check."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from benchmarks import bn, gpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run() -> subprocess.CompletedProcess:
    # Hide any GPU from both frameworks, so that this is the CPU path on every machine; XLA's
    # backend optimizations off: the tiny steps compile in about half the time, same code path.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "XLA_FLAGS": flags}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # stops a hang only: generous for a loaded machine
    )


@pytest.mark.slow  # one real run of the script: about 40 s on 2 cores
def test_without_a_gpu_the_script_says_so_and_exits_0(smoke_run):
    assert smoke_run.returncode == 0, smoke_run.stderr[-3000:]
    first = smoke_run.stdout.splitlines()[0]
    assert first.startswith("no GPU found (jax: cpu, torch.cuda.is_available(): False)")
    assert "smoke run" in smoke_run.stdout.splitlines()[1]


@pytest.mark.slow
def test_the_smoke_run_passes_the_correctness_check_and_prints_its_differences(smoke_run):
    out = smoke_run.stdout
    assert "correctness check passed" in out
    number = r"\d\.\de[+-]\d\d"
    rows = [
        line
        for line in out.splitlines()
        if re.fullmatch(rf"\S+\s+(float32|bfloat16)(\s+{number}){{6}}\s+ok", line)
    ]
    assert len(rows) == len(gpu.SMOKE.check_shapes) * len(gpu.DTYPES)


@pytest.mark.slow
def test_the_smoke_run_prints_every_row_of_both_tables(smoke_run):
    _, bn_part = smoke_run.stdout.split("\n2. batch norm")
    bn_part, step_part = bn_part.split("\n3. training step")
    for dtype in gpu.DTYPES:
        for shape in gpu.SMOKE.bn_shapes:
            name = "x".join(map(str, shape))
            (row,) = [line for line in bn_part.splitlines() if line.split()[:2] == [name, dtype]]
            cells = row.split()[2:]
            # jaxbn, flax, torch, torch channels_last (4-D only), bound; then 4 ratios
            assert len(cells) == 9 and (cells[3] == "-") == (len(shape) != 4)
            assert all(math.isfinite(float(c)) for c in cells if c != "-")
    for model in gpu.SMOKE.model_names:
        for batch in gpu.SMOKE.batches:
            (row,) = [
                line for line in step_part.splitlines() if line.split()[:2] == [model, str(batch)]
            ]
            cells = row.split()[2:]  # images/s of jaxbn, flax, torch; two time ratios
            assert len(cells) == 5 and all(math.isfinite(float(c)) for c in cells)


def test_the_bandwidth_bound_counts_eight_passes_of_the_activation():
    # 256·56·56·64 bfloat16 values of 2 bytes, read or written 8 times
    assert bn.bytes_moved((256, 56, 56, 64), jnp.bfloat16) == 8 * 51_380_224 * 2 == 822_083_584
    assert bn.bytes_moved((4096, 1024), jnp.float32, bn.PASSES_FWD) == 3 * 4096 * 1024 * 4
    # 4096·1024 float32: 134,217,728 bytes at 1 TB/s take 134.2 µs
    assert gpu.bound_microseconds((4096, 1024), jnp.float32, 1e12) == pytest.approx(134.217728)


def test_a_difference_beyond_the_tolerance_fails_the_run_with_status_1(monkeypatch, capsys):
    strict = {d: {**t, "var": 0.0} for d, t in gpu.TOLERANCES.items()}
    monkeypatch.setattr(gpu, "TOLERANCES", strict)
    monkeypatch.setattr(gpu, "SMOKE", dataclasses.replace(gpu.SMOKE, check_shapes=((16, 8),)))
    assert gpu.main(["--smoke"]) == 1
    out = capsys.readouterr().out
    assert "FAIL (var)" in out and "correctness check FAILED" in out
    assert "2. batch norm" not in out  # no timing of a wrong implementation


def test_the_tables_leave_the_torch_columns_empty_when_torch_has_no_gpu():
    bn_rows = [
        {"shape": "8x8", "dtype": "float32", "us": {"jaxbn": 2.0, "flax": 4.0, "bound": 1.0}}
    ]
    (row,) = gpu.format_bn(bn_rows).splitlines()[2:]
    assert row.split() == [
        "8x8",
        "float32",
        "2.0",
        "4.0",
        "-",
        "-",
        "1.0",
        "0.50",
        "-",
        "-",
        "2.00",
    ]
    step_rows = [{"model": "ConvNet", "batch": 128, "seconds": {"jaxbn": 0.5, "flax": 1.0}}]
    (row,) = gpu.format_steps(step_rows).splitlines()[2:]
    # images/s: jaxbn, flax, torch; jaxbn's time / flax's, torch's
    assert row.split() == ["ConvNet", "128", "256", "128", "-", "0.50", "-"]
