"""Synced batch norm across 2 real processes × 2 CPU devices (jax.distributed, gloo) equals
torch's BatchNorm2d on the concatenated batch; failures end in bounded time with clear errors."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import torch

from tests.multihost_worker import STEPS, C, global_batches
from tests.parity_report import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: int, rank: int, out: pathlib.Path, mode: str = "") -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_worker", str(port), str(rank), str(out), mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker hung for {timeout} s; stderr:\n{err[-3000:]}") from None
    return proc.returncode, err


def test_two_processes_sync_like_one_batch_norm_on_the_concatenated_batch(tmp_path):
    port = free_port()
    outs = [tmp_path / f"rank{r}.npz" for r in range(2)]
    procs = [start_worker(port, r, outs[r]) for r in range(2)]
    for proc in procs:
        code, err = finish(proc)
        assert code == 0, err[-3000:]
    results = [np.load(o) for o in outs]

    tm = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.5, 2.0, C))
        tm.bias.copy_(torch.linspace(-1.0, 1.0, C))
    for i, (x, g) in enumerate(global_batches()):
        x_t = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
        tm.weight.grad = tm.bias.grad = None
        y_t = tm(x_t)
        (y_t * torch.tensor(np.moveaxis(g, -1, 1))).sum().backward()
        y = np.concatenate([r[f"y{i}"] for r in results])
        dx = np.concatenate([r[f"dx{i}"] for r in results])
        assert_close("multihost y", np.moveaxis(y, -1, 1), y_t.detach(), TOL, TOL)
        assert_close("multihost dx", np.moveaxis(dx, -1, 1), x_t.grad, TOL, TOL)
        for r in results:
            for device in range(2):
                assert_close("multihost dscale", r[f"dscale{i}"][device], tm.weight.grad, TOL, TOL)
                assert_close("multihost dbias", r[f"dbias{i}"][device], tm.bias.grad, TOL, TOL)
                assert_close(
                    "multihost running_mean", r[f"mean{i}"][device], tm.running_mean, TOL, TOL
                )
                assert_close(
                    "multihost running_var", r[f"var{i}"][device], tm.running_var, TOL, TOL
                )
                assert int(r[f"count{i}"][device]) == i + 1
    assert i == STEPS - 1


def test_an_unreachable_coordinator_is_a_clear_error_not_a_hang(tmp_path):
    port = free_port()  # nobody listens here
    code, err = finish(start_worker(port, 1, tmp_path / "x.npz", "short-timeout"), timeout=60)
    assert code != 0
    assert f"could not reach the jax.distributed coordinator at 127.0.0.1:{port}" in err


def test_a_dead_peer_stops_the_survivor_with_an_error_instead_of_a_hang(tmp_path):
    port = free_port()
    survivor = start_worker(port, 0, tmp_path / "a.npz")
    dying = start_worker(port, 1, tmp_path / "b.npz", "die-after-init")
    assert finish(dying, timeout=60)[0] == 3
    code, err = finish(survivor, timeout=90)
    assert code != 0
    assert "stopped sending heartbeats" in err
    assert not (tmp_path / "a.npz").exists()
