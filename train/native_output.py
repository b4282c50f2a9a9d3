"""Gloo's connection lines, kept out of a multi-process run's output unless ``--verbose``.

On the CPU, JAX's cross-process collectives go through gloo, whose C++ code writes
``[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1``
to the process's standard output (file descriptor 1) each time it connects a group of devices:
several lines per process, between the run's own lines. Python cannot silence a C++ stream, so
:class:`GlooLinesFilter` puts a pipe in place of descriptor 1 and forwards everything written to
it except those lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

GLOO_LINE = re.compile(
    rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. "
    rb"Expected number of connected peer ranks is : \d+\r?\n"
)
MARK = b"[Gloo]"


def drop_gloo_lines(pending: bytes) -> tuple[bytes, bytes]:
    """``(what to forward now, what to keep for later)`` of the bytes read so far: the Gloo
    lines removed, and an unfinished one (or the start of its mark) kept back until its end."""
    pending = GLOO_LINE.sub(b"", pending)
    start = pending.rfind(MARK)
    if start >= 0 and b"\n" not in pending[start:]:
        return pending[:start], pending[start:]
    for size in range(len(MARK) - 1, 0, -1):  # "[Gl" at the very end: maybe a mark's start
        if pending.endswith(MARK[:size]):
            return pending[:-size], pending[-size:]
    return pending, b""


class GlooLinesFilter:
    """While open, descriptor 1 is a pipe whose reader forwards all but Gloo's lines.

    ``close`` (also at interpreter exit) flushes Python's stdout, puts the original descriptor
    back and waits until everything written before has been forwarded.
    """

    def __init__(self) -> None:
        sys.stdout.flush()
        self._original = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        self._read = read
        self._thread = threading.Thread(target=self._forward, name="gloo-filter", daemon=True)
        self._thread.start()
        self._closed = False

    def _forward(self) -> None:
        pending = b""
        while chunk := os.read(self._read, 1 << 16):
            now, pending = drop_gloo_lines(pending + chunk)
            if now:
                os.write(self._original, now)
        if pending:
            os.write(self._original, pending)
        os.close(self._read)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout
            sys.stdout.flush()
        os.dup2(self._original, 1)  # the pipe's last writer goes: the reader sees its end
        self._thread.join(timeout=5)
        os.close(self._original)
