"""The training scripts as a practitioner uses them (issue 19): flags checked before anything
runs, Ctrl-C and SIGTERM stop cleanly with the command that continues, --keep, the end-of-run
summary, `python -m train.evaluate` equal to the logged figures. Stops inside an epoch and
several processes: tests/test_train_preemption.py, tests/test_multihost_training.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal

import pytest

from train import compare, evaluate, mlp
from train.checkpoint import Checkpoints
from train.cli import parse_args

RUN = ["--use-bn", "--epochs", "2", "--batch-size", "256", "--schedule", "constant"]


@pytest.mark.parametrize(
    "main,argv,message",
    [
        (mlp.main, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (mlp.main, ["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (mlp.main, ["--devices", "0"], "--devices must be at least 1, got 0"),
        (mlp.main, ["--lr", "0"], "--lr must be a positive number, got 0.0"),
        (mlp.main, ["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
        (mlp.main, ["--bn-momentum", "5"], "argument --bn-momentum: must be in [0, 1] or none"),
        (mlp.main, ["--keep", "0"], "--keep must be at least 1, got 0"),
        (compare.main, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (compare.main, ["--devices", "0"], "--devices must be at least 1, got 0"),
        (compare.main, ["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (compare.main, ["--use-bn"], "unrecognized arguments: --use-bn"),
        (compare.main, ["--norm", "batch"], "unrecognized arguments: --norm batch"),
        (compare.main, ["--lr", "0.1"], "unrecognized arguments: --lr 0.1"),
        (compare.main, ["--workdir", "w"], "unrecognized arguments: --workdir w"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_flag_outside_its_domain_is_one_line_and_exit_2_before_anything_runs(
    main, argv, message, capsys
):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    out, err = capsys.readouterr()
    assert caught.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert message in err


def test_bn_momentum_none_is_the_cumulative_average_and_help_shows_defaults(capsys):
    assert parse_args("t", "", mlp.DEFAULTS, ["--bn-momentum", "none"]).bn_momentum is None
    with pytest.raises(SystemExit):
        mlp.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 0.1)", "(default: 20)", "(default: cosine)", "(default: 2)"):
        assert shown in text


def test_a_non_finite_evaluation_without_a_workdir_is_an_error(monkeypatch, capsys):
    from train.parallel import DataParallel

    real = DataParallel.eval_step

    def overflowing(self, model):
        step = real(self, model)
        return lambda state, x, y, mask: step(state, x * 1e38, y, mask)

    monkeypatch.setattr(DataParallel, "eval_step", overflowing)
    assert mlp.main(["--use-bn", "--epochs", "1", "--batch-size", "256", "--lr", "0.1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "absl" not in line]
    assert len(err) == 1 and err[0].startswith("error: epoch 1 ended with test loss ")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGINT while its epoch-1 checkpoint was being saved, then continued
    with the command it printed: (workdir, exit status, stderr, stdout of the continuation)."""
    workdir = tmp_path_factory.mktemp("interrupted") / "w"
    argv = [*RUN, "--workdir", str(workdir)]
    real_save = Checkpoints.save

    def save_with_a_signal(self, epoch, state):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the save: it must complete
        real_save(self, epoch, state)

    patch = pytest.MonkeyPatch()
    patch.setattr(Checkpoints, "save", save_with_a_signal)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = mlp.main(argv)
    patch.undo()
    command = shlex.split(err.getvalue().strip().splitlines()[-1].split("continue with: ")[1])
    assert command[:3] == ["python", "-m", "train.mlp"]
    with contextlib.redirect_stdout(out):
        assert mlp.main(command[3:]) == 0
    return workdir, code, err.getvalue(), out.getvalue()


def test_ctrl_c_prints_one_line_with_the_kept_checkpoint_and_exits_130(interrupted):
    workdir, code, err, _ = interrupted
    lines = [line for line in err.splitlines() if "absl" not in line]
    assert code == 130 and len(lines) == 1
    # no step of epoch 2 ran: the epoch checkpoint is the state, no mid-epoch one is written
    assert lines[0].startswith(
        f"stopped by SIGINT at epoch 2, step 0/5; kept: the checkpoint of epoch 1 "
        f"({workdir}/checkpoints/1); continue with: python -m train.mlp --use-bn --epochs 2"
    )
    assert lines[0].endswith(" --resume")


@pytest.mark.parametrize("at_epoch, kept", [(1, False), (2, True)])
def test_a_second_ctrl_c_says_whether_a_checkpoint_is_kept(
    tmp_path, monkeypatch, capsys, at_epoch, kept
):
    real_save = Checkpoints.save

    def save(self, epoch, state):  # a second Ctrl-C while the checkpoint is written
        if epoch == at_epoch:
            raise KeyboardInterrupt
        real_save(self, epoch, state)

    monkeypatch.setattr(Checkpoints, "save", save)
    workdir = f"{tmp_path / 'w'}/"  # as a shell completes it
    assert mlp.main([*RUN, "--workdir", workdir]) == 130
    [line] = [line for line in capsys.readouterr().err.splitlines() if "absl" not in line]
    said = f"the checkpoints in {workdir} are kept" if kept else "no checkpoint was saved yet"
    assert line.startswith(f"interrupted; {said}; continue with: python -m train.mlp ")
    assert line.endswith(f" --workdir {workdir} --resume")


def test_the_continued_run_equals_a_straight_run_and_ends_with_a_summary(interrupted, tmp_path):
    workdir, _, _, out = interrupted
    assert mlp.main([*RUN, "--workdir", str(tmp_path), "--keep", "1"]) == 0
    timings = ("seconds", "examples_per_second")
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in timings} for line in f.open()]
        for f in (workdir / "metrics.jsonl", tmp_path / "metrics.jsonl")
    ]
    assert rows[0] == rows[1]
    assert [r["step"] for r in rows[0]] == [5, 10] and rows[0][0]["lr"] == 0.1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # --keep 1
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("done: 2 epoch(s); test accuracy ")
    assert summary.endswith(f"metrics: {workdir}/metrics.jsonl, checkpoints: {workdir}/checkpoints")


@pytest.mark.parametrize("epoch", [None, 1])
def test_evaluate_prints_the_logged_test_figures_of_a_checkpoint(interrupted, epoch):
    workdir = interrupted[0]
    rows = {r["epoch"]: r for r in map(json.loads, (workdir / "metrics.jsonl").open())}
    got_epoch, loss, accuracy = evaluate.evaluate_checkpoint(workdir, epoch)
    assert got_epoch == (epoch or 2)
    assert (loss, accuracy) == (rows[got_epoch]["test_loss"], rows[got_epoch]["test_accuracy"])


# -- one spelling across the scripts (issue 27) ----------------------------------------------


@pytest.mark.parametrize("by", ["flag", "position"])
def test_evaluate_prints_one_line_with_four_decimals_and_no_absl_warning(interrupted, by, capfd):
    workdir = str(interrupted[0])
    argv = ["--workdir", workdir] if by == "flag" else [workdir]
    assert evaluate.main(argv) == 0
    out, err = capfd.readouterr()
    row = json.loads((interrupted[0] / "metrics.jsonl").read_text().splitlines()[-1])
    assert out == (f"epoch 2: test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}\n")
    assert "absl" not in err and "WARNING" not in err


def test_evaluate_refuses_two_different_workdirs(capsys):
    with pytest.raises(SystemExit) as caught:
        evaluate.main(["--workdir", "a", "b"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "python -m train.evaluate: error: two workdirs given: --workdir a and b (see --help)\n"
    )


def test_evaluate_without_a_workdir_asks_for_the_flag(capsys):
    with pytest.raises(SystemExit):
        evaluate.main([])
    assert "the following arguments are required: --workdir" in capsys.readouterr().err


def test_compare_without_out_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert compare.main(["--epochs", "1", "--lrs", "0.1", "--batch-size", "256"]) == 0
    assert os.listdir(tmp_path) == []  # before: compare.png in the current folder
    assert "plot:" not in capsys.readouterr().out


def test_compare_refuses_out_and_its_earlier_name_together(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--out", "a.png", "--plot", "b.png"])
    assert "--plot is the earlier name of --out: give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["mlp", "cnn", "resnet", "compare", "evaluate", "plot"])
def test_help_states_no_run_time(script, capsys):
    import importlib
    import re

    with pytest.raises(SystemExit):
        importlib.import_module(f"train.{script}").main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m train.")
    assert not re.search(r"\d\s*(s|sec|seconds|min|minutes)\b", text), text


def test_verbose_is_an_option_that_a_resumed_run_may_change():
    from train.config import Run

    run = Run.from_flags(parse_args("python -m train.mlp", "", mlp.DEFAULTS, ["--verbose"]))
    assert run.options.verbose is True  # an option: RunConfig, which --resume compares, has none
    assert not hasattr(run.config, "verbose")


# -- multi-process output: gloo's lines, and the stop each process saw ---------------------

GLOO = (
    b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
)


@pytest.mark.parametrize(
    "chunks, forwarded",
    [
        ([b"epoch 1\n" + GLOO + b"epoch 2\n"], b"epoch 1\nepoch 2\n"),
        ([b"epoch 1\n" + GLOO[:20], GLOO[20:] + b"done\n"], b"epoch 1\ndone\n"),  # split line
        ([b"epoch 1 ", GLOO, b"acc 0.9\n"], b"epoch 1 acc 0.9\n"),  # inside one of ours
        ([b"a [Gl", b"oo] not gloo's line\n"], b"a [Gloo] not gloo's line\n"),
    ],
)
def test_gloo_lines_are_dropped_wherever_the_chunks_break(chunks, forwarded):
    from train.native_output import drop_gloo_lines

    out, pending = b"", b""
    for chunk in chunks:
        now, pending = drop_gloo_lines(pending + chunk)
        out += now
    assert out + pending == forwarded


def test_the_filter_keeps_gloo_lines_written_by_native_code_off_stdout():
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from train.native_output import GlooLinesFilter\n"
        "f = GlooLinesFilter()\n"
        f"os.write(1, {GLOO!r})\n"  # as gloo's C++ code does: straight to descriptor 1
        "print('epoch 1', flush=True)\n"
        f"os.write(1, {GLOO.replace(b'Rank 0', b'Rank 1')!r})\n"
        "print('done')\n"
        "f.close()\n"
        "print('after')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout == "epoch 1\ndone\nafter\n"


class FakeStore:
    """jax.distributed's key-value store, as train.stopping uses it."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value):
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_a_ctrl_c_on_one_process_is_named_by_the_others(monkeypatch):
    from jax._src import distributed
    from jax.experimental import multihost_utils

    from train.stopping import StopRequest

    store = FakeStore()
    monkeypatch.setattr(distributed.global_state, "client", store)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: True)
    interrupted, other = StopRequest(), StopRequest()
    for stop in (interrupted, other):
        stop.cluster = True
        stop.notify_cluster = lambda: None  # the SIGTERM to JAX's notifier, not to pytest
    interrupted(signal.SIGINT)
    assert interrupted.reached(5) and other.reached(5)
    assert interrupted.describe() == "stopped by SIGINT"
    # before: "stopped by SIGTERM", a signal this process never received
    assert other.describe() == "stopped by SIGINT on process 0 (passed on to every process)"


def test_a_sigterm_notice_without_a_ctrl_c_is_named_sigterm(monkeypatch):
    from jax._src import distributed
    from jax.experimental import multihost_utils

    from train.stopping import StopRequest

    monkeypatch.setattr(distributed.global_state, "client", FakeStore())
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: True)
    stop = StopRequest()
    stop.cluster = True
    assert stop.reached(3) and stop.describe() == "stopped by SIGTERM"
