"""The training loop shared by every script: create the state, train an epoch, evaluate, log
and checkpoint, resume, stop cleanly on a signal.

The loop never waits for the device inside an epoch except every :data:`CHECK_EVERY` steps:
each step's loss and accuracy are written into per-epoch arrays on the device, together with the
index of the first step whose loss is not finite. The host looks at that index (and moves the
progress bar) every :data:`CHECK_EVERY` steps and at the end of the epoch, and fetches the
arrays once per epoch. A divergence therefore still stops the run before anything of that epoch
is logged or saved, and the epoch's figures are exactly the old step-by-step ones (the float64
mean of the float32 step values, in step order).
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxbn
from train.batching import train_batches
from train.config import RunConfig
from train.datasets import Dataset, load_dataset
from train.download import ChecksumError, DatasetUnavailableError
from train.feed import make_feed
from train.files import WorkdirError
from train.parallel import DataParallel
from train.workdir import open_workdir

ModelFactory = Callable[[argparse.Namespace, Dataset], nn.Module]

# Steps between the host's looks at the device (divergence flag, progress bar). Each look waits
# for the steps queued so far; between looks the host only queues work.
CHECK_EVERY = 16

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}  # --dtype -> the models' `dtype` field


class TrainingDivergedError(RuntimeError):
    """The loss, the evaluation or the state became NaN/Inf; ``history`` holds the finished
    epochs (whose checkpoints, with ``--workdir``, are all finite)."""

    def __init__(self, message: str, history: list[dict]):
        super().__init__(message)
        self.history = history


class RunError(RuntimeError):
    """An expected failure outside the workdir (e.g. the cluster could not be joined)."""


class RunStoppedError(Exception):
    """SIGINT or SIGTERM stopped the run between two steps; the message says where, what is
    kept and how to continue. ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# What the scripts turn into a one-line ``error: ...`` and exit status 2.
EXPECTED_ERRORS = (
    DatasetUnavailableError,
    ChecksumError,
    ValueError,
    WorkdirError,
    RunError,
    OSError,
)


@dataclass
class RunResult:
    history: list[dict]  # one row per epoch, as in metrics.jsonl
    variables: dict[str, Any]  # {"params", "batch_stats"} on the host


class StopRequest:
    """Set by SIGINT/SIGTERM (see :func:`stop_on_signals`); the loop looks at it before every
    step, so a save in progress always completes. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any = None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def dtype_of(args: argparse.Namespace) -> Any:
    """The models' ``dtype`` for ``--dtype`` (None for float32: Flax's promotion, as before)."""
    return DTYPES[getattr(args, "dtype", "float32")]


def learning_rate_schedule(args: argparse.Namespace, total_steps: int) -> optax.Schedule:
    if args.schedule == "cosine":
        return optax.cosine_decay_schedule(args.lr, max(total_steps, 1))
    return optax.constant_schedule(args.lr)


def make_optimizer(args: argparse.Namespace, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum (``--sgd-momentum``), weight decay and the learning-rate schedule —
    the same update as ``torch.optim.SGD(lr, momentum, weight_decay)``."""
    return optax.chain(
        optax.add_decayed_weights(args.weight_decay),
        optax.sgd(learning_rate_schedule(args, total_steps), momentum=args.sgd_momentum or None),
    )


def create_state(model: nn.Module, tx, data: Dataset, seed: int, parallel: DataParallel):
    """Fresh ``{"params", "batch_stats", "opt_state"}``, replicated over the mesh."""
    variables = model.init(jax.random.key(seed), data.x_train[:2], train=False)
    return parallel.replicate(
        {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"]),
        }
    )


def run(
    args: argparse.Namespace,
    make_model: ModelFactory,
    *,
    log: Callable[[str], None] = print,
    data: Dataset | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Trains ``make_model(args, data)`` as the flags say; returns the history and variables.

    Raises:
      TrainingDivergedError: the loss, the test loss or the state became NaN/Inf; the epoch
        is neither logged nor saved, the earlier checkpoints stay as they are.
      RunStoppedError: ``stop`` was set (by a signal); the epoch in progress is not saved.
      WorkdirError: the workdir cannot be used (see ``train.workdir.open_workdir``).
      ValueError: flags that do not fit (batch vs devices or data, ...).
      RunError: the multi-host cluster could not be joined.
    """
    started = time.perf_counter()
    _join_cluster(args)
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda _: None)
    data = data or load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    parallel = DataParallel(args.devices)
    parallel.check_batch(args.batch_size)
    steps_per_epoch = len(train_batches(len(data.y_train), args.batch_size, args.seed, 1))
    total_steps = steps_per_epoch * args.epochs
    schedule = learning_rate_schedule(args, total_steps)
    tx = make_optimizer(args, total_steps)
    model = make_model(args, data)

    history: list[dict] = []
    start_epoch = 0
    workdir = None
    if args.workdir:
        config = RunConfig.from_args(
            args,
            model=type(model).__name__,
            data=f"{data.name} ({len(data.y_train)} train / {len(data.y_test)} test)",
        )
        workdir = open_workdir(
            args,
            config,
            lambda: create_state(model, tx, data, args.seed, parallel),
            check_state=lambda s: _describe_nonfinite(nonfinite_leaves(s)),
            say=say,
            main_process=main_process,
        )
        state, start_epoch, history = workdir.state, workdir.start_epoch, workdir.history
    else:
        state = create_state(model, tx, data, args.seed, parallel)
    saved_epoch = start_epoch or None  # the newest checkpoint on disk
    dtype = "" if args.dtype == "float32" else f", {args.dtype} activations"
    say(
        f"{type(model).__name__} norm={args.norm} on {data.name} "
        f"({len(data.y_train)} train / {len(data.y_test)} test), {parallel.size} device(s), "
        f"batch {args.batch_size}, {steps_per_epoch} steps/epoch{dtype}"
    )

    feed = make_feed(parallel, data, args.batch_size)
    train_step = parallel.train_step(model, tx, args.batch_size)
    eval_step = parallel.eval_step(model)
    trained_seconds, trained_steps = 0.0, 0
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            epoch_started = time.perf_counter()
            try:
                state, losses, accuracies = train_epoch(
                    train_step,
                    state,
                    feed,
                    parallel,
                    args,
                    epoch,
                    steps_per_epoch,
                    main_process,
                    stop,
                )
            except _DivergedError as bad:
                raise TrainingDivergedError(
                    f"loss became {bad.loss} at epoch {epoch}, step {bad.step}: training "
                    f"diverged (try a lower --lr){_kept(args, saved_epoch)}",
                    history,
                ) from None
            train_seconds = time.perf_counter() - epoch_started
            test_loss, test_accuracy = evaluate(eval_step, state, feed, len(data.y_test))
            row = {
                "epoch": epoch,
                "step": epoch * steps_per_epoch,
                "lr": float(jax.device_get(schedule(epoch * steps_per_epoch - 1))),
                "train_loss": float(np.mean(losses)),
                "train_accuracy": float(np.mean(accuracies)),
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "seconds": round(time.perf_counter() - epoch_started, 3),
                "examples_per_second": round(
                    steps_per_epoch * args.batch_size / max(train_seconds, 1e-9), 1
                ),
            }
            # Never report or save an epoch that ended in NaN/Inf: its checkpoint would be kept
            # as "good" and every --resume would start from it.
            bad = _describe_nonfinite(nonfinite_leaves(state))
            if bad or not (math.isfinite(test_loss) and math.isfinite(row["train_loss"])):
                raise TrainingDivergedError(
                    f"epoch {epoch} ended with {bad or f'test loss {test_loss}'}: training "
                    f"diverged (try a lower --lr){_kept(args, saved_epoch)}",
                    history,
                )
            say(
                f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f}  test loss {test_loss:.4f} "
                f"acc {test_accuracy:.4f}  {row['seconds']:.1f}s"
            )
            if workdir:
                # Metrics first: a crash between the two leaves a row without a checkpoint,
                # which --resume drops and recomputes; the other order would lose the row.
                if main_process:
                    workdir.metrics.append(row)
                workdir.checkpoints.save(epoch, state)
                saved_epoch = epoch
            history.append(row)
            trained_seconds += train_seconds
            trained_steps += steps_per_epoch
    except RunStoppedError as stopped:
        raise RunStoppedError(
            f"{stopped}; {_continue(args, saved_epoch)}", stop.signum if stop else 2
        ) from None
    finally:
        if workdir:
            workdir.checkpoints.close()
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    if args.inspect:
        say(str(jaxbn.inspect_batchnorm(host)))
    if getattr(args, "summary", True):  # train.compare prints its own table instead
        say(summary(args, history, time.perf_counter() - started, trained_steps, trained_seconds))
    return RunResult(history, host)


class _DivergedError(Exception):
    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss


@functools.partial(jax.jit, donate_argnums=0)
def _record(acc: dict, metrics: dict, index) -> dict:
    """Writes step ``index``'s metrics into the epoch's device arrays; keeps the first index
    whose loss is not finite (-1: none yet) and the latest loss (for the progress bar)."""
    loss = metrics["loss"].astype(jnp.float32)
    first = acc["first_bad"]
    return {
        "loss": acc["loss"].at[index].set(loss),
        "accuracy": acc["accuracy"].at[index].set(metrics["accuracy"].astype(jnp.float32)),
        "first_bad": jnp.where((first < 0) & ~jnp.isfinite(loss), index, first),
        "latest": loss,
    }


def train_epoch(
    train_step, state, feed, parallel, args, epoch: int, steps: int, main_process: bool, stop
):
    """One epoch: ``(state, losses, accuracies)`` with the step values as float32 numpy arrays.

    Raises:
      _DivergedError: a step's loss was not finite (found at the next look, at most
        :data:`CHECK_EVERY` steps later; nothing of the epoch is kept).
      RunStoppedError: ``stop`` was set.
    """
    acc = parallel.replicate(
        {
            "loss": np.zeros(steps, np.float32),
            "accuracy": np.zeros(steps, np.float32),
            "first_bad": np.int32(-1),
            "latest": np.float32(0),
        }
    )
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch}/{args.epochs}",
        leave=False,
        disable=None if main_process else True,  # None: only on a terminal
    )
    shown = 0

    def look(done: int):
        nonlocal shown
        first_bad, latest = jax.device_get((acc["first_bad"], acc["latest"]))
        if first_bad >= 0:
            bar.close()
            raise _DivergedError(int(first_bad) + 1, float(jax.device_get(acc["loss"])[first_bad]))
        bar.update(done - shown)
        bar.set_postfix(loss=f"{float(latest):.4f}")
        shown = done

    try:
        for index, (x, y) in enumerate(feed.train(args.seed, epoch)):
            if stop is not None and stop.signum is not None:
                look(index)  # a divergence before the stop is reported as such
                raise RunStoppedError(
                    f"stopped by {signal.Signals(stop.signum).name} at epoch {epoch}, step "
                    f"{index}/{steps} (the epoch in progress is not saved)",
                    stop.signum,
                )
            state, step_metrics = train_step(state, x, y)
            acc = _record(acc, step_metrics, index)
            if (index + 1) % CHECK_EVERY == 0:
                look(index + 1)
        if shown < steps:
            look(steps)
    finally:
        bar.close()
    losses, accuracies = jax.device_get((acc["loss"], acc["accuracy"]))
    return state, losses.astype(np.float64), accuracies.astype(np.float64)


def evaluate(eval_step, state, feed, num_examples: int) -> tuple[float, float]:
    """Mean loss and accuracy over the test set, each example counted exactly once; one
    transfer to the host at the end."""
    outputs = [eval_step(state, x, y, m) for x, y, m in feed.test()]
    loss_sum = correct = count = 0
    for out in jax.device_get(outputs):  # summed in batch order, in float64, as always
        loss_sum += float(out["loss_sum"])
        correct += int(out["correct"])
        count += int(out["count"])
    if count != num_examples:  # a broken padding rule must never go unnoticed
        raise AssertionError(f"evaluated {count} examples, the test set has {num_examples}")
    return loss_sum / count, correct / count


def summary(args, history: list[dict], seconds: float, steps: int, train_seconds: float) -> str:
    """The end-of-run line: final and best test accuracy, time, speed, where files are."""
    if not history:
        return "done: no epoch to train"
    best = max(history, key=lambda r: r["test_accuracy"])
    speed = f", {steps * args.batch_size / train_seconds:.0f} examples/s" if steps else ""
    text = (
        f"done: {len(history)} epoch(s); test accuracy {history[-1]['test_accuracy']:.4f} "
        f"final, {best['test_accuracy']:.4f} best (epoch {best['epoch']}); "
        f"{seconds:.1f}s in all{speed}"
    )
    if args.workdir:
        w = pathlib.Path(args.workdir)
        text += f"; metrics: {w / 'metrics.jsonl'}, checkpoints: {w / 'checkpoints'}"
    return text


def run_script(args: argparse.Namespace, make_model: ModelFactory) -> int:
    """Runs and turns the expected failures into a one-line error and an exit code: 1 for a
    divergence, 2 for bad flags/files, 130/143 for SIGINT/SIGTERM."""
    stop = StopRequest()
    try:
        with stop_on_signals(stop):
            run(args, make_model, stop=stop)
    except RunStoppedError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop could look
        print(f"interrupted; {_continue(args, -1)}", file=sys.stderr)
        return 130
    except TrainingDivergedError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
    return 0


class stop_on_signals:  # noqa: N801 (a context manager, used like a function)
    """Within: SIGINT and SIGTERM set ``stop`` instead of killing the process (main thread
    only; elsewhere nothing changes)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: StopRequest):
        self.stop, self.saved = stop, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self.stop) for s in self.SIGNALS}
        return self.stop

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        return False


def _join_cluster(args: argparse.Namespace) -> None:
    if args.coordinator:
        try:
            jaxbn.multihost.initialize_multihost(
                args.coordinator,
                args.num_processes,
                args.process_id,
                timeout_seconds=args.join_timeout,
            )
        except RuntimeError as err:
            raise RunError(_first_line(err)) from err


@jax.jit
def _finite_flags(tree: Any) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths (``params/Dense_0/kernel``) of the floating-point leaves holding NaN or Inf."""
    paths = [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    floats = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    flags = jax.device_get(_finite_flags(floats))
    return [p for p, ok in zip(paths, flags, strict=True) if not bool(ok)]


def _describe_nonfinite(paths: list[str]) -> str | None:
    if not paths:
        return None
    more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
    return f"NaN/Inf in {paths[0]}{more}"


def _kept(args: argparse.Namespace, saved_epoch: int | None) -> str:
    if not args.workdir:
        return ""
    if saved_epoch is None:
        return f"; no checkpoint was saved in {args.workdir} (no epoch finished with finite values)"
    return (
        f"; kept: the checkpoint of epoch {saved_epoch} ({args.workdir}/checkpoints/"
        f"{saved_epoch}, the newest; every saved checkpoint is finite) and the metrics of "
        f"epochs 1-{saved_epoch}"
    )


def _continue(args: argparse.Namespace, saved_epoch: int | None) -> str:
    """What is kept and the exact command that continues the run."""
    if not args.workdir:
        return "nothing was saved (no --workdir)"
    command = list(getattr(args, "command", ["python", "-m", "train"]))
    if "--resume" not in command:
        command.append("--resume")
    if saved_epoch == -1:  # not known here
        kept = f"the checkpoints in {args.workdir}/checkpoints are kept"
    elif saved_epoch:
        path = f"{args.workdir}/checkpoints/{saved_epoch}"
        kept = f"kept: the checkpoint of epoch {saved_epoch} ({path})"
    else:
        kept = "no checkpoint was saved yet"
    return f"{kept}; continue with: {shlex.join(command)}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
