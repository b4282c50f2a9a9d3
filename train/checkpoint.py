"""Checkpoints (orbax) of the whole training state, and the metrics log.

``WORKDIR/checkpoints/<epoch>`` is written after every epoch; the newest ``--keep`` are kept.
A run stopped inside an epoch (SIGTERM, SIGINT) writes ``WORKDIR/mid-epoch/<global step>``:
the state after that step and the epoch's step figures so far, so that ``--resume`` continues
at the next step and logs the same epoch row. At most one mid-epoch checkpoint exists: a newer
one replaces it, and the next epoch checkpoint (which supersedes it) removes it; it never counts
towards ``--keep`` and never displaces an epoch checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.files import WorkdirError, atomic_write_text

MID_EPOCH = "mid-epoch"  # the directory of the mid-epoch checkpoint, beside checkpoints/


@dataclass
class MidEpoch:
    """Where a stopped epoch was: ``step`` of its steps done, and their figures (float32,
    ``[steps per epoch]``; the first ``step`` entries are set, the rest are 0)."""

    epoch: int
    step: int
    losses: np.ndarray
    accuracies: np.ndarray


@dataclass
class Restored:
    """What ``--resume`` continues from: the last finished epoch, the state, and the epoch in
    progress when the checkpoint was a mid-epoch one."""

    epoch: int
    state: Any
    mid_epoch: MidEpoch | None
    notes: list[str]  # one per rejected (newer) checkpoint


class _Manager(ocp.CheckpointManager):
    """An orbax ``CheckpointManager`` that never asks JAX's preemption sync point itself.

    orbax's ``save(step)`` calls ``multihost_utils.reached_preemption_sync_point(step)``; the
    epoch checkpoints are numbered by epoch, not by global step, so in a multi-process run
    that call would make the sync manager's latest step the epoch number. A preemption notice
    arriving during an epoch save then sets the sync point to ``epoch + 1``, a step the loop
    (which asks with global steps, see ``train.stopping.StopRequest``) has long passed: no process
    would ever stop. The loop alone asks, and saves when told.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpoints:
    """``WORKDIR/checkpoints/<epoch>`` (params, batch_stats and optimizer state) and the
    mid-epoch checkpoint ``WORKDIR/mid-epoch/<global step>`` (see the module docstring).

    orbax writes each checkpoint into a temporary directory and renames it when complete, so a
    kill during a save leaves no step directory (the previous checkpoints are untouched); the
    leftover temporary one is removed when the workdir is next opened. The newest ``keep``
    epoch checkpoints are kept.
    """

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, *, read_only: bool = False):
        """``read_only``: only read the epoch checkpoints (``train.evaluate``): nothing is
        created, deleted or cleaned up, so that a run still writing into the workdir (its
        checkpoint in progress is a temporary directory) is left alone; the mid-epoch
        checkpoint is not opened."""
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.mid_directory = self.workdir / MID_EPOCH
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            )
        self.manager = _Manager(self.directory, options=options)
        # Opened only where one exists (and then its leftover temporary directory is removed),
        # so that a run that is never stopped leaves no empty directory behind.
        self._mid_manager = (
            self._open_mid_epoch() if self.mid_directory.is_dir() and not read_only else None
        )

    def _open_mid_epoch(self) -> ocp.CheckpointManager:
        return _Manager(
            self.mid_directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, cleanup_tmp_directories=True
            ),
        )

    def save(self, epoch: int, state: Any) -> None:
        """The checkpoint of a finished epoch; it supersedes the mid-epoch one, removed after."""
        self.manager.save(epoch, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()  # a checkpoint exists before the epoch is reported
        self._remove_mid_epoch(self.mid_epoch_steps())

    def save_mid_epoch(self, mid: MidEpoch, state: Any, steps_per_epoch: int) -> pathlib.Path:
        """The checkpoint of a stopped epoch, named by its global step; returns its path. The
        previous mid-epoch checkpoint is removed only once this one is complete."""
        step = (mid.epoch - 1) * steps_per_epoch + mid.step
        if self._mid_manager is None:
            self._mid_manager = self._open_mid_epoch()
        item = {
            "state": state,
            "losses": np.asarray(mid.losses, np.float32),
            "accuracies": np.asarray(mid.accuracies, np.float32),
            "epoch": np.array(mid.epoch),
            "step": np.array(mid.step),
        }
        self._mid_manager.save(step, args=ocp.args.StandardSave(item))
        self._mid_manager.wait_until_finished()
        return self.mid_directory / str(step)

    def epochs(self) -> list[int]:
        """Epochs with a (complete-looking) checkpoint, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def mid_epoch_steps(self) -> list[int]:
        """Global steps of the mid-epoch checkpoints on disk, newest first (normally 0 or 1)."""
        if self._mid_manager is None:
            return []
        return sorted(self._mid_manager.all_steps(), reverse=True)

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, epoch: int, like: Any) -> Any:
        """The state saved after ``epoch``, with the shapes, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))

    def restore_mid_epoch(self, step: int, like: Any, steps_per_epoch: int) -> tuple[Any, MidEpoch]:
        """``(state, MidEpoch)`` of the mid-epoch checkpoint of global step ``step``.

        Raises:
          ValueError: it was saved with another number of steps per epoch.
        """
        abstract = {
            "state": jax.tree.map(ocp.utils.to_shape_dtype_struct, like),
            "losses": np.zeros(steps_per_epoch, np.float32),
            "accuracies": np.zeros(steps_per_epoch, np.float32),
            "epoch": np.array(0),
            "step": np.array(0),
        }
        item = self._mid_manager.restore(step, args=ocp.args.StandardRestore(abstract))
        mid = MidEpoch(int(item["epoch"]), int(item["step"]), item["losses"], item["accuracies"])
        if (mid.epoch - 1) * steps_per_epoch + mid.step != step or not 0 < mid.step < (
            steps_per_epoch
        ):
            raise ValueError(
                f"it holds epoch {mid.epoch}, step {mid.step}, which is not global step {step} "
                f"at {steps_per_epoch} steps per epoch"
            )
        if not (np.all(np.isfinite(mid.losses)) and np.all(np.isfinite(mid.accuracies))):
            raise ValueError("NaN/Inf in its step losses")
        return item["state"], mid

    def restore_newest(
        self,
        like: Any,
        check: Callable[[Any], str | None] = lambda _: None,
        steps_per_epoch: int | None = None,
    ) -> Restored | None:
        """The newest checkpoint, epoch or mid-epoch (ordered by global step), that restores
        and passes ``check`` (None: fine, else why not). ``steps_per_epoch`` places the
        mid-epoch checkpoint among the epoch ones (None: it is not considered).

        Newer checkpoints that fail are moved to ``WORKDIR/rejected-checkpoints/`` (kept for a
        post-mortem, out of the way of the checkpoints that will be saved again); a mid-epoch
        checkpoint older than the one restored (superseded) is removed. Returns None if there
        are no checkpoints.

        Raises:
          WorkdirError: checkpoints exist but none restores (nothing is moved then: a model
            that does not fit them must not cost the checkpoints).
        """
        candidates = [(epoch * (steps_per_epoch or 1), epoch, None) for epoch in self.epochs()]
        if steps_per_epoch:
            candidates += [(step, None, step) for step in self.mid_epoch_steps()]
        candidates.sort(key=lambda c: c[0], reverse=True)
        failures: list[tuple[str, pathlib.Path, str]] = []
        for position, epoch, mid_step in candidates:
            if mid_step is None:
                name, directory = f"epoch {epoch}", self.directory / str(epoch)
            else:
                name = (
                    f"epoch {mid_step // steps_per_epoch + 1}, step "
                    f"{mid_step % steps_per_epoch} (mid-epoch)"
                )
                directory = self.mid_directory / str(mid_step)
            mid = None
            reason = _incomplete(directory)
            if reason is None:
                try:
                    if mid_step is None:
                        state = self.restore(epoch, like)
                    else:
                        state, mid = self.restore_mid_epoch(mid_step, like, steps_per_epoch)
                    reason = check(state)
                except Exception as err:  # orbax/tensorstore raise many types for bad files
                    reason = f"{type(err).__name__}: {_first_line(err)}"
            if reason is None:
                notes = [self._reject(d, n, why) for n, d, why in failures]
                stale = [s for s in self.mid_epoch_steps() if s < position]
                self._remove_mid_epoch(stale, sync=not failures)
                if failures:
                    if jax.process_count() > 1:
                        from jax.experimental import multihost_utils

                        multihost_utils.sync_global_devices("rejected checkpoints moved")
                    self.manager.reload()
                    if self._mid_manager is not None:
                        self._mid_manager.reload()
                finished = epoch if mid is None else mid.epoch - 1
                return Restored(finished, state, mid, notes)
            failures.append((name, directory, reason))
        if failures:
            raise WorkdirError(
                f"no checkpoint in {self.workdir} can be restored: "
                + "; ".join(f"{name}: {why}" for name, _, why in failures)
            )
        return None

    def _remove_mid_epoch(self, steps: list[int], *, sync: bool = True) -> None:
        """Removes superseded mid-epoch checkpoints (process 0; the others wait for it), and
        the directory with the last of them (or when a kill left it empty)."""
        if self._mid_manager is None:
            return
        last = set(steps) == set(self.mid_epoch_steps())
        if not steps and not last:
            return
        if last:
            self._mid_manager.close()
            self._mid_manager = None
        if jax.process_count() > 1:  # no process still reads what process 0 removes
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("removing mid-epoch checkpoints")
        if jax.process_index() == 0:
            for step in steps:
                shutil.rmtree(self.mid_directory / str(step), ignore_errors=True)
            if last:
                shutil.rmtree(self.mid_directory, ignore_errors=True)
        if sync and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("superseded mid-epoch checkpoint removed")
        if self._mid_manager is not None:
            self._mid_manager.reload()

    def _reject(self, directory: pathlib.Path, name: str, reason: str) -> str:
        epoch_checkpoint = directory.parent == self.directory
        if jax.process_index() == 0:
            label = directory.name if epoch_checkpoint else f"{MID_EPOCH}-{directory.name}"
            target = self.workdir / "rejected-checkpoints" / label
            suffix = 1
            while target.exists():
                suffix += 1
                target = target.with_name(f"{label}-{suffix}")
            target.parent.mkdir(exist_ok=True)
            shutil.move(directory, target)
        if epoch_checkpoint:
            return f"skipped the checkpoint of {name} ({reason})"
        return f"skipped the mid-epoch checkpoint of {name.removesuffix(' (mid-epoch)')} ({reason})"

    def close(self) -> None:
        self.manager.close()
        if self._mid_manager is not None:
            self._mid_manager.close()


def _incomplete(step: pathlib.Path) -> str | None:
    if not any(step.iterdir()):
        return "its directory is empty"
    for required in ("_CHECKPOINT_METADATA", "default/_METADATA"):
        if not (step / required).exists():
            return f"{required} is missing"
    return None


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
