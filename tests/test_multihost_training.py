"""`python -m train.mlp` across 2 processes × 2 CPU devices (jax.distributed) prints the same
epochs as one process with 4 devices: the data split, the BN sync and the sums are global."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.test_multihost import ROOT, free_port

FLAGS = ["--use-bn", "--epochs", "2", "--batch-size", "32"]


def epoch_lines(text: str) -> list[str]:
    """The per-epoch summary lines without their timing."""
    return [
        re.sub(r"\s+[\d.]+s$", "", line) for line in text.splitlines() if line.startswith("epoch")
    ]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train.mlp",
                *FLAGS,
                "--devices",
                "2",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(rank),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    single = subprocess.run(
        [sys.executable, "-m", "train.mlp", *FLAGS, "--devices", "4"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(epoch_lines(outputs[0])) == 2
    assert epoch_lines(outputs[0]) == epoch_lines(single.stdout)
    assert epoch_lines(outputs[1]) == []  # only process 0 reports
