"""Stopping a run cleanly.

SIGINT and SIGTERM end the run at a step boundary. With ``--workdir`` the state and
the epoch's step figures so far are saved as a mid-epoch checkpoint, from which ``--resume``
continues at the next step, bit for bit the uninterrupted run. In a multi-process run JAX's
preemption notifier takes SIGTERM (a scheduler's notice to any process reaches all of them) and
every process asks :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` before
each step, so all stop at the same step; SIGINT is turned into such a notice.

:class:`StopRequest` is what the signals set and the loop asks before each step;
:class:`RunStoppedError` the stop's exception (its message says where, what is saved and how to
continue); :func:`interrupted_message` the line for a Ctrl-C that could not wait for a step.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from typing import Any

from train.checkpoint import MID_EPOCH
from train.config import RunOptions


class RunStoppedError(Exception):
    """SIGINT or SIGTERM stopped the run between two steps; the message says where, what is
    saved and how to continue. ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Set by SIGINT/SIGTERM (see :func:`stop_on_signals`); the loop asks :meth:`reached`
    before every step, so a save in progress always completes. A second SIGINT interrupts at
    once (also after a SIGTERM).

    In a cluster (``cluster=True``) SIGTERM never reaches Python: JAX's preemption notifier
    takes it and tells every process, and :meth:`reached` is the preemption sync point, the
    same step on all of them. A SIGINT (one process's Ctrl-C) is passed on as such a notice.
    A later signal of the other kind does not change the stop: a SIGTERM followed by a Ctrl-C
    still ends as preempted (143), which a scheduler reads as "requeue".
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.cluster = False
        self.sigints = 0
        # set when the stop came from another process's Ctrl-C: that process's index
        self.passed_on_from: int | None = None

    def __call__(self, signum: int, frame: Any = None) -> None:
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints > 1:  # Ctrl-C twice: stop now, whatever signal came first
                raise KeyboardInterrupt
        if self.signum is None:  # the first names the stop and its exit status (143 or 130)
            self.signum = signum
        if self.cluster and signum == signal.SIGINT:
            _publish_sigint()  # so that the other processes can say what stopped them
            self.notify_cluster()

    def notify_cluster(self) -> None:
        """Passes a stop on to every process: a SIGTERM to this one reaches JAX's notifier."""
        os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to stop before global step ``step`` (every process calls it with the same
        steps, in order)."""
        if not self.cluster:
            return self.signum is not None
        from jax.experimental import multihost_utils

        try:  # a C++ call under a lock; it talks to the other processes only after a notice
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # jax_enable_preemption_service off: SIGTERM reaches Python
            self.cluster = False
            return self.signum is not None
        if reached and self.signum is None:
            self.signum = signal.SIGTERM
            self.passed_on_from = _sigint_sender()
        return reached

    def describe(self) -> str:
        """What stopped the run, as this process saw it: ``stopped by SIGINT`` (its own Ctrl-C),
        ``stopped by SIGTERM``, or ``stopped by SIGINT on process 1 (passed on to every
        process)`` when another process's Ctrl-C stopped the cluster."""
        if self.passed_on_from is not None:
            sender = self.passed_on_from
            return f"stopped by SIGINT on process {sender} (passed on to every process)"
        return f"stopped by {signal.Signals(self.signum or signal.SIGTERM).name}"


# A Ctrl-C on one process of a cluster reaches the others as JAX's preemption notice, which
# carries no reason. The process that was interrupted leaves its index in the cluster's
# key-value store (the one jax.distributed runs), where the others look when the notice stops
# them. Without a store (no cluster, another JAX) they say SIGTERM, as the notice is.
SIGINT_KEY = "jaxbn_train/sigint/"


def _client():
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def _publish_sigint() -> None:
    client = _client()
    if client is not None:
        import jax

        # the store may be gone (a process died): the stop goes on without the note
        with contextlib.suppress(Exception):
            client.key_value_set(f"{SIGINT_KEY}{jax.process_index()}", "SIGINT")


def _sigint_sender() -> int | None:
    client = _client()
    if client is None:
        return None
    try:
        keys = [key for key, _ in client.key_value_dir_get(SIGINT_KEY)]
    except Exception:  # no store, or no key yet
        return None
    senders = sorted(int(key.rsplit("/", 1)[1]) for key in keys)
    return senders[0] if senders else None


def interrupted_message(options: RunOptions) -> str:
    """The line for a Ctrl-C that stopped the run where it was: what is on disk, and how to
    go on."""
    if not options.workdir:
        return "interrupted; nothing was saved (no --workdir)"
    if finished_checkpoint_in(options.workdir):
        kept = f"the checkpoints in {options.workdir} are kept"
    else:
        kept = "no checkpoint was saved yet"
    return f"interrupted; {kept}; continue with: {continue_command(options)}"


def finished_checkpoint_in(workdir: str) -> bool:
    # orbax writes a checkpoint under a temporary name and renames it to its number when
    # complete: a numbered folder is a finished epoch or mid-epoch checkpoint
    for folder in ("checkpoints", MID_EPOCH):
        path = os.path.join(workdir, folder)
        if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
            return True
    return False


class stop_on_signals:  # noqa: N801 (a context manager, used like a function)
    """Within: SIGINT and SIGTERM set ``stop`` instead of killing the process (main thread
    only; elsewhere nothing changes). Once a cluster is joined, JAX's preemption notifier
    replaces the SIGTERM handler (see :class:`StopRequest`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: StopRequest):
        self.stop, self.saved = stop, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self.stop) for s in self.SIGNALS}
        return self.stop

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        return False


def continue_command(options: RunOptions) -> str:
    """The command that continues this run: the one it was started with, plus ``--resume``."""
    command = list(options.command)
    if "--resume" not in command:
        command.append("--resume")
    return shlex.join(command)
