"""A run's configuration as typed, frozen dataclasses: what decides its numbers
(:class:`RunConfig`, saved as ``WORKDIR/config.json``) and what does not (:class:`RunOptions`:
where files go, what is printed, how the cluster is joined). :class:`Run` holds both; the
scripts build it from the flags (``train.cli``) and the loop takes it.

``--resume`` compares the saved configuration with the flags and refuses any difference, so a
resumed run is always the run that was started. The one change it allows is ``--epochs`` with
``--schedule constant``: the learning rate does not depend on the run's length and the batch
order (and augmentation) depends only on (seed, epoch, step), so a run extended to N epochs is
bit for bit a run started with ``--epochs N``. The cosine schedule decays over the run's
length: changing it would change every step already taken, so it is refused.

Example:
    >>> run = Run(RunConfig(norm="batch", batch_size=64, lr=0.1, epochs=2), RunOptions())
    >>> run.config.lr, run.options.workdir
    (0.1, None)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from dataclasses import dataclass

from train.files import WorkdirError, atomic_write_text

FILENAME = "config.json"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that decides a run's numbers; ``--resume`` refuses any change but
    ``--epochs`` under ``--schedule constant``.

    ``model`` and ``data`` name what the flags built: the model's class (``"MLP"``) and the
    data's name and size (``"digits (1437 train / 360 test)"``). They are empty until the loop
    has built the model and loaded the data (:meth:`describing`).
    """

    model: str = ""
    norm: str = "none"
    bn_momentum: float | None = 0.1  # None: cumulative average
    data: str = ""
    batch_size: int
    lr: float
    schedule: str = "cosine"
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    devices: int = 1
    num_processes: int = 1
    epochs: int
    # Fields added later default to the value every run had before the field existed, so an
    # older run's config.json still loads and compares.
    dtype: str = "float32"
    augment: bool = False  # random crops and flips of the training images (train.augment)

    def describing(self, model: str, data: str) -> RunConfig:
        """This configuration with the built model's class and the loaded data's description."""
        return dataclasses.replace(self, model=model, data=data)

    def changes(self, new: RunConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
        """``"--lr 0.1 -> 0.5"`` for every field that differs (old value first); a switch as
        the flags that give its values (``"--no-augment -> --augment"``), so that the saved
        side can be repeated as written."""
        return [
            _change(f.name, getattr(self, f.name), getattr(new, f.name))
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
            fields = json.loads(path.read_text())
            config = cls(**fields)
        except (OSError, ValueError, TypeError) as err:
            raise WorkdirError(f"{path} is not a readable run configuration: {err}") from err
        for f in dataclasses.fields(cls):  # a hand-edited "lr": "0.1" would "differ" from 0.1
            value = getattr(config, f.name)
            if not _is_a(value, f.type):
                raise WorkdirError(
                    f"{path} is not a readable run configuration: {f.name} is {value!r}, "
                    f"not of type {f.type}"
                )
        return config


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a run does besides computing: which data to load and from where, the workdir,
    what is printed, how the cluster is joined. None of it changes a number, so ``--resume``
    lets all of it change (the loaded data itself is checked through ``RunConfig.data``)."""

    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = True
    workdir: str | None = None
    resume: bool = False
    keep: int = 2  # epoch checkpoints kept (a mid-epoch one comes on top, see train.checkpoint)
    inspect: bool = False
    summary: bool = True  # the end-of-run line (train.compare prints its own table)
    coordinator: str | None = None
    process_id: int = 0
    join_timeout: float = 60.0
    verbose: bool = False  # gloo's connection lines in multi-process runs (train.native_output)
    command: tuple[str, ...] = ("python", "-m", "train")  # what continues a stopped run


@dataclass(frozen=True)
class Run:
    """One training run: its configuration and its options."""

    config: RunConfig
    options: RunOptions

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> Run:
        """The run the parsed flags describe (``train.cli``; fields a caller's namespace lacks,
        such as ``--workdir`` in ``train.compare``, take their defaults)."""
        given = vars(args)
        numbers = {
            f.name: given[f.name]
            for f in dataclasses.fields(RunConfig)
            if f.name in given and f.name not in ("model", "data")
        }
        if numbers.get("augment") is None:  # not resolved by train.cli.check_args
            numbers.pop("augment", None)
        config = RunConfig(**numbers)
        options = {
            f.name: given[f.name]
            for f in dataclasses.fields(RunOptions)
            if f.name in given and given[f.name] is not None
        }
        options["download"] = not given.get("no_download", False)
        options["command"] = tuple(options.get("command", RunOptions.command))
        options["summary"] = bool(given.get("summary", True))
        return cls(config, RunOptions(**options))


def _is_a(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated ``annotation`` (``"float | None"``, ...)."""
    kinds = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": ()}
    for name in annotation.split(" | "):
        if name not in kinds:  # a type this check does not know: not checked
            return True
        if name == "None" and value is None:
            return True
        if isinstance(value, kinds[name]) and (name == "bool" or not isinstance(value, bool)):
            return True
    return False


def _change(field: str, old, new) -> str:
    flag = _flag(field)
    if isinstance(old, bool) and isinstance(new, bool):  # --augment / --no-augment
        switch = {True: flag, False: flag.replace("--", "--no-", 1)}
        return f"{switch[old]} -> {switch[new]}"
    return f"{flag} {old} -> {new}"


def _flag(field: str) -> str:
    return {"model": "model", "data": "data"}.get(field, "--" + field.replace("_", "-"))
