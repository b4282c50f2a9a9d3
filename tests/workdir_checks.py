"""What the training-integrity tests read back from a workdir: the metrics rows, a checkpoint's
raw state, and exact comparisons of both."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

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
