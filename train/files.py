"""Files of a workdir written so that a crash or a full disk never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import pathlib


class WorkdirError(Exception):
    """An expected problem with ``--workdir`` or a file in it; the message is one line."""


def atomic_write_text(path: str | pathlib.Path, text: str) -> None:
    """Writes ``text`` beside ``path``, syncs it, then renames it over ``path``.

    Readers see the old file or the new one, never a mix: a kill or ENOSPC during the write
    leaves ``path`` as it was.

    Raises:
      WorkdirError: the file could not be written (the message names it and the OS reason).
    """
    path = pathlib.Path(path)
    aside = path.with_name(f".{path.name}.tmp")
    try:
        with open(aside, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            aside.unlink(missing_ok=True)
        raise WorkdirError(f"could not write {path}: {err.strerror or err}") from err
