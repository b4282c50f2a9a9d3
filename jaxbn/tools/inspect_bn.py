"""``inspect_batchnorm``: a readable table of every batch norm layer, with trouble flagged.

The tutorial's "Problem 3" (print running mean/var, num_batches_tracked, γ, β per layer) for a
Flax variables tree, plus the checks one does by eye:

* statistics never updated — ``num_batches_tracked == 0``: trained with ``train=False``, or
  loaded without ``batch_stats``;
* NaN/Inf in any statistic or parameter;
* collapsed variance — running variance below ``1e-6`` (a dead input channel);
* dead channels — ``|scale|`` below ``1e-3`` (the layer outputs only its bias there).

Rows come in the order the model created its layers when the tree still has it (as
``model.init`` returns it); a tree whose keys JAX has sorted as strings (after ``jax.jit`` or
``jax.tree`` operations) is listed in numeric order instead: ``features_2`` before
``features_10``.

Example:
    >>> report = jaxbn.inspect_batchnorm(variables)
    >>> print(report)                 # the table; report.layers / report.problems for code
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxbn.tools._tree import Path, batch_norm_layers

__all__ = ["BatchNormReport", "LayerSummary", "inspect_batchnorm"]

COLLAPSED_VAR = 1e-6
DEAD_SCALE = 1e-3


@dataclass
class LayerSummary:
    """One batch norm layer: statistics summaries and the problems found."""

    path: str
    channels: int
    num_batches_tracked: int
    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray | None
    bias: np.ndarray | None
    problems: list[str] = field(default_factory=list)


@dataclass
class BatchNormReport:
    """All batch norm layers of a variables tree; ``str()`` is the table."""

    layers: list[LayerSummary]

    @property
    def problems(self) -> list[str]:
        return [f"{layer.path}: {p}" for layer in self.layers for p in layer.problems]

    def __str__(self) -> str:
        if not self.layers:
            return "no batch norm layers with running statistics"
        # (title, alignment, usual width, cells): a column grows to its widest cell, since
        # summaries vary in length ("+1" or "-0.000123 [-1.2e-05, +0.0031]")
        columns = [
            ("layer", "<", 5, [layer.path for layer in self.layers]),
            ("C", ">", 5, [str(layer.channels) for layer in self.layers]),
            ("steps", ">", 6, [str(layer.num_batches_tracked) for layer in self.layers]),
            ("mean (avg, range)", ">", 22, [_summary(layer.mean) for layer in self.layers]),
            ("var (avg, range)", ">", 24, [_summary(layer.var) for layer in self.layers]),
            ("scale avg", ">", 9, [_avg(layer.scale) for layer in self.layers]),
            ("bias avg", ">", 9, [_avg(layer.bias) for layer in self.layers]),
        ]
        widths = [max(usual, len(title), *map(len, cells)) for title, _, usual, cells in columns]

        def line(cells: list[str], flags: str) -> str:
            fitted = [
                f"{cell:{align}{width}}"
                for cell, (_, align, _, _), width in zip(cells, columns, widths, strict=True)
            ]
            return " ".join(fitted) + "  " + flags

        header = line([title for title, _, _, _ in columns], "flags")
        rows = [header, "-" * len(header)]
        for i, layer in enumerate(self.layers):
            cells = [column[i] for _, _, _, column in columns]
            rows.append(line(cells, "; ".join(layer.problems) or "ok"))
        return "\n".join(rows)


def inspect_batchnorm(variables: Mapping[str, Any]) -> BatchNormReport:
    """Summarises every jaxbn batch norm in ``variables`` (``params`` + ``batch_stats``).

    Layers are listed in the model's order where the tree keeps it, else numerically (see the
    module docstring).
    """
    layers = []
    order = _layer_order(variables.get("batch_stats", {}))
    found = sorted(batch_norm_layers(variables), key=lambda layer: order[layer[0]])
    for path, stats, params in found:
        mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
        scale = np.asarray(params["scale"], np.float64) if "scale" in params else None
        bias = np.asarray(params["bias"], np.float64) if "bias" in params else None
        summary = LayerSummary(
            "/".join(path), mean.size, int(stats["num_batches_tracked"]), mean, var, scale, bias
        )
        if summary.num_batches_tracked == 0:
            summary.problems.append(
                "statistics never updated (trained with train=False, or loaded without "
                "batch_stats?)"
            )
        arrays = [a for a in (mean, var, scale, bias) if a is not None]
        if not all(np.all(np.isfinite(a)) for a in arrays):
            summary.problems.append("NaN/Inf in statistics or parameters")
        collapsed = int(np.sum(var < COLLAPSED_VAR))
        if collapsed:
            summary.problems.append(f"{collapsed} channel(s) with collapsed variance (< 1e-6)")
        if scale is not None:
            dead = int(np.sum(np.abs(scale) < DEAD_SCALE))
            if dead:
                summary.problems.append(f"{dead} dead channel(s) (|scale| < 1e-3)")
        layers.append(summary)
    return BatchNormReport(layers)


def _layer_order(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, int]:
    """Module path → rank: each level in its insertion order (the order ``model.init`` created
    the layers), unless its keys are sorted as strings — what JAX's tree functions leave, which
    says nothing about the model — then in natural order (``features_2`` < ``features_10``)."""
    keys = list(tree)
    if all(isinstance(key, str) for key in keys) and keys == sorted(keys):
        keys.sort(key=_natural)
    order = {prefix: 0}
    for key in keys:
        if isinstance(tree[key], Mapping):
            for path in _layer_order(tree[key], (*prefix, key)):
                order[path] = len(order)
    return order


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _summary(a: np.ndarray) -> str:
    return f"{np.mean(a):+.3g} [{np.min(a):+.2g}, {np.max(a):+.2g}]"


def _avg(a: np.ndarray | None) -> str:
    return "-" if a is None else f"{np.mean(a):+.3g}"
