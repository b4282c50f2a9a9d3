"""What the training-integrity tests read back from a workdir: the metrics rows, a checkpoint's
raw state, and exact comparisons of both; and a signal sent during a chosen training step."""

from __future__ import annotations

import json
import os
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.parallel import DataParallel

TIMINGS = ("seconds", "examples_per_second")  # the only fields that vary between runs


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def logged(workdir) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` ([] if there is none)."""
    path = pathlib.Path(workdir, "metrics.jsonl")
    return [json.loads(line) for line in path.open()] if path.exists() else []


def saved(workdir, epoch: int):
    """The raw state of the checkpoint of ``epoch``, as numpy leaves."""
    manager = ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints").absolute())
    state = manager.restore(epoch, args=ocp.args.StandardRestore())
    manager.close()
    return jax.tree.map(np.array, state)


def assert_same_leaves(a, b) -> None:
    """Bit-identical trees (and not two empty ones)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def signal_at_step(patch, step: int, signum=signal.SIGTERM):
    """The process sends itself ``signum`` during its ``step``-th training step (from 1)."""
    real_train_step, calls = DataParallel.train_step, []

    def train_step(self, model, tx, batch_size):
        step_fn = real_train_step(self, model, tx, batch_size)

        def signalled(state, x, y):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signum)
            return step_fn(state, x, y)

        return signalled

    patch.setattr(DataParallel, "train_step", train_step)
