"""The tutorial's experiment: does batch norm let you train at a 10× higher learning rate?

The same model (the tutorial's MLP, or the ConvNet with --model cnn) with and without batch norm,
same seed and data, over a sweep of learning rates. As in the tutorial's snippet the optimizer is
plain SGD at a constant learning rate (no momentum, no weight decay) unless flags say otherwise.

Usage:
    python -m train.compare                                   # MLP, lr 0.01 / 0.1 / 1.0, digits
    python -m train.compare --lrs 0.01,0.1,1,3 --epochs 20 --out runs/compare.png

Prints a table of final train loss, test loss and accuracy per run; with --out, also writes a PNG
(150 dpi) of the loss and accuracy curves to exactly that path, its folder created (without it,
no file is written).
A run's status is "ok" only if it ended with finite losses above chance: "diverged in epoch N"
if the loss became NaN/Inf, "failed: ..." if its last test loss is not finite or its test
accuracy is at most 1.5 × the share of the most frequent test class (what a constant guess
scores).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

import numpy as np

from train.cli import Defaults, build_parser, check_args, request_cpu_devices

DEFAULTS = Defaults(epochs=15, batch_size=64, lr=0.1, sgd_momentum=0.0, weight_decay=0.0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser("python -m train.compare", __doc__, DEFAULTS, sweep=True)
    parser.add_argument(
        "--lrs", default="0.01,0.1,1.0", help="comma-separated learning rates, each > 0"
    )
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the network")
    parser.add_argument("--out", help="write the figure here (unset: no figure, no file)")
    # the earlier name of --out; `train.plot` names its picture --out too
    parser.add_argument("--plot", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.lrs = [float(v) for v in args.lrs.split(",")]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    bad = [v for v in args.lrs if not (math.isfinite(v) and v > 0)]
    if bad:
        parser.error(f"--lrs must all be positive numbers, got {bad[0]:g}")
    if args.out and args.plot:
        parser.error("--plot is the earlier name of --out: give one of them")
    # errors about the figure's path name the flag that was given
    args.out_flag = "--plot" if args.plot else "--out"
    args.out = args.out or args.plot
    check_args(parser, args)
    # what the shared loop reads; a sweep keeps no checkpoints
    args.workdir, args.resume, args.use_bn, args.summary = None, False, False, False
    request_cpu_devices(args.devices)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from train import cnn, mlp
    from train.datasets import load_dataset
    from train.loop import EXPECTED_ERRORS, TrainingDivergedError, run
    from train.plot import PlotError, comparison_title, plot_comparison

    make_model = {"mlp": mlp.make_model, "cnn": cnn.make_model}[args.model]
    results = []
    try:
        if args.out:
            check_plot_destination(args.out, args.out_flag)  # fail now, not after the whole sweep
        data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
        chance = float(np.bincount(data.y_test).max() / len(data.y_test))
        for lr in args.lrs:
            for norm in ("none", "batch"):
                run_args = argparse.Namespace(**{**vars(args), "lr": lr, "norm": norm})
                print(f"--- lr={lr:g} norm={norm}")
                try:
                    history, diverged = run(run_args, make_model, data=data).history, None
                except TrainingDivergedError as err:
                    print(f"    {err}")
                    history, diverged = err.history, len(err.history) + 1
                result = {"lr": lr, "norm": norm, "history": history, "diverged": diverged}
                results.append({**result, "status": status(result, chance)})
        print()
        print(format_table(results))
        title = comparison_title(model=args.model, dataset=data.name, epochs=args.epochs)
        if args.out:
            print(f"\nplot: {plot_comparison(results, args.out, title)}")
    except (*EXPECTED_ERRORS, PlotError) as err:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def check_plot_destination(plot: str, flag: str = "--out") -> None:
    """Creates the directory of ``plot`` if needed; raises ``OSError`` if it cannot be written."""
    path = pathlib.Path(plot).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the directory of {flag} {plot}: {err.strerror}") from err
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise OSError(f"cannot write {flag} {plot}: not a writable file path")


def status(result: dict, chance: float) -> str:
    """ "ok", "diverged in epoch N" or "failed: why" (see the module docstring)."""
    if result["diverged"]:
        return f"diverged in epoch {result['diverged']}"
    last = result["history"][-1] if result["history"] else None
    if last is None:
        return "failed: no epoch finished"
    if not (math.isfinite(last["train_loss"]) and math.isfinite(last["test_loss"])):
        return "failed: non-finite loss"
    if last["test_accuracy"] <= 1.5 * chance:
        return f"failed: chance level (test acc <= 1.5 x {chance:.3f})"
    return "ok"


def format_table(results: list[dict]) -> str:
    rows = [
        f"{'lr':>6}  {'norm':<6} {'train loss':>10} {'test loss':>10} {'test acc':>9}  status",
        "-" * 58,
    ]
    for r in results:
        last = r["history"][-1] if r["history"] else None
        numbers = (
            f"{last['train_loss']:>10.4g} {last['test_loss']:>10.4g} {last['test_accuracy']:>9.4f}"
            if last
            else f"{'-':>10} {'-':>10} {'-':>9}"
        )
        rows.append(f"{r['lr']:>6g}  {r['norm']:<6} {numbers}  {r['status']}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
