"""Synced batch norm across 2 real processes × 2 CPU devices (jax.distributed, gloo) equals
torch's BatchNorm2d on the concatenated batch; failures end in bounded time with clear errors."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch

from jaxbn.multihost import _set_xla_flag_default, initialize_multihost
from tests.multihost_worker import STEPS, STUCK_TIMEOUT, C, global_batches
from tests.parity_report import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 2e-5
#: Time limits only stop a hung process; they are never speed checks. A worker here takes 5-15 s
#: and a 2-process training run of tests/test_multihost_training.py ~20 s on an idle machine
#: (2 cores); a loaded one (busy cores, xdist workers, other tests' processes) makes them several
#: times slower: 10x the training run. A stuck collective fails sooner, at COLLECTIVE_TIMEOUT.
HANG_LIMIT = 240
#: The workers' CPU collective timeout (XLA_FLAGS), below HANG_LIMIT so that a stuck collective
#: ends in an error naming it rather than in the test's kill.
COLLECTIVE_TIMEOUT = 120
WORKER_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=2 "
    f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: int, rank: int, out: pathlib.Path, mode: str = "") -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": WORKER_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    if mode == "stuck-collective":  # its own, short timeout (initialize_multihost's argument)
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_worker", str(port), str(rank), str(out), mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = HANG_LIMIT, started: float | None = None):
    """(exit code, stderr) of a worker that must end within ``timeout`` s of ``started`` (a
    time.monotonic(); default: now)."""
    left = timeout - (time.monotonic() - started if started is not None else 0)
    try:
        _, err = proc.communicate(timeout=max(left, 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"worker hung for {timeout} s; stderr:\n{err[-3000:]}") from None
    return proc.returncode, err


@pytest.fixture(scope="module", autouse=True)
def failures(tmp_path_factory):
    """The two failure cases, which mostly wait (on a coordinator that is not there, on a dead
    peer's heartbeats): started with the module's first test, so that they wait beside it."""
    tmp = tmp_path_factory.mktemp("failures")
    with socket.socket() as closed:  # bound, never listening: refuses, and no one else gets it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        started = time.monotonic()
        runs = {"unreachable": (port, start_worker(port, 1, tmp / "x.npz", "short-timeout"))}
        peers = free_port()
        runs["dead peer"] = (
            start_worker(peers, 0, tmp / "a.npz", "survivor"),
            start_worker(peers, 1, tmp / "b.npz", "die-after-init"),
            tmp / "a.npz",
        )
        stuck = free_port()
        runs["stuck collective"] = (
            start_worker(stuck, 0, tmp / "s0.npz", "stuck-collective"),
            start_worker(stuck, 1, tmp / "s1.npz", "stuck-collective"),
        )
        yield started, runs
        for proc in [runs["unreachable"][1], *runs["dead peer"][:2], *runs["stuck collective"]]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


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


def test_an_unreachable_coordinator_is_a_clear_error_not_a_hang(failures):
    started, runs = failures
    port, worker = runs["unreachable"]  # nobody listens on port
    code, err = finish(worker, started=started)
    assert code != 0
    assert f"could not reach the jax.distributed coordinator at 127.0.0.1:{port}" in err


def test_a_dead_peer_stops_the_survivor_with_an_error_instead_of_a_hang(failures):
    started, runs = failures
    survivor, dying, out = runs["dead peer"]
    assert finish(dying, started=started)[0] == 3
    code, err = finish(survivor, started=started)
    assert code != 0
    assert "stopped sending heartbeats" in err
    assert not out.exists()


def test_a_collective_whose_peer_never_comes_fails_naming_it_instead_of_a_hang(failures):
    started, runs = failures
    waiting, _ = runs["stuck collective"]
    code, err = finish(waiting, started=started)
    assert code != 0
    # gloo's words; the step's first collective is the batch norm statistics' all-reduce
    timeout_ms = STUCK_TIMEOUT * 1000
    assert re.search(rf"Gloo [\w-]+ failed: .*Timed out waiting {timeout_ms}ms", err), err[-3000:]


def test_an_explicit_collective_timeout_in_xla_flags_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_collective_timeout_seconds=7 --other")
    _set_xla_flag_default("xla_cpu_collective_timeout_seconds", 300)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_collective_timeout_seconds=7 --other"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    _set_xla_flag_default("xla_cpu_collective_timeout_seconds", 300)
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=2 --xla_cpu_collective_timeout_seconds=300"
    )


def ipv6_loopback_port() -> int | None:
    """A free port on ``::1``, or None where the machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def test_a_coordinator_at_an_ipv6_address_in_brackets_is_joined(tmp_path):
    port = ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback on this machine")
    procs = [start_worker(port, r, tmp_path / f"{r}.npz", "ipv6-join") for r in range(2)]
    for proc in procs:  # joined at [::1]:PORT and saw the 4 devices of both processes
        code, err = finish(proc)
        assert code == 0, err[-3000:]


def test_an_ipv6_host_without_brackets_is_refused_saying_how_to_write_it():
    with pytest.raises(ValueError) as error:
        initialize_multihost("::1:1234", 2, 1)
    assert str(error.value) == (
        "coordinator address must be HOST:PORT, got '::1:1234': write an IPv6 host in brackets, "
        "[::1]:1234"
    )


def test_joining_after_jax_has_computed_names_that_cause_not_the_network():
    jax.numpy.ones(2).block_until_ready()  # this process's backend is running
    address = f"127.0.0.1:{free_port()}"  # as process 1, with nobody listening there
    with pytest.raises(RuntimeError) as error:
        initialize_multihost(address, 2, 1, timeout_seconds=3)
    assert str(error.value) == (
        "initialize_multihost must be called before JAX computes anything in this process (any "
        "computation, jax.devices(), jax.device_put, ...): JAX's backend is already running, so "
        f"it cannot join the cluster at {address}. Call it first, right after importing jax"
    )
