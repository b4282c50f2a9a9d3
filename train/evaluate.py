"""Evaluate a checkpoint of a run: test loss and accuracy, exactly as the run logged them.

Usage:
    python -m train.evaluate --workdir runs/cnn             # the newest checkpoint
    python -m train.evaluate --workdir runs/cnn --epoch 3   # a kept older one

Prints one line, ``epoch 3: test loss 0.0344 acc 0.9861`` (4 decimals; the exact values are in
``metrics.jsonl``).
The model, data, batch size, device count and dtype come from the run's ``config.json``; the
printed figures equal the ``test_loss``/``test_accuracy`` of that epoch in ``metrics.jsonl``
(same batches, same devices, same sums). Only epoch checkpoints are evaluated: a mid-epoch one
(a run stopped inside an epoch) is there to be resumed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from train.cli import OneLineParser, request_cpu_devices

SCRIPTS = {"MLP": "mlp", "ConvNet": "cnn", "ResNet": "resnet"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m train.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", help="the run's --workdir")
    # the workdir may also come by position, as `train.plot` takes it; --workdir is documented
    parser.add_argument("workdir_pos", nargs="?", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--epoch", type=int, help="a kept checkpoint (default: the newest)")
    parser.add_argument("--data-dir", default="data", help="dataset root (default: data)")
    parser.add_argument(
        "--no-download", action="store_true", help="never download; fail if files are missing"
    )
    args = parser.parse_args(argv)
    if args.workdir and args.workdir_pos and args.workdir != args.workdir_pos:
        parser.error(f"two workdirs given: --workdir {args.workdir} and {args.workdir_pos}")
    args.workdir = args.workdir or args.workdir_pos
    if not args.workdir:
        parser.error("the following arguments are required: --workdir")
    return args


def quiet_orbax_logs() -> None:
    """Orbax logs through absl at WARNING for what a read-only evaluation expects
    (``read_only=True, setting save_interval_steps=0``, "Given directory is read only"); only
    its errors are shown."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def evaluate_checkpoint(
    workdir: str | pathlib.Path, epoch: int | None = None, *, data_dir="data", download=True
) -> tuple[int, float, float]:
    """``(epoch, test loss, test accuracy)`` of a saved checkpoint of the run in ``workdir``.

    Raises:
      WorkdirError: no run configuration, no such checkpoint (or only a mid-epoch one), one
        that cannot be restored, or other data than the run's.
    """
    import importlib

    from train.checkpoint import MID_EPOCH, Checkpoints, _first_line, _incomplete
    from train.config import RunConfig
    from train.datasets import load_dataset
    from train.feed import make_feed
    from train.files import WorkdirError
    from train.loop import create_state, evaluate, make_optimizer
    from train.parallel import DataParallel

    workdir = pathlib.Path(workdir)
    config = RunConfig.load(workdir)
    if config is None:
        raise WorkdirError(f"{workdir} holds no config.json: not a run's --workdir")
    if config.model not in SCRIPTS:
        raise WorkdirError(f"{workdir}: unknown model {config.model!r}")
    script = importlib.import_module(f"train.{SCRIPTS[config.model]}")
    dataset = config.data.split(" ")[0]
    data = load_dataset(dataset, data_dir, download=download)
    described = f"{data.name} ({len(data.y_train)} train / {len(data.y_test)} test)"
    if described != config.data:
        raise WorkdirError(f"the run trained on {config.data}, {data_dir} holds {described}")
    parallel = DataParallel(config.devices)
    model = script.make_model(config, data)
    steps = len(data.y_train) // config.batch_size
    tx = make_optimizer(config, steps * config.epochs)  # for the state's structure only
    like = create_state(model, tx, data, config.seed, parallel)
    # read-only: a run may still be writing here (its save in progress must not be cleaned up)
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        kept = checkpoints.epochs() if checkpoints.directory.is_dir() else []
        if epoch is None and not kept:
            mid = workdir / MID_EPOCH
            stopped = (
                f" (only a mid-epoch checkpoint, {mid}: resume the run to finish its epoch)"
                if mid.is_dir() and any(p.name.isdigit() for p in mid.iterdir())
                else ""
            )
            raise WorkdirError(f"{workdir} has no checkpoint of a finished epoch yet{stopped}")
        epoch = kept[0] if epoch is None else epoch
        if epoch not in kept:
            raise WorkdirError(
                f"{workdir} has no checkpoint of epoch {epoch} (kept: {kept or 'none'})"
            )
        directory = checkpoints.directory / str(epoch)
        why = _incomplete(directory)
        if why is None:
            try:
                state = checkpoints.restore(epoch, like)
            except Exception as err:  # orbax/tensorstore raise many types for bad files
                why = f"{type(err).__name__}: {_first_line(err)}"
        if why is not None:
            raise WorkdirError(
                f"the checkpoint of epoch {epoch} ({directory}) cannot be restored: {why}"
            )
    finally:
        checkpoints.close()
    feed = make_feed(parallel, data, config)  # its test batches: never augmented
    loss, accuracy = evaluate(parallel.eval_step(model), state, feed, len(data.y_test))
    return epoch, loss, accuracy


def _saved_devices(config_path: pathlib.Path) -> int:
    """The run's ``devices`` as far as its ``config.json`` tells (1 if it cannot): simulated
    CPU devices must be requested before JAX starts. A file that is not a configuration is
    reported by ``RunConfig.load`` later, as one line."""
    import json

    try:
        devices = json.loads(config_path.read_text()).get("devices", 1)
        return devices if isinstance(devices, int) and devices >= 1 else 1
    except (OSError, ValueError, AttributeError):
        return 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    request_cpu_devices(_saved_devices(pathlib.Path(args.workdir, "config.json")))
    from train.loop import EXPECTED_ERRORS

    quiet_orbax_logs()
    try:
        epoch, loss, accuracy = evaluate_checkpoint(
            args.workdir, args.epoch, data_dir=args.data_dir, download=not args.no_download
        )
    except EXPECTED_ERRORS as err:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"epoch {epoch}: test loss {loss:.4f} acc {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
