"""Opening ``--workdir`` for a fresh or a resumed run: refuse to mix runs, restore the newest
good checkpoint, and line the metrics log up with it.

What a workdir holds: ``config.json`` (the run's :class:`~train.config.RunConfig`, written
first), ``metrics.jsonl`` (one row per finished epoch) and ``checkpoints/<epoch>`` (the newest
``--keep``, default 2). Every file is written atomically; an epoch counts as finished when its
checkpoint exists.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from jax.experimental import multihost_utils

from train.checkpoint import Checkpoints, MetricsLog
from train.config import FILENAME, RunConfig
from train.files import WorkdirError


@dataclass
class Workdir:
    checkpoints: Checkpoints
    metrics: MetricsLog
    start_epoch: int  # the last finished epoch (0: none)
    state: Any  # the restored state, or the fresh one
    history: list[dict]  # the metrics rows of the finished epochs

    @property
    def saved_epoch(self) -> int | None:
        """The epoch whose checkpoint is the newest on disk (None: no checkpoint yet)."""
        return self.start_epoch or None


def open_workdir(
    args: argparse.Namespace,
    config: RunConfig,
    fresh_state: Callable[[], Any],
    *,
    check_state: Callable[[Any], str | None],
    say: Callable[[str], None],
    main_process: bool,
) -> Workdir:
    """Prepares ``args.workdir`` for the run ``config``: checks first, then ``fresh_state()``
    (built only once the workdir is known to fit) or the restored state.

    Raises:
      WorkdirError: the workdir cannot be used (not a directory, not writable, holds another
        run, its files are unreadable, or ``--resume`` flags differ from the saved run's).
    """
    path = pathlib.Path(args.workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"cannot create --workdir {path}: {err.strerror or err}") from err
    metrics = MetricsLog(path)
    finished = _finished_epochs(path / "checkpoints")

    if not args.resume:
        held = [f"checkpoints of epochs {', '.join(map(str, finished))}"] if finished else []
        held += [name for name in (metrics.path.name, FILENAME) if (path / name).exists()]
        if held:
            raise WorkdirError(
                f"{path} already holds a run ({'; '.join(held)}): pass --resume to continue "
                "it, or choose another --workdir"
            )
    else:
        if finished and args.epochs < max(finished):
            raise WorkdirError(
                f"--epochs {args.epochs} is below the {max(finished)} epochs the run in {path} "
                f"has already finished (pass --epochs {max(finished)} or more)"
            )
        saved = RunConfig.load(path)
        if saved is None and (finished or metrics.path.exists()):
            say(f"note: {path} has no {FILENAME} (an older version's run): flags not compared")
        elif saved is not None:
            _check_same_run(saved, config, path)

    if jax.process_count() > 1:  # every process checks before process 0 writes
        multihost_utils.sync_global_devices("jaxbn: workdir checked")
    if main_process:
        config.save(path)  # also proves that the workdir is writable before any training
    try:
        checkpoints = Checkpoints(path, keep=getattr(args, "keep", 2))
    except OSError as err:
        raise WorkdirError(f"cannot use {path / 'checkpoints'}: {err.strerror or err}") from err
    state = fresh_state()
    if not args.resume:
        return Workdir(checkpoints, metrics, 0, state, [])

    found = checkpoints.restore_newest(state, check_state)
    start_epoch = 0
    if found is not None:
        start_epoch, state, notes = found
        for note in notes:
            say(note)
    rows = metrics.read()
    history = [r for r in rows if r["epoch"] <= start_epoch]
    if [r["epoch"] for r in history] != list(range(1, start_epoch + 1)):
        raise WorkdirError(
            f"{metrics.path} holds the epochs {[r['epoch'] for r in history]}, but the "
            f"checkpoint is of epoch {start_epoch}: its rows 1..{start_epoch} must all be there"
        )
    if main_process and len(rows) != len(history):
        metrics.rewrite(history)  # rows of epochs whose checkpoint never landed
        say(f"dropped {len(rows) - len(history)} metrics row(s) of epochs without a checkpoint")
    if start_epoch:
        say(f"resumed from {path} after epoch {start_epoch}")
    else:
        say(f"no checkpoint in {path}: starting from scratch")
    return Workdir(checkpoints, metrics, start_epoch, state, history)


def _finished_epochs(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _check_same_run(saved: RunConfig, config: RunConfig, path: pathlib.Path) -> None:
    # A constant schedule does not depend on the run's length: only then may --epochs change.
    ignore = ("epochs",) if saved.schedule == config.schedule == "constant" else ()
    changes = saved.changes(config, ignore=ignore)
    if not changes:
        return
    why = (
        "; the cosine schedule spans --epochs, so only a --schedule constant run can be extended"
        if any(c.startswith("--epochs ") for c in changes)
        else ""
    )
    raise WorkdirError(
        f"--resume continues the run saved in {path / FILENAME}, but these flags differ "
        f"(saved -> now): {', '.join(changes)}{why}; repeat the saved values, or choose "
        "another --workdir"
    )
