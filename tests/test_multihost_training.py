"""`python -m train.mlp` across 2 processes × 2 CPU devices (jax.distributed): the same epochs
as one process with 4 devices; SIGTERM to both processes (what a scheduler sends before it
kills a job) stops them at one step with a mid-epoch checkpoint, and the continued run equals
the uninterrupted one bit for bit; a --workdir that is not one shared directory is refused on
every process, in bounded time."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_multihost import HANG_LIMIT, ROOT, WORKER_XLA_FLAGS, free_port
from train.parallel import Pacer

# 1437 // 32 = 44 steps per epoch, 4 epochs: a stop requested during step 5 is agreed on long
# before the end (after 2 to 30 steps here); the constant schedule makes the first 2 epochs those
# of a 2-epoch run
FLAGS = ["--use-bn", "--epochs", "4", "--batch-size", "32", "--schedule", "constant"]
STEPS = 44
ENV = {**os.environ, "XLA_FLAGS": WORKER_XLA_FLAGS}
TIMINGS = ("seconds", "examples_per_second")


def start_pair(workdirs, hook: str = "none", *flags: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run (tests/multihost_worker.py ``train-mlp HOOK``), each with
    its --workdir."""
    port = free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                *("-m", "tests.multihost_worker", "train-mlp", hook),
                *FLAGS,
                *("--devices", "2", "--coordinator", f"127.0.0.1:{port}"),
                *("--num-processes", "2", "--process-id", str(rank)),
                *("--workdir", str(workdir)),
                *flags,
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, workdir in enumerate(workdirs)
    ]


def finish(procs, timeout: float = HANG_LIMIT) -> list[tuple[int, str, list[str]]]:
    """``(exit status, stdout, stderr lines that are not JAX's or gloo's logs)`` per process;
    all of them killed, and the test failed with their stderr, if one runs past ``timeout`` s
    (the same deadline for all)."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            tails = []
            for other in procs:
                other.kill()
                tails.append(other.communicate()[1][-2000:])
            message = f"hung for {timeout} s; stderr:\n" + "\n---\n".join(tails)
            raise AssertionError(message) from None
        lines = [
            line
            for line in err.splitlines()
            if line.strip() and not re.match(r"[IWE]\d{4} |\[Gloo\]|WARNING:absl", line)
        ]
        results.append((proc.returncode, out, lines))
    return results


def epoch_lines(text: str) -> list[str]:
    """The per-epoch summary lines without their timing."""
    return [
        re.sub(r"\s+[\d.]+s$", "", line) for line in text.splitlines() if line.startswith("epoch")
    ]


def without_time(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def saved(workdir, epoch):
    """A checkpoint written by 4 devices of 2 processes, restored on one device here."""
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir, "checkpoints").absolute(),
        item_handlers=ocp.StandardCheckpointHandler(),
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(epoch),
    )
    state = manager.restore(epoch, args=ocp.args.StandardRestore(like))
    manager.close()
    return jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-process run in one shared workdir: (workdir, results)."""
    workdir = tmp_path_factory.mktemp("straight") / "w"
    results = finish(start_pair([workdir, workdir]))
    for code, _, err in results:
        assert code == 0, err[-20:]
    return workdir, results


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(straight):
    workdir, results = straight
    single = subprocess.run(
        [sys.executable, "-m", "train.mlp", *FLAGS, "--epochs", "2", "--devices", "4"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(epoch_lines(results[0][1])) == 4
    assert epoch_lines(results[0][1])[:2] == epoch_lines(single.stdout)
    assert epoch_lines(results[1][1]) == []  # only process 0 reports
    # the shared workdir passed the check, which leaves nothing behind
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "metrics.jsonl"]


@pytest.mark.slow
def test_sigterm_to_both_processes_stops_them_at_one_step_and_resume_equals_straight(
    straight, tmp_path
):
    workdir = tmp_path / "w"
    stopped = finish(start_pair([workdir, workdir], "sigterm-at-5"))
    lines = []
    for code, _, err in stopped:
        assert code == 143 and len(err) == 1, err
        lines.append(err[0])
    where = re.match(rf"stopped by SIGTERM at epoch (\d+), step (\d+)/{STEPS}; ", lines[0])
    assert where, lines[0]
    epoch, step = int(where[1]), int(where[2])
    global_step = (epoch - 1) * STEPS + step
    assert 5 <= global_step < 4 * STEPS
    if step:  # the usual case: inside an epoch
        kept = (
            f"saved: the checkpoint of epoch {epoch}, step {step} ({workdir}/mid-epoch/"
            f"{global_step})"
        )
        assert os.listdir(workdir / "mid-epoch") == [str(global_step)]
    else:  # agreed on exactly at an epoch's start: the epoch checkpoint is the state
        kept = f"kept: the checkpoint of epoch {epoch - 1} ({workdir}/checkpoints/{epoch - 1})"
    for rank, line in enumerate(lines):  # the same step on both, each its own command
        assert line.startswith(
            f"stopped by SIGTERM at epoch {epoch}, step {step}/{STEPS}; {kept}; continue with: "
            "python -m train.mlp "
        )
        assert line.endswith(f" --process-id {rank} --workdir {workdir} --resume")
    commands = [shlex.split(line.split("; continue with: ")[1]) for line in lines]
    continued = [
        subprocess.Popen(
            [sys.executable, *command[1:]],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = finish(continued)
    for code, _, err in results:
        assert code == 0, err[-20:]
    if step:
        assert f"at epoch {epoch}, step {step}/{STEPS} (a mid-epoch checkpoint)" in results[0][1]
    assert without_time(workdir) == without_time(straight[0])
    leaves = zip(
        jax.tree.leaves(saved(workdir, 4)), jax.tree.leaves(saved(straight[0], 4)), strict=True
    )
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)
    assert not (workdir / "mid-epoch").exists()


@pytest.mark.slow
def test_a_workdir_per_process_is_refused_on_every_process_in_bounded_time(tmp_path):
    workdirs = [tmp_path / "p0", tmp_path / "p1"]
    results = finish(start_pair(workdirs, "none", "--join-timeout", "3"), timeout=HANG_LIMIT)
    for rank, (code, out, err) in enumerate(results):
        assert code == 2 and len(err) == 1, err
        assert err[0] == (
            f"error: --workdir {workdirs[rank]} is not one filesystem shared by all processes: "
            "process(es) 1 did not see the file process 0 wrote there within 3 s "
            "(--join-timeout); every process writes its part of each checkpoint, so a "
            "multi-process run needs a --workdir on a filesystem they all share"
        )
        assert "epoch" not in out
    assert os.listdir(workdirs[0]) == os.listdir(workdirs[1]) == []  # nothing written


def test_an_active_pacer_waits_for_the_outputs_of_the_step_a_window_earlier(monkeypatch):
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", waited.append)
    pace = Pacer(2, active=True)
    for step in range(5):
        pace(f"outputs {step}")
    assert waited == ["outputs 0", "outputs 1", "outputs 2"]


def test_an_inactive_pacer_never_waits(monkeypatch):
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", waited.append)
    pace = Pacer(2, active=False)
    for step in range(5):
        pace(step)
    assert waited == []


def test_cpu_runs_over_several_devices_are_paced_and_one_device_runs_are_not():
    # one process over several CPU devices starves like several processes (an aborted
    # rendezvous under load); one device has no collective to starve
    from train.parallel import DataParallel

    assert DataParallel(4).pacer().active
    assert not DataParallel(1).pacer().active
