"""Opening ``--workdir`` for a fresh or a resumed run: make sure every process sees the same
directory, refuse to mix runs, restore the newest good checkpoint, and line the metrics log up
with it.

What a workdir holds: ``config.json`` (the run's :class:`~train.config.RunConfig`, written
first), ``metrics.jsonl`` (one row per finished epoch), ``checkpoints/<epoch>`` (the newest
``--keep``, default 2) and, after a stop inside an epoch, ``mid-epoch/<global step>`` (see
``train.checkpoint``). Every file is written atomically; an epoch counts as finished when its
checkpoint exists.

Several processes: orbax writes a checkpoint from every process (each its part, and process 0
the metadata), so ``--workdir`` must be one directory on a filesystem all processes share. That
is checked before anything is read or written there (:func:`check_shared`).
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from train.checkpoint import MID_EPOCH, Checkpoints, MetricsLog, MidEpoch
from train.config import FILENAME, Run, RunConfig
from train.files import WorkdirError, atomic_write_text

MARKER = ".shared-filesystem-check"  # written by process 0, looked for by the others
POLL_SECONDS = 0.05


@dataclass
class Workdir:
    checkpoints: Checkpoints
    metrics: MetricsLog
    start_epoch: int  # the last finished epoch (0: none)
    state: Any  # the restored state, or the fresh one
    history: list[dict]  # the metrics rows of the finished epochs
    mid_epoch: MidEpoch | None = None  # the epoch in progress, if resumed from inside one


def open_workdir(
    run: Run,
    config: RunConfig,
    fresh_state: Callable[[], Any],
    *,
    steps_per_epoch: int,
    check_state: Callable[[Any], str | None],
    say: Callable[[str], None],
    main_process: bool,
) -> Workdir:
    """Prepares ``run.options.workdir`` for the run ``config``: checks first, then
    ``fresh_state()`` (built only once the workdir is known to fit) or the restored state.

    Raises:
      WorkdirError: the workdir cannot be used (not a directory, not writable, not shared by
        all processes, holds another run, its files are unreadable, or ``--resume`` flags
        differ from the saved run's).
    """
    options = run.options
    path = pathlib.Path(options.workdir)
    problem = None
    try:
        _make_directory(path)
    except WorkdirError as err:
        problem = str(err)
    if jax.process_count() > 1:
        problem = check_shared(path, options.join_timeout, problem)
    if problem:
        raise WorkdirError(problem)
    metrics = MetricsLog(path)
    finished = _finished_epochs(path / "checkpoints")
    in_progress = _mid_epoch_steps(path / MID_EPOCH)

    if not options.resume:
        held = [f"checkpoints of epochs {', '.join(map(str, finished))}"] if finished else []
        held += [f"a mid-epoch checkpoint: {MID_EPOCH}/{in_progress[0]}"] if in_progress else []
        held += [name for name in (metrics.path.name, FILENAME) if (path / name).exists()]
        if held:
            raise WorkdirError(
                f"{path} already holds a run ({'; '.join(held)}): pass --resume to continue "
                "it, or choose another --workdir"
            )
    else:
        if finished and config.epochs < max(finished):
            raise WorkdirError(
                f"--epochs {config.epochs} is below the {max(finished)} epochs the run in "
                f"{path} has already finished (pass --epochs {max(finished)} or more)"
            )
        started = max((s // steps_per_epoch + 1 for s in in_progress), default=0)
        if config.epochs < started:
            raise WorkdirError(
                f"--epochs {config.epochs} is below epoch {started}, which the run in {path} "
                f"stopped in the middle of (pass --epochs {started} or more)"
            )
        saved = RunConfig.load(path)
        if saved is None and (finished or in_progress or metrics.path.exists()):
            say(f"note: {path} has no {FILENAME} (an older version's run): flags not compared")
        elif saved is not None:
            _check_same_run(saved, config, path)

    if jax.process_count() > 1:  # every process checks before process 0 writes
        multihost_utils.sync_global_devices("jaxbn: workdir checked")
    if main_process:
        config.save(path)  # also proves that the workdir is writable before any training
    try:
        checkpoints = Checkpoints(path, keep=options.keep)
    except OSError as err:
        raise WorkdirError(f"cannot use {path / 'checkpoints'}: {err.strerror or err}") from err
    state = fresh_state()
    if not options.resume:
        return Workdir(checkpoints, metrics, 0, state, [])

    found = checkpoints.restore_newest(state, check_state, steps_per_epoch)
    start_epoch, mid_epoch = 0, None
    if found is not None:
        start_epoch, state, mid_epoch = found.epoch, found.state, found.mid_epoch
        for note in found.notes:
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
    if mid_epoch:
        say(
            f"resumed from {path} at epoch {mid_epoch.epoch}, step "
            f"{mid_epoch.step}/{steps_per_epoch} (a mid-epoch checkpoint)"
        )
    elif start_epoch:
        say(f"resumed from {path} after epoch {start_epoch}")
    else:
        say(f"no checkpoint in {path}: starting from scratch")
    return Workdir(checkpoints, metrics, start_epoch, state, history, mid_epoch)


def check_shared(path: pathlib.Path, timeout: float, problem: str | None = None) -> str | None:
    """Whether every process sees the directory process 0 calls ``path``: process 0 writes a
    fresh random token into ``path/MARKER``, the others wait up to ``timeout`` seconds to read
    it there. Collective: every process calls it, also one whose ``problem`` (its own error
    with the workdir, or None) already stops it, so that no process waits for another forever.

    Returns the message every process must stop with (None: the directory is shared).
    """
    me = jax.process_index()
    marker = path / MARKER
    token = np.zeros(16, np.uint8)
    if me == 0 and problem is None:
        fresh = np.frombuffer(os.urandom(16), np.uint8)
        try:
            atomic_write_text(marker, fresh.tobytes().hex())
            token = fresh
        except WorkdirError as err:
            problem = str(err)
    # the token travels only after the file is written: a process never looks too early
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    seen = True
    if me != 0 and problem is None and token.any():
        seen = _wait_for(marker, token.tobytes().hex(), timeout)
    status = np.array([problem is not None, not seen], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(status))  # [processes, 2]
    if me == 0:
        marker.unlink(missing_ok=True)
    if problem:
        return problem
    failed = [int(p) for p in np.flatnonzero(everyone[:, 0])]
    if failed:
        return f"process(es) {', '.join(map(str, failed))} cannot use --workdir {path} (see there)"
    unseen = [int(p) for p in np.flatnonzero(everyone[:, 1])]
    if unseen:
        return (
            f"--workdir {path} is not one filesystem shared by all processes: process(es) "
            f"{', '.join(map(str, unseen))} did not see the file process 0 wrote there within "
            f"{timeout:g} s (--join-timeout); every process writes its part of each checkpoint, "
            "so a multi-process run needs a --workdir on a filesystem they all share"
        )
    return None


def _wait_for(marker: pathlib.Path, token: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if marker.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def _make_directory(path: pathlib.Path) -> None:
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"cannot create --workdir {path}: {err.strerror or err}") from err


def _finished_epochs(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _mid_epoch_steps(directory: pathlib.Path) -> list[int]:
    return _finished_epochs(directory)[::-1]  # the same naming: <number>, newest first


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
