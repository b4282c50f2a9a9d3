"""Checkpoints (orbax) of the whole training state, one per epoch, and the metrics log."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.files import WorkdirError, atomic_write_text


class Checkpoints:
    """``WORKDIR/checkpoints/<epoch>``: params, batch_stats and optimizer state.

    orbax writes each checkpoint into a temporary directory and renames it when complete, so a
    kill during a save leaves no step directory; the leftover temporary one is removed when the
    workdir is next opened. The newest ``keep`` checkpoints are kept.
    """

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
        )

    def save(self, epoch: int, state: Any) -> None:
        self.manager.save(epoch, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()  # a checkpoint exists before the epoch is reported

    def epochs(self) -> list[int]:
        """Epochs with a (complete-looking) checkpoint, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, epoch: int, like: Any) -> Any:
        """The state saved after ``epoch``, with the shapes, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))

    def restore_newest(
        self, like: Any, check: Callable[[Any], str | None] = lambda _: None
    ) -> tuple[int, Any, list[str]] | None:
        """The newest checkpoint that restores and passes ``check`` (None: fine, else why not).

        Newer checkpoints that fail are moved to ``WORKDIR/rejected-checkpoints/`` (kept for a
        post-mortem, out of the way of the epochs that will be saved again). Returns ``(epoch,
        state, notes)`` with one note per rejected checkpoint, or None if there are none.

        Raises:
          WorkdirError: checkpoints exist but none restores (nothing is moved then: a model
            that does not fit them must not cost the checkpoints).
        """
        failures: list[tuple[int, str]] = []
        for epoch in self.epochs():
            reason = self._incomplete(epoch)
            if reason is None:
                try:
                    state = self.restore(epoch, like)
                    reason = check(state)
                except Exception as err:  # orbax/tensorstore raise many types for bad files
                    reason = f"{type(err).__name__}: {_first_line(err)}"
            if reason is None:
                notes = [self._reject(e, why) for e, why in failures]
                if failures:
                    if jax.process_count() > 1:
                        from jax.experimental import multihost_utils

                        multihost_utils.sync_global_devices("rejected checkpoints moved")
                    self.manager.reload()
                return epoch, state, notes
            failures.append((epoch, reason))
        if failures:
            raise WorkdirError(
                f"no checkpoint in {self.directory} can be restored: "
                + "; ".join(f"epoch {e}: {why}" for e, why in failures)
            )
        return None

    def _incomplete(self, epoch: int) -> str | None:
        step = self.directory / str(epoch)
        if not any(step.iterdir()):
            return "its directory is empty"
        for required in ("_CHECKPOINT_METADATA", "default/_METADATA"):
            if not (step / required).exists():
                return f"{required} is missing"
        return None

    def _reject(self, epoch: int, reason: str) -> str:
        if jax.process_index() == 0:
            target = self.workdir / "rejected-checkpoints" / str(epoch)
            suffix = 1
            while target.exists():
                suffix += 1
                target = target.with_name(f"{epoch}-{suffix}")
            target.parent.mkdir(exist_ok=True)
            shutil.move(self.directory / str(epoch), target)
        return f"skipped the checkpoint of epoch {epoch} ({reason})"

    def close(self) -> None:
        self.manager.close()


class MetricsLog:
    """``WORKDIR/metrics.jsonl``: one JSON object per finished epoch, rewritten atomically."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir, "metrics.jsonl")

    def read(self, up_to_epoch: int | None = None) -> list[dict]:
        """The rows (of epochs ``<= up_to_epoch``).

        Raises:
          WorkdirError: a line is not a JSON object with an epoch (names the file and line).
        """
        if not self.path.exists():
            return []
        rows = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                    raise ValueError("not a JSON object with an integer 'epoch'")
            except ValueError as err:
                raise WorkdirError(f"{self.path}, line {number}: {err}") from err
            rows.append(row)
        return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]

    def rewrite(self, rows: list[dict]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict) -> None:
        self.rewrite([*self.read(), row])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else "(no message)"
    return line if len(line) <= 200 else line[:197] + "..."
