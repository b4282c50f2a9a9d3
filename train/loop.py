"""The training loop shared by every script: data, optimizer, jit-compiled data-parallel steps,
progress, evaluation, metrics, checkpoints, resume."""

from __future__ import annotations

import argparse
import math
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
from train.batching import eval_batches, train_batches
from train.config import RunConfig
from train.datasets import Dataset, load_dataset
from train.download import ChecksumError, DatasetUnavailableError
from train.files import WorkdirError
from train.parallel import DataParallel
from train.workdir import open_workdir

ModelFactory = Callable[[argparse.Namespace, Dataset], nn.Module]


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
    variables: dict[str, Any]  # {"params", "batch_stats"} on the host


def make_optimizer(args: argparse.Namespace, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum (``--sgd-momentum``), weight decay and the learning-rate schedule —
    the same update as ``torch.optim.SGD(lr, momentum, weight_decay)``."""
    if args.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(args.lr, max(total_steps, 1))
    else:
        learning_rate = optax.constant_schedule(args.lr)
    return optax.chain(
        optax.add_decayed_weights(args.weight_decay),
        optax.sgd(learning_rate, momentum=args.sgd_momentum or None),
    )


def run(
    args: argparse.Namespace,
    make_model: ModelFactory,
    *,
    log: Callable[[str], None] = print,
    data: Dataset | None = None,
) -> RunResult:
    """Trains ``make_model(args, data)`` as the flags say; returns the history and variables.

    Raises:
      TrainingDivergedError: the loss, the test loss or the state became NaN/Inf; the epoch
        is neither logged nor saved, the earlier checkpoints stay as they are.
      WorkdirError: the workdir cannot be used (see ``train.workdir.open_workdir``).
      ValueError: flags that do not fit (batch vs devices or data, ...).
      RunError: the multi-host cluster could not be joined.
    """
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
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda _: None)
    data = data or load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    parallel = DataParallel(args.devices)
    parallel.check_batch(args.batch_size)
    steps_per_epoch = len(train_batches(len(data.y_train), args.batch_size, args.seed, 1))
    tx = make_optimizer(args, steps_per_epoch * args.epochs)
    model = make_model(args, data)

    def fresh_state():
        variables = model.init(jax.random.key(args.seed), data.x_train[:2], train=False)
        return parallel.replicate(
            {
                "params": variables["params"],
                "batch_stats": variables.get("batch_stats", {}),
                "opt_state": tx.init(variables["params"]),
            }
        )

    history: list[dict] = []
    start_epoch = 0
    saved_epoch = None  # the newest checkpoint on disk
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
            fresh_state,
            check_state=lambda s: _describe_nonfinite(nonfinite_leaves(s)),
            say=say,
            main_process=main_process,
        )
        state, start_epoch, history = workdir.state, workdir.start_epoch, workdir.history
        saved_epoch = workdir.saved_epoch
    else:
        state = fresh_state()
    say(
        f"{type(model).__name__} norm={args.norm} on {data.name} "
        f"({len(data.y_train)} train / {len(data.y_test)} test), {parallel.size} device(s), "
        f"batch {args.batch_size}, {steps_per_epoch} steps/epoch"
    )

    train_step = parallel.train_step(model, tx, args.batch_size)
    eval_step = parallel.eval_step(model)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        started = time.perf_counter()
        losses, accuracies = [], []
        bar = tqdm(
            train_batches(len(data.y_train), args.batch_size, args.seed, epoch),
            desc=f"epoch {epoch}/{args.epochs}",
            leave=False,
            disable=None if main_process else True,  # None: only on a terminal
        )
        for indices in bar:
            x, y = parallel.shard(data.x_train[indices], data.y_train[indices])
            state, step_metrics = train_step(state, x, y)
            loss = float(step_metrics["loss"])
            if not math.isfinite(loss):
                bar.close()
                raise TrainingDivergedError(
                    f"loss became {loss} at epoch {epoch}, step {len(losses) + 1}: training "
                    f"diverged (try a lower --lr){_kept(args, saved_epoch)}",
                    history,
                )
            losses.append(loss)
            accuracies.append(float(step_metrics["accuracy"]))
            bar.set_postfix(loss=f"{loss:.4f}")
        test_loss, test_accuracy = evaluate(parallel, eval_step, state, data, args.batch_size)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accuracies)),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "seconds": round(time.perf_counter() - started, 3),
        }
        # Never report or save an epoch that ended in NaN/Inf: its checkpoint would be kept as
        # "good" and every --resume would start from it.
        bad = _describe_nonfinite(nonfinite_leaves(state))
        if bad or not (math.isfinite(test_loss) and math.isfinite(row["train_loss"])):
            raise TrainingDivergedError(
                f"epoch {epoch} ended with {bad or f'test loss {test_loss}'}: training diverged "
                f"(try a lower --lr){_kept(args, saved_epoch)}",
                history,
            )
        say(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
            f"  test loss {test_loss:.4f} acc {test_accuracy:.4f}  {row['seconds']:.1f}s"
        )
        if workdir:
            # Metrics first: a crash between the two leaves a row without a checkpoint, which
            # --resume drops and recomputes; the other order would lose the row for good.
            if main_process:
                workdir.metrics.append(row)
            workdir.checkpoints.save(epoch, state)
            saved_epoch = epoch
        history.append(row)
    if workdir:
        workdir.checkpoints.close()
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    if args.inspect:
        say(str(jaxbn.inspect_batchnorm(host)))
    return RunResult(history, host)


def evaluate(parallel, eval_step, state, data: Dataset, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over the test set, each example counted exactly once."""
    loss_sum = correct = count = 0
    for indices, mask in eval_batches(len(data.y_test), batch_size):
        x, y, m = parallel.shard(data.x_test[indices], data.y_test[indices], mask)
        out = eval_step(state, x, y, m)
        loss_sum += float(out["loss_sum"])
        correct += int(out["correct"])
        count += int(out["count"])
    if count != len(data.y_test):  # a broken padding rule must never go unnoticed
        raise AssertionError(f"evaluated {count} examples, the test set has {len(data.y_test)}")
    return loss_sum / count, correct / count


def run_script(args: argparse.Namespace, make_model: ModelFactory) -> int:
    """Runs and turns the expected failures into a one-line error and an exit code."""
    try:
        run(args, make_model)
    except TrainingDivergedError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        return 2
    return 0


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
    return [p for p, ok in zip(paths, _finite_flags(floats), strict=True) if not bool(ok)]


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


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
