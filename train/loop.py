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
import numpy as np
import optax
from tqdm import tqdm

import jaxbn
from train.batching import eval_batches, train_batches
from train.checkpoint import Checkpoints, MetricsLog
from train.datasets import Dataset, load_dataset
from train.download import ChecksumError, DatasetUnavailableError
from train.parallel import DataParallel

ModelFactory = Callable[[argparse.Namespace, Dataset], nn.Module]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf; ``history`` holds the finished epochs."""

    def __init__(self, message: str, history: list[dict]):
        super().__init__(message)
        self.history = history


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
      TrainingDivergedError: the loss became NaN/Inf (the last checkpoint is left intact).
      ValueError: flags that do not fit (batch vs devices, existing checkpoints, ...).
    """
    if args.coordinator:
        jaxbn.multihost.initialize_multihost(args.coordinator, args.num_processes, args.process_id)
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda _: None)
    data = data or load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    parallel = DataParallel(args.devices)
    parallel.check_batch(args.batch_size)
    steps_per_epoch = len(train_batches(len(data.y_train), args.batch_size, args.seed, 1))
    tx = make_optimizer(args, steps_per_epoch * args.epochs)
    model = make_model(args, data)
    variables = model.init(jax.random.key(args.seed), data.x_train[:2], train=False)
    state = parallel.replicate(
        {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"]),
        }
    )

    history: list[dict] = []
    start_epoch = 0
    checkpoints = metrics = None
    if args.workdir:
        checkpoints, metrics = Checkpoints(args.workdir), MetricsLog(args.workdir)
        latest = checkpoints.latest_epoch()
        if args.resume and latest is not None:
            state = checkpoints.restore(latest, state)
            start_epoch = latest
            history = metrics.read(up_to_epoch=latest)
            if main_process:
                metrics.rewrite(history)  # drop rows of epochs whose checkpoint never landed
            say(f"resumed from {args.workdir} after epoch {latest}")
        elif args.resume:
            say(f"no checkpoint in {args.workdir}: starting from scratch")
        elif latest is not None:
            raise ValueError(
                f"{args.workdir} already holds checkpoints (epoch {latest}): pass --resume to "
                "continue that run, or choose another --workdir"
            )
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
                kept = f"; the checkpoint of epoch {epoch - 1} is intact" if checkpoints else ""
                raise TrainingDivergedError(
                    f"loss became {loss} at epoch {epoch}, step {len(losses) + 1}: training "
                    f"diverged (try a lower --lr){kept}",
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
        say(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
            f"  test loss {test_loss:.4f} acc {test_accuracy:.4f}  {row['seconds']:.1f}s"
        )
        if checkpoints:
            # Metrics first: a crash between the two leaves a row without a checkpoint, which
            # --resume drops and recomputes; the other order would lose the row for good.
            if main_process:
                metrics.append(row)
            checkpoints.save(epoch, state)
        history.append(row)
    if checkpoints:
        checkpoints.close()
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
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (DatasetUnavailableError, ChecksumError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
