"""The training scripts' figures: a workdir's loss and accuracy curves, and the compare figure.

Usage:
    python -m train.plot --workdir runs/bn --workdir runs/no-bn --out runs/curves.png

(Workdirs may also be given by position: ``python -m train.plot runs/bn runs/no-bn --out ...``.)

Reads each workdir's ``metrics.jsonl`` (one row per finished epoch) and ``config.json`` and
draws train and test loss (left) and train and test accuracy (right) per epoch, one colour per
run; the legend names each run's model, norm and learning rate (plus whatever else differs
between the runs). Prints the path it wrote. A missing or unreadable file is one line,
``error: ...``, and exit status 2.

Both figures use the Okabe–Ito colours without their yellow (colour-blind safe and visible on
white) and are written at 150 dpi to exactly the given path, its folder created.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

DPI = 150
# Okabe & Ito (2008), "Color Universal Design", without the yellow (#F0E442): distinguishable
# under the common colour-vision deficiencies. Orange, the lightest left, comes late.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000", "#56B4E9", "#E69F00")
# Used once the palette repeats, so that runs 1 and 8 still differ.
MARKERS = (None, "o", "s", "^", "D")
PLOTTED = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")


class PlotError(Exception):
    """A workdir that cannot be plotted, or a figure that cannot be written; one line."""


# -- the curves of workdirs ------------------------------------------------------------------


def read_run(workdir: str | pathlib.Path) -> tuple[dict, list[dict]]:
    """``(config, rows)`` of a workdir: ``config.json`` as a dict (``{}`` if the run has none)
    and the rows of ``metrics.jsonl``, each with an integer ``epoch`` and the numbers of
    :data:`PLOTTED`.

    Raises:
      PlotError: no metrics file, an empty one, or a line that is not such a row (the message
        names the file and the line), or a ``config.json`` that is not a JSON object.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise PlotError(f"{workdir} is not a directory")
    metrics = workdir / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{workdir} has no metrics.jsonl (not a workdir, or no epoch finished)")
    try:
        lines = metrics.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PlotError(f"cannot read {metrics}: {err}") from err
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_metrics_row(line, f"{metrics}, line {number}"))
    if not rows:
        raise PlotError(f"{metrics} is empty: no epoch finished")
    config_path = workdir / "config.json"
    config = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise PlotError(f"{config_path} is not readable JSON: {err}") from err
        if not isinstance(config, dict):
            raise PlotError(f"{config_path} is not a JSON object")
    return config, rows


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metrics_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise PlotError(f"{where}: not JSON ({err})") from None
    if not isinstance(row, dict) or type(row.get("epoch")) is not int:
        raise PlotError(f"{where}: not a JSON object with an integer 'epoch'")
    for key in PLOTTED:
        value = row.get(key)
        if not _is_number(value):
            raise PlotError(f"{where}: {key!r} is {value!r}, not a number")
    return row


def run_labels(configs: list[dict], workdirs: list[str]) -> list[str]:
    """``"MLP, norm batch, lr 0.1"`` per run, plus the other settings that differ between the
    runs (``", seed 1"``); a run without ``config.json``, or two runs alike, add the workdir."""
    shown = ("model", "norm", "lr")
    known = [c for c in configs if c]
    keys = sorted({k for c in known for k in c} - set(shown))
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in known}) > 1]
    labels = []
    for config in configs:
        parts = [str(config.get("model", "?")), f"norm {config.get('norm', '?')}"]
        parts.append(f"lr {config['lr']:g}" if _is_number(config.get("lr")) else "lr ?")
        parts += [f"{k.replace('_', ' ')} {config.get(k)}" for k in differing]
        labels.append(", ".join(parts))
    return [
        f"{label} ({workdir})" if not config or labels.count(label) > 1 else label
        for label, config, workdir in zip(labels, configs, workdirs, strict=True)
    ]


def draw_runs(runs: list[tuple[str, list[dict]]], title: str | None = None) -> plt.Figure:
    """Loss (log scale if every loss is positive) and accuracy per epoch, train solid and test
    dashed.

    ``runs``: ``(label, rows)`` per run, rows as in ``metrics.jsonl``. Colour = run.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12.5, 4.5))
    accuracies = []
    for i, (label, rows) in enumerate(runs):
        color, marker = line_look(i)
        epochs = [r["epoch"] for r in rows]
        for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            for split, style in (("train", "-"), ("test", "--")):
                values = [r[f"{split}_{kind}"] for r in rows]
                ax.plot(epochs, values, style, color=color, marker=marker, markersize=4)
        accuracies += [r[k] for r in rows for k in ("train_accuracy", "test_accuracy")]
        ax_acc.plot([], [], "-", color=color, marker=marker, label=label)  # legend: colour only
    if all(r[k] > 0 for _, rows in runs for r in rows for k in ("train_loss", "test_loss")):
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=accuracy_limits(accuracies))
    ax_acc.set_title("accuracy")
    styles = [
        Line2D([], [], color="0.3", linestyle=s, label=n)
        for s, n in (("-", "train"), ("--", "test"))
    ]
    ax_loss.legend(handles=styles, fontsize=8, loc="best")
    ax_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    import argparse

    from train.cli import OneLineParser

    parser = OneLineParser(
        prog="python -m train.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--workdir",
        action="append",
        default=[],
        dest="named",
        help="a run's --workdir; repeat for several runs",
    )
    # as `train.evaluate`, the workdirs may also come by position; --workdir is documented
    parser.add_argument("workdirs", nargs="*", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, help="the figure to write (PNG unless .pdf/.svg)")
    args = parser.parse_args(argv)
    args.workdirs = [*args.named, *args.workdirs]
    if not args.workdirs:
        parser.error("the following arguments are required: --workdir")
    try:
        read = [read_run(w) for w in args.workdirs]
        configs = [config for config, _ in read]
        labels = run_labels(configs, args.workdirs)
        data = {c.get("data") for c in configs}
        title = f"training curves on {data.pop()}" if len(data) == 1 and None not in data else None
        fig = draw_runs(
            [(label, rows) for label, (_, rows) in zip(labels, read, strict=True)], title
        )
        print(f"plot: {save(fig, args.out)}")
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# -- the compare experiment ------------------------------------------------------------------


def comparison_title(*, model: str, dataset: str, epochs: int) -> str:
    """The compare figure's title: what was trained, on what, for how long."""
    return (
        f"{model.upper()} on {dataset}, {epochs} epoch{'s' * (epochs != 1)}: "
        "SGD learning-rate sweep, with vs without batch norm"
    )


def plot_comparison(results: list[dict], path: str | pathlib.Path, title: str) -> pathlib.Path:
    """Writes :func:`draw_comparison`'s figure to exactly ``path`` (see :func:`save`)."""
    return save(draw_comparison(results, title), path)


def draw_comparison(results: list[dict], title: str) -> plt.Figure:
    """Train loss (log scale) and test accuracy per epoch.

    ``results``: one dict per run with ``lr``, ``norm``, ``history`` (metrics rows),
    ``diverged`` (epoch or None) and ``status`` ("ok", "diverged ...", "failed: ...").
    Colour = learning rate, solid = batch norm, dashed = none; a dotted line and a cross at the
    bottom mark the epoch where a run diverged, a square the last epoch of a failed run, and the
    legend says which diverged or failed. The accuracy axis spans the data, not 0–1.
    """
    lrs = sorted({r["lr"] for r in results})
    looks = {lr: line_look(i) for i, lr in enumerate(lrs)}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12.5, 4.5))
    # x in epochs, y in axes fractions: the cross sits at the bottom whatever the data's range
    bottom = ax_acc.get_xaxis_transform()
    accuracies = []
    for r in results:
        color, marker = looks[r["lr"]]
        style = "-" if r["norm"] == "batch" else "--"
        label = f"lr={r['lr']:g} {'BN' if r['norm'] == 'batch' else 'no BN'}"
        if r["diverged"] is not None:
            label += f" (diverged in epoch {r['diverged']})"
        elif r.get("status", "ok") != "ok":
            label += " (failed)"
        epochs = [row["epoch"] for row in r["history"]]
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
            values = [row[key] for row in r["history"]]
            ax.plot(epochs, values, style, color=color, marker=marker, markersize=4, label=label)
        accuracies += [row["test_accuracy"] for row in r["history"]]
        if r["diverged"] is not None:
            for ax in (ax_loss, ax_acc):
                ax.axvline(r["diverged"], color=color, linestyle=":", alpha=0.7)
            ax_acc.plot(
                [r["diverged"]], [0.04], "x", color=color, markersize=10, mew=2, transform=bottom
            )
        elif r.get("status", "ok") != "ok" and r["history"]:
            last = r["history"][-1]
            ax_acc.plot([last["epoch"]], [last["test_accuracy"]], "s", color=color, markersize=8)
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    ax_loss.set_ylim(top=10)  # a diverging run would flatten every other curve
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_acc.set_ylim(accuracy_limits(accuracies))
    ax_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- shared ----------------------------------------------------------------------------------


def line_look(index: int) -> tuple[str, str | None]:
    """``(colour, marker)`` of the ``index``-th curve: the palette, then markers once it
    repeats."""
    return PALETTE[index % len(PALETTE)], MARKERS[index // len(PALETTE) % len(MARKERS)]


def accuracy_limits(values: list[float]) -> tuple[float, float]:
    """A y range that holds every finite accuracy with a margin of 5 % of their spread (at
    least 0.01), clipped to what accuracy can be (0 to 1, plus the margin above 1)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    margin = max(0.05 * (high - low), 0.01)
    return max(low - margin, 0.0), min(high + margin, 1.0 + margin)


def save(fig: plt.Figure, path: str | pathlib.Path) -> pathlib.Path:
    """Writes ``fig`` at :data:`DPI` to exactly ``path``, creating its folder, and closes it.

    The format follows the suffix if matplotlib knows it (``.pdf``, ``.svg``, ...), else PNG:
    matplotlib alone would append ``.png`` to a path without a suffix and refuse an unknown one.

    Raises:
      PlotError: the folder cannot be created or the file cannot be written.
    """
    path = pathlib.Path(path)
    suffix = path.suffix[1:].lower()
    known = fig.canvas.get_supported_filetypes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format=suffix if suffix in known else "png")
    except OSError as err:
        raise PlotError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
