"""The training loop shared by every script, in the shape of Flax's ImageNet example: build
what a run trains with (:func:`setup`), create or restore the state (:func:`restore_or_create`),
train an epoch (:func:`train_epoch`), evaluate (:func:`evaluate`), and the whole run with its
logging, checkpoints and clean stops (:func:`train_and_evaluate`).

The loop never waits for the device inside an epoch except every :data:`CHECK_EVERY` steps:
each step's loss and accuracy are written into per-epoch arrays on the device, together with the
index of the first step whose loss is not finite. The host looks at that index (and moves the
progress bar) every :data:`CHECK_EVERY` steps and at the end of the epoch, and fetches the
arrays once per epoch. A divergence therefore still stops the run before anything of that epoch
is logged or saved, and the epoch's figures are exactly the old step-by-step ones (the float64
mean of the float32 step values, in step order).

Stopping on SIGINT/SIGTERM at a step boundary: :mod:`train.stopping`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
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
from train.checkpoint import MID_EPOCH, MidEpoch
from train.config import Run, RunConfig, RunOptions
from train.datasets import Dataset, load_dataset
from train.download import ChecksumError, DatasetUnavailableError
from train.feed import make_feed
from train.files import WorkdirError
from train.native_output import GlooLinesFilter
from train.parallel import DataParallel
from train.stopping import (
    RunStoppedError,
    StopRequest,
    continue_command,
    interrupted_message,
    stop_on_signals,
)
from train.workdir import Workdir, open_workdir

ModelFactory = Callable[[RunConfig, Dataset], nn.Module]

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
    variables: dict[str, Any]  # {"params", "batch_stats"} on the host, in the model's order


def dtype_of(config: RunConfig) -> Any:
    """The models' ``dtype`` for ``--dtype`` (None for float32: Flax's promotion, as before)."""
    return DTYPES[getattr(config, "dtype", "float32")]


def learning_rate_schedule(config: RunConfig, total_steps: int) -> optax.Schedule:
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, max(total_steps, 1))
    return optax.constant_schedule(config.lr)


def make_optimizer(config: RunConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum (``--sgd-momentum``), weight decay and the learning-rate schedule —
    the same update as ``torch.optim.SGD(lr, momentum, weight_decay)``."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, total_steps), momentum=config.sgd_momentum or None
        ),
    )


def init_variables(model: nn.Module, data: Dataset, seed: int) -> dict[str, Any]:
    """``model.init``'s variables: its dicts list the layers in the order the model created
    them (JAX's tree functions sort keys; :func:`in_model_order` restores this order)."""
    return model.init(jax.random.key(seed), data.x_train[:2], train=False)


def state_from(variables: Mapping[str, Any], tx, parallel: DataParallel) -> dict[str, Any]:
    """``{"params", "batch_stats", "opt_state"}`` of ``variables``, replicated over the mesh."""
    return parallel.replicate(
        {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"]),
        }
    )


def create_state(model: nn.Module, tx, data: Dataset, seed: int, parallel: DataParallel):
    """Fresh ``{"params", "batch_stats", "opt_state"}``, replicated over the mesh."""
    return state_from(init_variables(model, data, seed), tx, parallel)


def in_model_order(tree: Any, like: Any) -> Any:
    """``tree`` with the keys of every dict in the order of ``like``'s (e.g. ``model.init``'s
    variables); keys ``like`` lacks come last."""
    if not isinstance(tree, Mapping):
        return tree
    like = like if isinstance(like, Mapping) else {}
    keys = [k for k in like if k in tree] + [k for k in tree if k not in like]
    return {k: in_model_order(tree[k], like.get(k)) for k in keys}


@dataclass
class Setup:
    """What a run trains with, built from its configuration."""

    config: RunConfig  # with the model and the data described
    data: Dataset
    parallel: DataParallel
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    feed: Any  # train.feed.DeviceFeed or HostFeed
    train_step: Callable
    eval_step: Callable


def setup(run: Run, make_model: ModelFactory, data: Dataset | None = None) -> Setup:
    """Loads the data (unless given), builds the mesh, the model, the optimizer, the feed and
    the jitted steps. Needs the cluster joined first (:func:`join_cluster`).

    Raises:
      ValueError: a batch that does not divide across the devices or exceeds the data.
      DatasetUnavailableError, ChecksumError: the data cannot be loaded.
    """
    config, options = run.config, run.options
    data = data or load_dataset(options.dataset, options.data_dir, download=options.download)
    parallel = DataParallel(config.devices)
    parallel.check_batch(config.batch_size)
    steps_per_epoch = len(train_batches(len(data.y_train), config.batch_size, config.seed, 1))
    total_steps = steps_per_epoch * config.epochs
    tx = make_optimizer(config, total_steps)
    model = make_model(config, data)
    config = config.describing(
        type(model).__name__, f"{data.name} ({len(data.y_train)} train / {len(data.y_test)} test)"
    )
    return Setup(
        config=config,
        data=data,
        parallel=parallel,
        model=model,
        tx=tx,
        schedule=learning_rate_schedule(config, total_steps),
        steps_per_epoch=steps_per_epoch,
        feed=make_feed(parallel, data, config),
        train_step=parallel.train_step(model, tx, config.batch_size),
        eval_step=parallel.eval_step(model),
    )


def restore_or_create(
    run: Run, s: Setup, *, say: Callable[[str], None], main_process: bool
) -> tuple[Any, dict[str, Any], Workdir | None]:
    """``(state, model.init's variables, workdir)``: the fresh state, or with ``--resume`` the
    newest good checkpoint's (see ``train.workdir.open_workdir``); workdir None without
    ``--workdir``."""
    variables: dict[str, Any] = {}

    def fresh_state():
        variables.update(init_variables(s.model, s.data, s.config.seed))
        return state_from(variables, s.tx, s.parallel)

    if not run.options.workdir:
        return fresh_state(), variables, None
    workdir = open_workdir(
        run,
        s.config,
        fresh_state,
        steps_per_epoch=s.steps_per_epoch,
        check_state=lambda state: _describe_nonfinite(nonfinite_leaves(state)),
        say=say,
        main_process=main_process,
    )
    return workdir.state, variables, workdir


@dataclass(frozen=True)
class Saved:
    """The newest checkpoint on disk: of a finished epoch (``step`` None) or mid-epoch."""

    epoch: int
    step: int | None
    path: str

    def describe(self, note: str = "") -> str:
        where = "" if self.step is None else f", step {self.step}"
        return f"the checkpoint of epoch {self.epoch}{where} ({self.path}{note})"


def train_and_evaluate(
    run: Run,
    make_model: ModelFactory,
    *,
    log: Callable[[str], None] = print,
    data: Dataset | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Trains ``make_model(run.config, data)`` as ``run`` says; returns the history and the
    variables.

    Raises:
      TrainingDivergedError: the loss, the test loss or the state became NaN/Inf; the epoch
        is neither logged nor saved, the earlier checkpoints stay as they are.
      RunStoppedError: ``stop`` was reached (a signal); with ``--workdir`` the epoch in
        progress is saved as a mid-epoch checkpoint first.
      WorkdirError: the workdir cannot be used (see ``train.workdir.open_workdir``).
      ValueError: flags that do not fit (batch vs devices or data, ...).
      RunError: the multi-host cluster could not be joined.
    """
    started = time.perf_counter()
    options = run.options
    join_cluster(run)
    stop = stop or StopRequest()
    stop.cluster = bool(options.coordinator) or jax.process_count() > 1
    if stop.cluster and stop.signum is not None:  # came before JAX's notifier was in place
        os.kill(os.getpid(), signal.SIGTERM)
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda _: None)
    s = setup(run, make_model, data)
    config, steps = s.config, s.steps_per_epoch
    state, variables, workdir = restore_or_create(run, s, say=say, main_process=main_process)
    history = list(workdir.history) if workdir else []
    start_epoch = workdir.start_epoch if workdir else 0
    mid_epoch = workdir.mid_epoch if workdir else None
    saved = _newest_saved(options, start_epoch, mid_epoch, steps)
    dtype = "" if config.dtype == "float32" else f", {config.dtype} activations"
    augment = ", augmented" if config.augment else ""
    say(
        f"{config.model} norm={config.norm} on {s.data.name} "
        f"({len(s.data.y_train)} train / {len(s.data.y_test)} test{augment}), "
        f"{s.parallel.size} device(s), batch {config.batch_size}, {steps} steps/epoch{dtype}"
    )

    trained_seconds, trained_steps = 0.0, 0
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_started = time.perf_counter()
            resume_at = mid_epoch if mid_epoch and mid_epoch.epoch == epoch else None
            first_step = resume_at.step if resume_at else 0
            try:
                state, losses, accuracies = train_epoch(
                    s, state, epoch, start=resume_at, stop=stop, show=main_process
                )
            except _DivergedError as bad:
                raise TrainingDivergedError(
                    f"loss became {bad.loss} at epoch {epoch}, step {bad.step}: training "
                    f"diverged (try a lower --lr){_kept(options, saved, epoch - 1)}",
                    history,
                ) from None
            except _StoppedError as stopped:
                raise _stopped(
                    run, s, stopped, epoch, first_step, saved, workdir, stop, history
                ) from None
            train_seconds = time.perf_counter() - epoch_started
            row = epoch_row(s, state, epoch, losses, accuracies)
            row["seconds"] = round(time.perf_counter() - epoch_started, 3)
            row["examples_per_second"] = round(
                (steps - first_step) * config.batch_size / max(train_seconds, 1e-9), 1
            )
            # Never report or save an epoch that ended in NaN/Inf: its checkpoint would be kept
            # as "good" and every --resume would start from it.
            bad = _describe_nonfinite(nonfinite_leaves(state))
            test_loss = row["test_loss"]
            if bad or not (math.isfinite(test_loss) and math.isfinite(row["train_loss"])):
                raise TrainingDivergedError(
                    f"epoch {epoch} ended with {bad or f'test loss {test_loss}'}: "
                    f"training diverged (try a lower --lr){_kept(options, saved, epoch - 1)}",
                    history,
                )
            say(
                f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f}  test loss {row['test_loss']:.4f} "
                f"acc {row['test_accuracy']:.4f}  {row['seconds']:.1f}s"
            )
            if workdir:
                # Metrics first: a crash between the two leaves a row without a checkpoint,
                # which --resume drops and recomputes; the other order would lose the row.
                if main_process:
                    workdir.metrics.append(row)
                workdir.checkpoints.save(epoch, state)
                saved = Saved(epoch, None, os.path.join(options.workdir, "checkpoints", str(epoch)))
            history.append(row)
            trained_seconds += train_seconds
            trained_steps += steps - first_step
    finally:
        if workdir:
            workdir.checkpoints.close()
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    host = in_model_order(host, variables)
    if options.inspect:
        say(str(jaxbn.inspect_batchnorm(host)))
    if options.summary:
        say(summary(run, history, time.perf_counter() - started, trained_steps, trained_seconds))
    return RunResult(history, host)


def run(
    args: Run | argparse.Namespace,
    make_model: ModelFactory,
    *,
    log: Callable[[str], None] = print,
    data: Dataset | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """:func:`train_and_evaluate` of a :class:`~train.config.Run`, or of parsed flags
    (``train.cli.parse_args``, ``train.compare``'s namespace)."""
    if not isinstance(args, Run):
        args = Run.from_flags(args)
    return train_and_evaluate(args, make_model, log=log, data=data, stop=stop)


class _DivergedError(Exception):
    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss


class _StoppedError(Exception):
    """The stop was reached before step ``step`` (0-based) of the epoch: ``state`` is the
    state then, ``losses``/``accuracies`` hold the step figures so far."""

    def __init__(self, step: int, state, losses: np.ndarray, accuracies: np.ndarray):
        self.step, self.state, self.losses, self.accuracies = step, state, losses, accuracies


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
    s: Setup,
    state,
    epoch: int,
    *,
    start: MidEpoch | None = None,
    stop: StopRequest | None = None,
    show: bool = True,
):
    """One epoch (from ``start``'s step with its figures, when resumed inside it):
    ``(state, losses, accuracies)`` with the step values as float64 numpy arrays.

    Raises:
      _DivergedError: a step's loss was not finite (found at the next look, at most
        :data:`CHECK_EVERY` steps later; nothing of the epoch is kept).
      _StoppedError: ``stop`` was reached before a step.
    """
    steps, config = s.steps_per_epoch, s.config
    first = start.step if start else 0
    acc = s.parallel.replicate(
        {
            "loss": start.losses if start else np.zeros(steps, np.float32),
            "accuracy": start.accuracies if start else np.zeros(steps, np.float32),
            "first_bad": np.int32(-1),
            "latest": np.float32(start.losses[first - 1] if start else 0),
        }
    )
    bar = tqdm(
        total=steps,
        initial=first,
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        disable=None if show else True,  # None: only on a terminal
    )
    shown = first

    def look(done: int):
        nonlocal shown
        first_bad, latest = jax.device_get((acc["first_bad"], acc["latest"]))
        if first_bad >= 0:
            bar.close()
            raise _DivergedError(int(first_bad) + 1, float(jax.device_get(acc["loss"])[first_bad]))
        bar.update(done - shown)
        bar.set_postfix(loss=f"{float(latest):.4f}")
        shown = done

    base = (epoch - 1) * steps  # global steps before this epoch
    pace = s.parallel.pacer()  # bounded host lead over several CPU devices (parallel.Pacer)
    try:
        for index, (x, y) in enumerate(s.feed.train(config.seed, epoch, first), start=first):
            if stop is not None and stop.reached(base + index):
                look(index)  # a divergence before the stop is reported as such
                figures = jax.device_get((acc["loss"], acc["accuracy"]))
                raise _StoppedError(index, state, *figures)
            state, step_metrics = s.train_step(state, x, y)
            acc = _record(acc, step_metrics, index)
            pace(step_metrics)  # the metrics, never donated: done means the step is done
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
    pace = feed.parallel.pacer()  # bounded host lead in CPU runs over several devices
    outputs = []
    for x, y, m in feed.test():
        outputs.append(eval_step(state, x, y, m))
        pace(outputs[-1])
    loss_sum = correct = count = 0
    for out in jax.device_get(outputs):  # summed in batch order, in float64, as always
        loss_sum += float(out["loss_sum"])
        correct += int(out["correct"])
        count += int(out["count"])
    if count != num_examples:  # a broken padding rule must never go unnoticed
        raise AssertionError(f"evaluated {count} examples, the test set has {num_examples}")
    return loss_sum / count, correct / count


def epoch_row(s: Setup, state, epoch: int, losses, accuracies) -> dict:
    """The epoch's ``metrics.jsonl`` row without its timings: the test figures are computed
    here."""
    test_loss, test_accuracy = evaluate(s.eval_step, state, s.feed, len(s.data.y_test))
    last_step = epoch * s.steps_per_epoch
    return {
        "epoch": epoch,
        "step": last_step,
        "lr": float(jax.device_get(s.schedule(last_step - 1))),
        "train_loss": float(np.mean(losses)),
        "train_accuracy": float(np.mean(accuracies)),
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
    }


def _stopped(
    run: Run,
    s: Setup,
    stopped: _StoppedError,
    epoch: int,
    first_step: int,
    saved: Saved | None,
    workdir: Workdir | None,
    stop: StopRequest,
    history: list[dict],
) -> Exception:
    """What a stop before step ``stopped.step`` of ``epoch`` leaves: with ``--workdir``, the
    mid-epoch checkpoint (unless no step ran since the newest checkpoint); the error to
    raise."""
    options, signum, state = run.options, stop.signum or signal.SIGTERM, stopped.state
    where = f"{stop.describe()} at epoch {epoch}, step {stopped.step}/{s.steps_per_epoch}"
    if workdir is None:
        return RunStoppedError(f"{where}; nothing was saved (no --workdir)", signum)
    if stopped.step > first_step:
        bad = _describe_nonfinite(nonfinite_leaves(state))
        if bad:  # a finite loss can come with an overflowing update: never save that
            return TrainingDivergedError(
                f"epoch {epoch} reached {bad} by step {stopped.step}: training diverged (try a "
                f"lower --lr){_kept(options, saved, epoch - 1)}",
                history,
            )
        mid = MidEpoch(epoch, stopped.step, stopped.losses, stopped.accuracies)
        workdir.checkpoints.save_mid_epoch(mid, state, s.steps_per_epoch)
        global_step = (epoch - 1) * s.steps_per_epoch + stopped.step
        saved = Saved(
            epoch, stopped.step, os.path.join(options.workdir, MID_EPOCH, str(global_step))
        )
        kept = f"saved: {saved.describe()}"
    elif saved is not None:
        kept = f"kept: {saved.describe()}"
    else:
        kept = "no checkpoint was saved yet"
    return RunStoppedError(f"{where}; {kept}; continue with: {continue_command(options)}", signum)


def _newest_saved(
    options: RunOptions, start_epoch: int, mid: MidEpoch | None, steps: int
) -> Saved | None:
    if mid is not None:
        path = os.path.join(options.workdir, MID_EPOCH, str((mid.epoch - 1) * steps + mid.step))
        return Saved(mid.epoch, mid.step, path)
    if start_epoch:
        return Saved(
            start_epoch, None, os.path.join(options.workdir, "checkpoints", str(start_epoch))
        )
    return None


def summary(run: Run, history: list[dict], seconds: float, steps: int, train_seconds: float):
    """The end-of-run line: final and best test accuracy, time, speed, where files are."""
    if not history:
        return "done: no epoch to train"
    best = max(history, key=lambda r: r["test_accuracy"])
    speed = f", {steps * run.config.batch_size / train_seconds:.0f} examples/s" if steps else ""
    text = (
        f"done: {len(history)} epoch(s); test accuracy {history[-1]['test_accuracy']:.4f} "
        f"final, {best['test_accuracy']:.4f} best (epoch {best['epoch']}); "
        f"{seconds:.1f}s in all{speed}"
    )
    if run.options.workdir:
        w = run.options.workdir.rstrip("/")
        text += f"; metrics: {w}/metrics.jsonl, checkpoints: {w}/checkpoints"
    return text


def run_script(run: Run | argparse.Namespace, make_model: ModelFactory) -> int:
    """Runs and turns the expected failures into a one-line error and an exit code: 1 for a
    divergence, 2 for bad flags/files, 130/143 for SIGINT/SIGTERM."""
    if not isinstance(run, Run):
        run = Run.from_flags(run)
    quiet = run.options.coordinator and not run.options.verbose
    gloo_filter = GlooLinesFilter() if quiet else None
    try:
        return _run_script(run, make_model)
    finally:
        if gloo_filter is not None:
            gloo_filter.close()


def _run_script(run: Run, make_model: ModelFactory) -> int:
    stop = StopRequest()
    try:
        with stop_on_signals(stop):
            train_and_evaluate(run, make_model, stop=stop)
    except RunStoppedError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop could look
        print(interrupted_message(run.options), file=sys.stderr)
        return 130
    except TrainingDivergedError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
    return 0


def join_cluster(run: Run) -> None:
    """Joins the ``--coordinator`` cluster (nothing without one).

    Raises:
      RunError: it could not be joined within ``--join-timeout``.
    """
    options = run.options
    if options.coordinator:
        try:
            jaxbn.multihost.initialize_multihost(
                options.coordinator,
                run.config.num_processes,
                options.process_id,
                timeout_seconds=math.ceil(options.join_timeout),  # the runtime takes whole seconds
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


def _kept(options: RunOptions, saved: Saved | None, finished: int) -> str:
    """What a divergence leaves on disk."""
    if not options.workdir:
        return ""
    if saved is None:
        return (
            f"; no checkpoint was saved in {options.workdir} (no epoch finished with finite values)"
        )
    rows = f" and the metrics of epochs 1-{finished}" if finished else ""
    note = ", the newest; every saved checkpoint is finite"
    return f"; kept: {saved.describe(note)}{rows}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
