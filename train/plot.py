"""The compare experiment's figure: loss and accuracy curves, BN vs no BN, per learning rate."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt


def plot_comparison(results: list[dict], path: str | pathlib.Path, title: str) -> pathlib.Path:
    """Writes :func:`draw_comparison`'s figure as a PNG to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_comparison(results, title)
    try:
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path


def draw_comparison(results: list[dict], title: str) -> plt.Figure:
    """Train loss (log scale) and test accuracy per epoch.

    ``results``: one dict per run with ``lr``, ``norm``, ``history`` (metrics rows),
    ``diverged`` (epoch or None) and ``status`` ("ok", "diverged ...", "failed: ...").
    Colour = learning rate, solid = batch norm, dashed = none; a cross marks where a run
    diverged, a square the last epoch of a failed run, and the legend says which failed.
    """
    lrs = sorted({r["lr"] for r in results})
    colors = {lr: plt.cm.viridis(i / max(len(lrs) - 1, 1)) for i, lr in enumerate(lrs)}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        style = "-" if r["norm"] == "batch" else "--"
        label = f"lr={r['lr']:g} {'BN' if r['norm'] == 'batch' else 'no BN'}"
        if r.get("status", "ok") != "ok":
            label += " (diverged)" if r["diverged"] is not None else " (failed)"
        epochs = [row["epoch"] for row in r["history"]]
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
            values = [row[key] for row in r["history"]]
            ax.plot(epochs, values, style, color=colors[r["lr"]], label=label)
        if r["diverged"] is not None:
            for ax in (ax_loss, ax_acc):
                ax.axvline(r["diverged"], color=colors[r["lr"]], linestyle=":", alpha=0.6)
            ax_acc.plot([r["diverged"]], [0.1], "x", color=colors[r["lr"]], markersize=10)
        elif r.get("status", "ok") != "ok" and r["history"]:
            last = r["history"][-1]
            ax_acc.plot(
                [last["epoch"]], [last["test_accuracy"]], "s", color=colors[r["lr"]], markersize=8
            )
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    ax_loss.set_ylim(top=10)  # a diverging run would flatten every other curve
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02), title="test accuracy")
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
