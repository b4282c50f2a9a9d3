"""A training run never loses, corrupts or silently changes its data: killed saves, reused
workdirs, full disks, corrupt checkpoints, diverged states, changed flags, one-line errors and
honest compare statuses (issue "Trust II"). Tiny data; resumed runs are compared with straight
runs bit for bit."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.tiny_digits import tiny
from tests.workdir_checks import assert_same_leaves, logged, saved, without_time
from train import cnn, compare, mlp
from train.checkpoint import Checkpoints, MetricsLog
from train.cli import parse_args
from train.datasets import Dataset
from train.files import WorkdirError
from train.loop import TrainingDivergedError, run
from train.parallel import DataParallel
from train.plot import draw_comparison

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 3 steps per epoch; the constant schedule lets a run be extended (see train/config.py)
FLAGS = ["--norm", "batch", "--batch-size", "32", "--schedule", "constant"]


def train(workdir, *flags, epochs=3, script=mlp, data=None, log=lambda _: None):
    """``script`` on tiny data with FLAGS, ``--epochs epochs --workdir workdir`` and ``flags``
    (later flags win)."""
    argv = [*FLAGS, "--epochs", str(epochs), "--workdir", str(workdir), *flags]
    args = parse_args("test", "", script.DEFAULTS, argv)
    return run(args, script.make_model, data=data or tiny(), log=log)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A straight 3-epoch run: its workdir (checkpoints of epochs 2 and 3) and its result."""
    workdir = tmp_path_factory.mktemp("straight") / "w"
    return workdir, train(workdir)


@pytest.fixture
def copy_of_straight(straight, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(straight[0], workdir)
    return workdir


def cli(script, argv, capsys):
    """Runs a script's main in-process; returns (exit status, stdout, stderr lines)."""
    code = script.main(argv)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if not line.startswith("WARNING:absl")]


# 1. a kill during the first checkpoint save ------------------------------------------------


class SimulatedKillError(Exception):
    pass


def test_a_crash_during_the_first_save_resumes_like_a_straight_run(straight, tmp_path, monkeypatch):
    real_save = Checkpoints.save

    def save(self, epoch, state):
        if epoch == 1:  # what a kill leaves: orbax's unfinished temporary directory
            (self.directory / "1.orbax-checkpoint-tmp").mkdir(parents=True)
            raise SimulatedKillError
        real_save(self, epoch, state)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save", save)
        with pytest.raises(SimulatedKillError):
            train(tmp_path)
    assert [row["epoch"] for row in logged(tmp_path)] == [1]  # the row of the unsaved epoch
    lines = []
    resumed = train(tmp_path, "--resume", log=lines.append)
    assert "dropped 1 metrics row(s) of epochs without a checkpoint" in lines
    assert f"no checkpoint in {tmp_path}: starting from scratch" in lines
    assert [row["epoch"] for row in logged(tmp_path)] == [1, 2, 3]
    assert without_time(logged(tmp_path)) == without_time(straight[1].history)
    assert_same_leaves(resumed.variables, straight[1].variables)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]  # no temporary left


SUBPROCESS_FLAGS = ["--use-bn", "--epochs", "2", "--batch-size", "256"]


@pytest.mark.slow
def test_a_process_killed_during_its_first_save_resumes_bit_for_bit(tmp_path, capsys):
    # a real process, SIGKILLed once its epoch-1 checkpoint is written but not yet renamed into
    # place (tests/multihost_worker.py); the continuation and the reference run in this process
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    flags = [*SUBPROCESS_FLAGS, "--workdir", str(killed)]
    done = subprocess.run(
        [sys.executable, "-m", "tests.multihost_worker", "train-mlp", "kill-in-save-1", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,  # stops a hang only: generous for a loaded machine
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (leftover,) = os.listdir(killed / "checkpoints")
    assert leftover.startswith("1.orbax-checkpoint-tmp")  # killed during the save, not after
    assert [row["epoch"] for row in logged(killed)] == [1]  # the row was written first
    assert mlp.main([*flags, "--resume"]) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert mlp.main([*SUBPROCESS_FLAGS, "--workdir", str(straight)]) == 0
    assert [row["epoch"] for row in logged(killed)] == [1, 2]
    assert without_time(logged(killed)) == without_time(logged(straight))
    assert_same_leaves(saved(killed, 2), saved(straight, 2))
    assert sorted(os.listdir(killed / "checkpoints")) == ["1", "2"]  # no temporary left


# 2. a fresh run never adds to another run's files -------------------------------------------


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "config.json"])
def test_a_fresh_run_refuses_a_workdir_that_holds_another_runs_files(tmp_path, leftover):
    (tmp_path / leftover).write_text('{"epoch": 1, "train_loss": 9.0}\n')
    with pytest.raises(WorkdirError, match=rf"already holds a run \({leftover}\): pass --resume"):
        train(tmp_path)
    assert (tmp_path / leftover).read_text() == '{"epoch": 1, "train_loss": 9.0}\n'


# 3. full disks and unreadable metrics -------------------------------------------------------


def test_a_full_disk_during_the_metrics_write_leaves_the_log_whole(straight, tmp_path, monkeypatch):
    real_open, calls = open, []

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and pathlib.Path(path).name == ".metrics.jsonl.tmp":
            calls.append(path)
            if len(calls) == 2:  # epoch 2: half a line fits, then the disk is full
                real_write = f.write

                def write(text):
                    real_write(text[: len(text) // 2])
                    f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                f.write = write
        return f

    with monkeypatch.context() as patch:
        patch.setattr("train.files.open", open_on_a_full_disk, raising=False)
        with pytest.raises(
            WorkdirError, match=r"could not write .*metrics\.jsonl: No space left on device$"
        ):
            train(tmp_path)
    assert [row["epoch"] for row in logged(tmp_path)] == [1]
    assert not (tmp_path / ".metrics.jsonl.tmp").exists()
    resumed = train(tmp_path, "--resume")
    assert without_time(logged(tmp_path)) == without_time(straight[1].history)
    assert_same_leaves(resumed.variables, straight[1].variables)


def mount_tmpfs(path: pathlib.Path, options: str):
    path.mkdir(exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); the in-process ENOSPC test covers it")
    if done.returncode:
        pytest.skip(
            "mounting a tmpfs needs root with CAP_SYS_ADMIN "
            f"({done.stderr.decode().strip()}); the in-process ENOSPC test covers it"
        )


@pytest.fixture
def small_filesystem(tmp_path):
    mount = tmp_path / "fs"
    mount_tmpfs(mount, "size=64k")
    yield mount
    subprocess.run(["umount", str(mount)], check=False, timeout=120)


def test_a_metrics_append_on_a_really_full_filesystem_keeps_the_old_log(small_filesystem):
    log = MetricsLog(small_filesystem)
    row = {"epoch": 10, "train_loss": 0.5, "note": "x" * 100}
    # fill the log to just below a page (4 KiB), so that one more line straddles the page end
    count = 4096 // len(json.dumps(row) + "\n")
    rows = [{**row, "epoch": e} for e in range(10, 10 + count)]
    log.rewrite(rows)
    before = log.path.read_bytes()
    # unbuffered: the write that fails is the one that raises, closing flushes nothing
    filler = small_filesystem / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 1024)
    with pytest.raises(WorkdirError, match="No space left on device"):
        log.append({**row, "epoch": 10 + count})
    assert log.path.read_bytes() == before
    assert log.read() == rows


def test_a_corrupt_metrics_line_is_reported_with_its_file_and_line(copy_of_straight):
    path = copy_of_straight / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:3] + "\n")  # a torn line, as old versions left
    with pytest.raises(WorkdirError, match=rf"^{path}, line 2: Unterminated string starting at"):
        train(copy_of_straight, "--resume")


# 4. a corrupt newest checkpoint --------------------------------------------------------------


def delete_metadata(step: pathlib.Path) -> None:
    (step / "default" / "_METADATA").unlink()


def truncate_data(step: pathlib.Path) -> None:
    for f in (step / "default" / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:10])


def empty_directory(step: pathlib.Path) -> None:
    shutil.rmtree(step)
    step.mkdir()


def save_nan_params(step: pathlib.Path) -> None:
    """What the old divergence guard saved: parameters that are not finite."""
    state = saved(step.parent.parent, int(step.name))
    state["params"]["layers_0"]["kernel"][0, 0] = np.nan
    shutil.rmtree(step)
    manager = ocp.CheckpointManager(step.parent)
    manager.save(int(step.name), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (delete_metadata, r"default/_METADATA is missing"),
        (truncate_data, r"Exception: Encountered error while reading array"),
        (empty_directory, r"its directory is empty"),
        (save_nan_params, r"NaN/Inf in params/layers_0/kernel"),
    ],
    ids=["no-metadata", "truncated-data", "empty-directory", "nan-params"],
)
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_previous_one_resumes(
    straight, copy_of_straight, corrupt, reason
):
    corrupt(copy_of_straight / "checkpoints" / "3")
    lines = []
    resumed = train(copy_of_straight, "--resume", log=lines.append)
    assert any(
        re.fullmatch(rf"skipped the checkpoint of epoch 3 \({reason}.*\)", line) for line in lines
    ), lines
    assert f"resumed from {copy_of_straight} after epoch 2" in lines
    assert_same_leaves(resumed.variables, straight[1].variables)
    assert without_time(logged(copy_of_straight)) == without_time(straight[1].history)
    assert (copy_of_straight / "rejected-checkpoints" / "3").is_dir()  # kept for a post-mortem


def test_when_no_checkpoint_restores_resume_names_each_and_moves_nothing(copy_of_straight):
    for epoch in (2, 3):
        delete_metadata(copy_of_straight / "checkpoints" / str(epoch))
    with pytest.raises(
        WorkdirError,
        match=r"no checkpoint in .* can be restored: epoch 3: default/_METADATA is missing; "
        r"epoch 2: default/_METADATA is missing$",
    ):
        train(copy_of_straight, "--resume")
    assert sorted(os.listdir(copy_of_straight / "checkpoints")) == ["2", "3"]


# 5. the divergence guard never saves a non-finite state --------------------------------------


def test_an_epoch_with_a_non_finite_test_loss_is_neither_saved_nor_logged(tmp_path, monkeypatch):
    real_save, real_eval_step, poisoned = Checkpoints.save, DataParallel.eval_step, []

    def save_then_poison(self, epoch, state):
        real_save(self, epoch, state)
        poisoned.append(True)  # from epoch 2 on, the evaluation overflows; training does not

    def eval_step(self, model):
        step = real_eval_step(self, model)
        return lambda state, x, y, m: step(state, x * np.inf if poisoned else x, y, m)

    monkeypatch.setattr(Checkpoints, "save", save_then_poison)
    monkeypatch.setattr(DataParallel, "eval_step", eval_step)
    with pytest.raises(
        TrainingDivergedError,
        match=r"^epoch 2 ended with test loss nan: training diverged \(try a lower --lr\); "
        rf"kept: the checkpoint of epoch 1 \({tmp_path}/checkpoints/1, the newest; every saved "
        r"checkpoint is finite\) and the metrics of epochs 1-1$",
    ):
        train(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert [row["epoch"] for row in logged(tmp_path)] == [1]


def test_an_epoch_that_ends_with_infinite_parameters_is_not_saved(tmp_path, monkeypatch):
    real_train_step = DataParallel.train_step

    def train_step(self, model, tx, batch_size):
        step, calls = real_train_step(self, model, tx, batch_size), []

        def overflowing(state, x, y):
            state, metrics = step(state, x, y)
            calls.append(1)
            if len(calls) == 3:  # the last step of epoch 1: the loss was finite, the update not
                params = jax.tree.map(lambda p: p * np.inf, state["params"])
                state = {**state, "params": params}
            return state, metrics

        return overflowing

    monkeypatch.setattr(DataParallel, "train_step", train_step)
    with pytest.raises(
        TrainingDivergedError,
        match=r"^epoch 1 ended with NaN/Inf in params/.* more\): training diverged .*; no "
        rf"checkpoint was saved in {tmp_path} \(no epoch finished with finite values\)$",
    ):
        train(tmp_path)
    assert not os.listdir(tmp_path / "checkpoints")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_run_that_diverges_at_once_says_that_no_checkpoint_exists(tmp_path):
    with pytest.raises(
        TrainingDivergedError,
        match=r"^(loss became \S+ at epoch 1, step \d+|epoch 1 ended with .*): training diverged "
        rf"\(try a lower --lr\); no checkpoint was saved in {tmp_path} \(",
    ):
        train(tmp_path, "--lr", "1e6")
    assert not os.listdir(tmp_path / "checkpoints")


# 6. --resume continues the same run or refuses ----------------------------------------------


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cosine") / "w"
    train(workdir, "--schedule", "cosine", epochs=1)
    return workdir


@pytest.mark.parametrize(
    "flags,change",
    [
        (["--lr", "0.5"], "--lr 0.1 -> 0.5"),
        (["--schedule", "constant"], "--schedule cosine -> constant"),
        (["--batch-size", "16"], "--batch-size 32 -> 16"),
        (["--seed", "1"], "--seed 0 -> 1"),
        (["--norm", "layer"], "--norm batch -> layer"),
        (["--sgd-momentum", "0.5"], "--sgd-momentum 0.9 -> 0.5"),
        (["--weight-decay", "0"], "--weight-decay 0.0005 -> 0.0"),
        (["--bn-momentum", "0.2"], "--bn-momentum 0.1 -> 0.2"),
        (["--devices", "2"], "--devices 1 -> 2"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_resume_refuses_a_flag_that_changes_the_computation(cosine_run, flags, change):
    with pytest.raises(WorkdirError, match=rf"these flags differ \(saved -> now\): {change};"):
        train(cosine_run, "--schedule", "cosine", "--resume", *flags, epochs=1)


def test_resume_lists_every_changed_setting_in_one_message(cosine_run):
    with pytest.raises(WorkdirError) as caught:
        train(cosine_run, "--resume", "--norm", "group", "--seed", "2", script=cnn, epochs=1)
    message = str(caught.value)
    assert "\n" not in message
    for change in (
        "model MLP -> ConvNet",
        "--norm batch -> group",
        "--schedule cosine -> constant",
        "--seed 0 -> 2",
    ):
        assert change in message
    assert "partial_restore" not in message


def test_resume_refuses_other_data(cosine_run):
    data = tiny()
    data = Dataset(data.name, data.x_train[:64], data.y_train[:64], data.x_test, data.y_test, 10)
    with pytest.raises(WorkdirError, match=r"data digits-tiny \(96 train / 37 test\) -> "):
        train(cosine_run, "--schedule", "cosine", "--resume", data=data, epochs=1)


def test_a_cosine_run_cannot_be_extended(cosine_run):
    with pytest.raises(
        WorkdirError, match=r"--epochs 1 -> 2; the cosine schedule spans --epochs, so only"
    ):
        train(cosine_run, "--schedule", "cosine", "--resume", epochs=2)


def test_a_constant_schedule_run_extended_by_resume_equals_a_straight_run(straight, tmp_path):
    train(tmp_path, epochs=1)
    extended = train(tmp_path, "--resume", epochs=3)
    assert_same_leaves(extended.variables, straight[1].variables)
    assert without_time(logged(tmp_path)) == without_time(straight[1].history)
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 3


def test_resume_with_fewer_epochs_than_finished_says_so(copy_of_straight):
    with pytest.raises(
        WorkdirError,
        match=r"--epochs 2 is below the 3 epochs the run in .* has already finished "
        r"\(pass --epochs 3 or more\)",
    ):
        train(copy_of_straight, "--resume", epochs=2)


def test_the_workdir_records_the_runs_configuration(straight):
    config = json.loads((straight[0] / "config.json").read_text())
    assert config == {
        "model": "MLP",
        "norm": "batch",
        "bn_momentum": 0.1,
        "data": "digits-tiny (96 train / 37 test)",
        "batch_size": 32,
        "lr": 0.1,
        "schedule": "constant",
        "sgd_momentum": 0.9,
        "weight_decay": 0.0005,
        "seed": 0,
        "devices": 1,
        "num_processes": 1,
        "epochs": 3,
        "dtype": "float32",
        "augment": False,
    }


# 7. every expected failure is one line: error: ... ------------------------------------------


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "w").write_text("")
    code, _, err = cli(mlp, ["--epochs", "1", "--workdir", str(tmp_path / "w")], capsys)
    assert (code, err) == (2, [f"error: --workdir {tmp_path / 'w'} is a file, not a directory"])


@pytest.fixture
def read_only_directory(tmp_path):
    directory = tmp_path / "ro"
    if os.geteuid() != 0:
        directory.mkdir()
        directory.chmod(0o500)
        yield directory
        directory.chmod(0o700)
        return
    mount_tmpfs(directory, "ro,size=64k")  # root writes through permissions: mount it read-only
    yield directory
    subprocess.run(["umount", str(directory)], check=False, timeout=120)


def test_a_read_only_workdir_is_a_one_line_error(read_only_directory, capsys):
    code, _, err = cli(mlp, ["--epochs", "1", "--workdir", str(read_only_directory)], capsys)
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"error: could not write {read_only_directory}/config.json: ")


def test_compare_refuses_an_unwritable_plot_path_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    plot = tmp_path / "file" / "compare.png"
    code, out, err = cli(compare, ["--epochs", "1", "--plot", str(plot)], capsys)
    assert code == 2
    assert err == [f"error: cannot create the directory of --plot {plot}: File exists"]
    assert "---" not in out  # no run was started


def test_compare_with_a_batch_larger_than_the_data_is_a_one_line_error(tmp_path, capsys):
    code, _, err = cli(compare, ["--batch-size", "5000", "--plot", str(tmp_path / "c.png")], capsys)
    assert (code, err) == (2, ["error: --batch-size 5000 is larger than the training set (1437)"])


def test_an_unreachable_coordinator_is_a_one_line_error_after_the_join_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1"]
    # a fresh process: in this one JAX has computed already, and joining a cluster after that
    # is refused for that reason first
    run = subprocess.run(
        [sys.executable, "-m", "train.mlp", *flags, "--join-timeout", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # only stops a hang: the run itself takes seconds
    )
    code = run.returncode
    err = run.stderr.splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(
        f"error: could not reach the jax.distributed coordinator at 127.0.0.1:{port} within 1"
    )


def test_more_devices_than_xla_flags_allow_names_xla_flags(capsys):
    # tests/conftest.py presets XLA_FLAGS to 8 CPU devices before JAX starts
    code, _, err = cli(mlp, ["--devices", "16", "--epochs", "1"], capsys)
    assert code == 2
    assert err == [
        "error: --devices 16 requested but only 8 cpu device(s) exist in this process: "
        "XLA_FLAGS in the environment fixes the CPU device count at 8 and wins over --devices; "
        "unset it, or set --xla_force_host_platform_device_count=16 in it"
    ]


# 8. compare marks failed runs ---------------------------------------------------------------


def row(epoch, train_loss, test_loss, test_accuracy):
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": 0.5,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
    }


@pytest.mark.parametrize(
    "history,diverged,expected",
    [
        ([row(1, 0.3, 0.4, 0.9)], None, "ok"),
        ([row(1, 0.3, 2e14, 0.1)], None, "failed: chance level (test acc <= 1.5 x 0.102)"),
        ([row(1, 0.3, float("nan"), 0.9)], None, "failed: non-finite loss"),
        ([row(1, 0.3, 0.4, 0.9)], 2, "diverged in epoch 2"),
    ],
    ids=["ok", "chance", "nan", "diverged"],
)
def test_compare_status_is_ok_only_above_chance_with_finite_losses(history, diverged, expected):
    result = {"lr": 1.0, "norm": "none", "history": history, "diverged": diverged}
    assert compare.status(result, chance=0.102) == expected


def test_compare_refuses_a_negative_learning_rate_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        compare.main(["--epochs", "1", "--lrs=0.1,-1", "--plot", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert caught.value.code == 2 and out == ""
    assert err == (
        "python -m train.compare: error: --lrs must all be positive numbers, got -1 (see --help)\n"
    )


def test_the_compare_plot_labels_failed_runs():
    ok = {"lr": 0.1, "norm": "batch", "history": [row(1, 0.3, 0.4, 0.9)], "diverged": None}
    failed = {**ok, "norm": "none", "history": [row(1, 0.3, 2e14, 0.1)]}
    figure = draw_comparison(
        [{**ok, "status": "ok"}, {**failed, "status": "failed: chance level"}], "t"
    )
    labels = [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    assert labels == ["lr=0.1 BN", "lr=0.1 no BN (failed)"]
