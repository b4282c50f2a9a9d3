"""SIGTERM (a scheduler's preemption notice) and SIGINT stop a run at a step boundary, save the
epoch in progress as a mid-epoch checkpoint, say so in one line and exit 143 / 130; ``--resume``
continues at the next step, bit for bit the uninterrupted run (issue 19). The signals are real
ones, sent by the process to itself from inside a chosen training step: deterministic, no race
with the training. Several processes: tests/test_multihost_training.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal

import numpy as np
import pytest
from jax.experimental import multihost_utils

from tests.workdir_checks import (
    assert_same_leaves,
    logged,
    saved,
    signal_at_step,
    without_time,
)
from train import evaluate, mlp
from train.checkpoint import Checkpoints, MidEpoch
from train.cli import parse_args
from train.files import WorkdirError
from train.loop import run

# digits: 1437 / 64 = 22 steps per epoch; --keep 1 shows that the mid-epoch checkpoint never
# displaces an epoch one
FLAGS = ["--use-bn", "--epochs", "2", "--batch-size", "64", "--schedule", "constant"]
STEPS = 22


def main(argv, *, signal_at=None, signum=signal.SIGTERM):
    """``python -m train.mlp argv`` in this process: (exit status, stdout, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        if signal_at is not None:
            signal_at_step(patch, signal_at, signum)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = mlp.main(argv)
    lines = [line for line in err.getvalue().splitlines() if "absl" not in line]
    return code, out.getvalue(), lines


def continuation(line: str) -> list[str]:
    """The flags of the command a stop line says to continue with."""
    command = shlex.split(line.split("; continue with: ")[1])
    assert command[:3] == ["python", "-m", "train.mlp"]
    return command[3:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "w"
    assert main([*FLAGS, "--workdir", str(workdir)])[0] == 0
    return workdir


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A run stopped by SIGTERM in epoch 2 (after step 8), continued and stopped again by SIGINT
    (after step 15), then continued to the end, each time with the command it printed; the
    workdir after the first stop is copied aside."""
    workdir = tmp_path_factory.mktemp("preempted") / "w"
    first = main([*FLAGS, "--workdir", str(workdir), "--keep", "1"], signal_at=STEPS + 8)
    snapshot = tmp_path_factory.mktemp("snapshot") / "w"
    shutil.copytree(workdir, snapshot)
    after_first = sorted(os.listdir(workdir / "checkpoints")), os.listdir(workdir / "mid-epoch")
    second = main(continuation(first[2][-1]), signal_at=7, signum=signal.SIGINT)
    after_second = os.listdir(workdir / "mid-epoch")
    third = main(continuation(second[2][-1]))
    return {
        "workdir": workdir,
        "snapshot": snapshot,
        "runs": (first, second, third),
        "after_first": after_first,
        "after_second": after_second,
    }


def test_sigterm_inside_an_epoch_saves_it_and_exits_143_with_one_line(preempted):
    workdir = preempted["workdir"]
    code, _, err = preempted["runs"][0]
    assert code == 143 and len(err) == 1
    assert err[0] == (
        f"stopped by SIGTERM at epoch 2, step 8/{STEPS}; saved: the checkpoint of epoch 2, "
        f"step 8 ({workdir}/mid-epoch/{STEPS + 8}); continue with: python -m train.mlp "
        f"{' '.join(FLAGS)} --workdir {workdir} --keep 1 --resume"
    )
    # --keep 1: the epoch checkpoint stays beside the mid-epoch one
    assert preempted["after_first"] == (["1"], [str(STEPS + 8)])
    assert [row["epoch"] for row in logged(preempted["snapshot"])] == [1]


def test_a_second_stop_in_the_same_epoch_replaces_the_mid_epoch_checkpoint(preempted):
    code, out, err = preempted["runs"][1]
    assert "at epoch 2, step 8/22 (a mid-epoch checkpoint)" in out
    assert code == 130 and len(err) == 1
    assert err[0].startswith(
        f"stopped by SIGINT at epoch 2, step 15/{STEPS}; saved: the checkpoint of epoch 2, "
        f"step 15 ({preempted['workdir']}/mid-epoch/{STEPS + 15}); continue with: "
    )
    assert preempted["after_second"] == [str(STEPS + 15)]


def test_the_continued_run_equals_the_uninterrupted_run_bit_for_bit(preempted, straight):
    workdir = preempted["workdir"]
    code, out, err = preempted["runs"][2]
    assert code == 0 and err == []
    assert f"resumed from {workdir} at epoch 2, step 15/22 (a mid-epoch checkpoint)" in out
    assert without_time(logged(workdir)) == without_time(logged(straight))
    assert [row["step"] for row in logged(workdir)] == [STEPS, 2 * STEPS]
    assert_same_leaves(saved(workdir, 2), saved(straight, 2))
    # the epoch checkpoint superseded the mid-epoch one; --keep 1 kept only the newest epoch
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert os.listdir(workdir / "checkpoints") == ["2"]


def test_a_stop_without_a_workdir_saves_nothing_and_says_so():
    code, _, err = main(["--use-bn", "--epochs", "1", "--batch-size", "64"], signal_at=3)
    assert (code, err) == (
        143,
        [f"stopped by SIGTERM at epoch 1, step 3/{STEPS}; nothing was saved (no --workdir)"],
    )


@pytest.mark.parametrize("sigints", [1, 2])
def test_after_a_sigterm_one_ctrl_c_keeps_the_stop_and_two_interrupt(
    tmp_path, monkeypatch, sigints
):
    real_kill = os.kill

    def sigterm_then_sigint(pid, signum):  # all arrive during the same step
        real_kill(pid, signum)
        if signum == signal.SIGTERM:
            for _ in range(sigints):
                real_kill(pid, signal.SIGINT)

    monkeypatch.setattr(os, "kill", sigterm_then_sigint)
    code, _, err = main([*FLAGS, "--workdir", str(tmp_path / "w")], signal_at=3)
    assert len(err) == 1
    if sigints == 1:  # the SIGTERM names the stop: preempted, for a scheduler to requeue
        assert code == 143
        assert err[0].startswith(f"stopped by SIGTERM at epoch 1, step 3/{STEPS}; saved: ")
    else:  # Ctrl-C twice stops at once, as without the SIGTERM
        assert code == 130
        assert err[0].startswith("interrupted; no checkpoint was saved yet; continue with: ")


def test_a_workdir_with_a_trailing_slash_is_named_with_one_slash(tmp_path):
    code, _, err = main([*FLAGS, "--workdir", f"{tmp_path / 'w'}/"], signal_at=3)
    assert code == 143 and len(err) == 1
    assert f"step 3 ({tmp_path / 'w'}/mid-epoch/3); continue with: " in err[0]


class SimulatedKillError(Exception):
    pass


def test_a_kill_during_the_mid_epoch_save_leaves_the_previous_checkpoint_usable(
    straight, tmp_path, monkeypatch
):
    def killed_save(self, mid, state, steps_per_epoch):
        # what a kill leaves: orbax's unfinished temporary directory, nothing renamed
        (self.mid_directory / f"{STEPS + 8}.orbax-checkpoint-tmp-1").mkdir(parents=True)
        raise SimulatedKillError

    flags = [*FLAGS, "--workdir", str(tmp_path)]
    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save_mid_epoch", killed_save)
        with pytest.raises(SimulatedKillError):
            main(flags, signal_at=STEPS + 8)
    code, out, _ = main([*flags, "--resume"])
    assert code == 0
    assert f"resumed from {tmp_path} after epoch 1" in out
    assert without_time(logged(tmp_path)) == without_time(logged(straight))
    assert_same_leaves(saved(tmp_path, 2), saved(straight, 2))
    assert not (tmp_path / "mid-epoch").exists()  # the leftover is gone with the directory


def test_a_corrupt_mid_epoch_checkpoint_is_skipped_for_the_epoch_before(
    preempted, straight, tmp_path
):
    workdir = tmp_path / "w"
    shutil.copytree(preempted["snapshot"], workdir)
    (workdir / "mid-epoch" / str(STEPS + 8) / "default" / "_METADATA").unlink()
    code, out, _ = main([*FLAGS, "--workdir", str(workdir), "--keep", "1", "--resume"])
    assert code == 0
    assert (
        "skipped the mid-epoch checkpoint of epoch 2, step 8 (default/_METADATA is missing)" in out
    )
    assert f"resumed from {workdir} after epoch 1" in out
    assert without_time(logged(workdir)) == without_time(logged(straight))
    assert_same_leaves(saved(workdir, 2), saved(straight, 2))
    assert (workdir / "rejected-checkpoints" / f"mid-epoch-{STEPS + 8}").is_dir()


def test_a_fresh_run_refuses_a_workdir_with_a_mid_epoch_checkpoint(preempted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(preempted["snapshot"], workdir)
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "metrics.jsonl").unlink()
    (workdir / "config.json").unlink()
    code, _, err = main([*FLAGS, "--workdir", str(workdir)])
    assert (code, err) == (
        2,
        [
            f"error: {workdir} already holds a run (a mid-epoch checkpoint: mid-epoch/"
            f"{STEPS + 8}): pass --resume to continue it, or choose another --workdir"
        ],
    )


def test_resume_with_fewer_epochs_than_the_stopped_one_says_so(preempted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(preempted["snapshot"], workdir)
    flags = [*FLAGS, "--workdir", str(workdir), "--resume", "--epochs", "1"]
    with pytest.raises(WorkdirError, match=r"--epochs 1 is below epoch 2, which the run in "):
        run(parse_args("test", "", mlp.DEFAULTS, flags), mlp.make_model, log=lambda _: None)


def test_checkpoint_saves_never_ask_the_preemption_sync_point(tmp_path, monkeypatch):
    # orbax's save(step) would ask it with the epoch number; the loop asks with global steps, so
    # a notice during an epoch save would set the sync point to a step the loop has passed
    asked = []
    monkeypatch.setattr(
        multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step)
    )
    checkpoints = Checkpoints(tmp_path)
    state = {"w": np.arange(3.0, dtype=np.float32)}
    losses = np.zeros(STEPS, np.float32)
    checkpoints.save_mid_epoch(MidEpoch(2, 8, losses, losses), state, STEPS)
    checkpoints.save(2, state)
    checkpoints.close()
    assert asked == []
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


def evaluate_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = evaluate.main(argv)
    return code, [line for line in err.getvalue().splitlines() if "absl" not in line]


def test_evaluate_leaves_a_checkpoint_being_written_alone(straight, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    in_progress = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1"  # a running run's save
    in_progress.mkdir()
    assert evaluate.evaluate_checkpoint(workdir)[0] == 2
    assert in_progress.is_dir()


def test_evaluate_a_run_with_only_a_mid_epoch_checkpoint_says_so(preempted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(preempted["snapshot"], workdir)
    shutil.rmtree(workdir / "checkpoints" / "1")
    assert evaluate_main(["--workdir", str(workdir)]) == (
        2,
        [
            f"error: {workdir} has no checkpoint of a finished epoch yet (only a mid-epoch "
            f"checkpoint, {workdir}/mid-epoch: resume the run to finish its epoch)"
        ],
    )


@pytest.mark.parametrize("text", ['{"norm": ', "[1]"])
def test_evaluate_with_a_corrupt_config_json_is_one_line(straight, tmp_path, text):
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    (workdir / "config.json").write_text(text)
    code, err = evaluate_main(["--workdir", str(workdir)])
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {workdir}/config.json is not a readable run configuration: ")


def test_a_config_json_with_a_value_of_the_wrong_type_is_named_not_called_a_change(
    straight, tmp_path
):
    # before: "these flags differ (saved -> now): --lr 0.1 -> 0.1"
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    config = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**config, "lr": "0.1"}))
    code, _, err = main([*FLAGS, "--workdir", str(workdir), "--resume"])
    assert (code, err) == (
        2,
        [
            f"error: {workdir}/config.json is not a readable run configuration: lr is '0.1', "
            "not of type float"
        ],
    )


def test_evaluate_a_corrupt_checkpoint_names_it_and_why(straight, tmp_path):
    # before: "error: pytree structure error: different types at key path"
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    (workdir / "checkpoints" / "2" / "default" / "_METADATA").unlink()
    assert evaluate_main(["--workdir", str(workdir)]) == (
        2,
        [
            f"error: the checkpoint of epoch 2 ({workdir}/checkpoints/2) cannot be restored: "
            "default/_METADATA is missing"
        ],
    )
