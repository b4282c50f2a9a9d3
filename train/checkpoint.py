"""Checkpoints (orbax) of the whole training state, one per epoch, and the metrics log."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """``WORKDIR/checkpoints/<epoch>``: params, batch_stats and optimizer state."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            pathlib.Path(workdir, "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, epoch: int, state: Any) -> None:
        self.manager.save(epoch, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()  # a checkpoint exists before the epoch is reported

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, epoch: int, like: Any) -> Any:
        """The state saved after ``epoch``, with the shapes, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()


class MetricsLog:
    """``WORKDIR/metrics.jsonl``: one JSON object per finished epoch."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir, "metrics.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self, up_to_epoch: int | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]

    def rewrite(self, rows: list[dict]) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
