"""A run's configuration: everything that decides its numbers, saved as ``WORKDIR/config.json``.

``--resume`` compares the saved configuration with the flags and refuses any difference, so a
resumed run is always the run that was started. The one change it allows is ``--epochs`` with
``--schedule constant``: the learning rate does not depend on the run's length and the batch
order depends only on (seed, epoch), so a run extended to N epochs is bit for bit a run started
with ``--epochs N``. The cosine schedule decays over the run's length: changing it would change
every step already taken, so it is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from dataclasses import dataclass

from train.files import WorkdirError, atomic_write_text

FILENAME = "config.json"


@dataclass(frozen=True)
class RunConfig:
    """The flags (and data) that change a run's computation."""

    model: str  # the model's class, e.g. "MLP"
    norm: str
    bn_momentum: float | None  # None: cumulative average
    data: str  # name and size of the data, e.g. "digits (1437 train / 360 test)"
    batch_size: int
    lr: float
    schedule: str
    sgd_momentum: float
    weight_decay: float
    seed: int
    devices: int
    num_processes: int
    epochs: int
    # Fields added later have defaults: the value every run had before the field existed, so
    # an older run's config.json still loads and compares.
    dtype: str = "float32"

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: str, data: str) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"model", "data"}
        return cls(model=model, data=data, **{n: getattr(args, n) for n in names})

    def changes(self, new: RunConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
        """``"--lr 0.1 -> 0.5"`` for every field that differs (old value first)."""
        return [
            f"{_flag(f.name)} {getattr(self, f.name)} -> {getattr(new, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(new, f.name)
        ]

    def save(self, workdir: str | pathlib.Path) -> None:
        atomic_write_text(
            pathlib.Path(workdir, FILENAME), json.dumps(dataclasses.asdict(self), indent=1) + "\n"
        )

    @classmethod
    def load(cls, workdir: str | pathlib.Path) -> RunConfig | None:
        """The saved configuration, or None if the workdir has none.

        Raises:
          WorkdirError: the file exists but is not a configuration this version wrote.
        """
        path = pathlib.Path(workdir, FILENAME)
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise WorkdirError(f"{path} is not a readable run configuration: {err}") from err


def _flag(field: str) -> str:
    return {"model": "model", "data": "data"}.get(field, "--" + field.replace("_", "-"))
