"""``inspect_batchnorm``: a readable table of every batch norm layer, with trouble flagged.

The tutorial's "Problem 3" (print running mean/var, num_batches_tracked, γ, β per layer) for a
Flax variables tree, plus the checks one does by eye:

* statistics never updated — ``num_batches_tracked == 0``: trained with ``train=False``, or
  loaded without ``batch_stats`` (not flagged for a frozen layer: its statistics are constants);
* NaN/Inf in any statistic or parameter;
* collapsed variance — running variance below ``1e-6`` (a dead input channel);
* dead channels — ``|scale|`` below ``1e-3`` (the layer outputs only its bias there);
* a counter that is not an integer (the ``batch_stats`` were averaged with ``pmean``; average
  them with :func:`jaxbn.sync_batch_stats`, which keeps counters integers).

Stacked layers — statistics with leading axes before the channel axis, ``[T, C]`` under
``nn.scan``/``nn.vmap`` or NNX's ``nnx.vmap``, ``[D, C]`` replicated for ``pmap`` — get a row per
member, named by its index: ``cell/bn[3]`` (``bn[0, 3]`` with two leading axes).

Given the model and an example input, ``inspect_batchnorm(variables, model, x)`` also shows
each layer's kind (:mod:`jaxbn.tools.layers`: trained, untracked, frozen, ghost, renorm), found
by tracing one eval call (nothing is computed), and lists the ``track_running_stats=False``
layers, which hold no statistics.

Rows come in the order the model created its layers when the tree still has it (as
``model.init`` returns it); a tree whose keys JAX has sorted as strings (after ``jax.jit`` or
``jax.tree`` operations) is listed in numeric order instead: ``features_2`` before
``features_10``. With the model, rows come in the order of the traced call.

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)     # Dense → BatchNorm → relu
    >>> x = jax.random.normal(jax.random.key(0), (16, 5))            # [N, features]
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> variables = {**variables, **updates}                         # one training step
    >>> report = jaxbn.inspect_batchnorm(variables)
    >>> print(report)                 # the table; report.layers / report.problems for code
    layer        C  steps          mean (avg, range)         var (avg, range) ... flags
    -----...
    layers_1     8      1 ...  ok
    layers_4     4      1 ...  ok
    >>> print(jaxbn.inspect_batchnorm(variables, model, x[:2]))     # with a "kind" column
    layer    kind          C  steps ... flags
    -----...
    layers_1 trained       8      1 ...  ok
    layers_4 trained       4      1 ...  ok
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from jaxbn.tools._tree import Path, batch_norm_layers, unboxed

__all__ = ["BatchNormReport", "LayerSummary", "inspect_batchnorm"]

COLLAPSED_VAR = 1e-6
UNREACHED = "variables this call does not use, or stale ones"
FROZEN_KIND = "frozen"  # jaxbn.tools.layers.FROZEN (that module imports the modules: not here)
DEAD_SCALE = 1e-3
NEVER_UPDATED = (
    "statistics never updated (trained with train=False, or loaded without batch_stats?)"
)
FLOAT_COUNTER = (
    "num_batches_tracked is a float, not a count (batch_stats averaged with pmean? average "
    "them with jaxbn.sync_batch_stats, which keeps counters integers)"
)


@dataclass
class LayerSummary:
    """One batch norm layer (or one member of a stacked layer): statistics and problems.

    Attributes:
      path: its module path, ``"/"``-joined; a stacked layer's member adds its index
        (``"cell/bn[3]"``).
      channels: C (None when nothing stored or traced tells it).
      num_batches_tracked: the counter (None without running statistics).
      mean, var: [C] running statistics (None without them: ``track_running_stats=False``).
      scale, bias: [C] parameters (None when absent).
      problems: what looks wrong, one phrase each.
      kind: one of :data:`jaxbn.tools.layers.KINDS` when the model was given, else None.
    """

    path: str
    channels: int | None
    num_batches_tracked: int | float | None
    mean: np.ndarray | None
    var: np.ndarray | None
    scale: np.ndarray | None
    bias: np.ndarray | None
    problems: list[str] = field(default_factory=list)
    kind: str | None = None


@dataclass
class BatchNormReport:
    """All batch norm layers of a variables tree; ``str()`` is the table.

    What :func:`inspect_batchnorm` returns; ``print(report)`` shows one row per layer (path,
    kind where known, C, steps, mean/var summaries, scale/bias averages, flags).

    Args:
      layers (list): one ``LayerSummary`` per batch norm (its ``path``, ``channels``,
        ``num_batches_tracked``, ``mean``/``var``/``scale``/``bias`` as NumPy [C] arrays or
        None, ``problems`` and ``kind``), in the model's order.

    ``report.problems`` (a property) lists every layer's problems as ``"path: problem"``
    strings; empty when every layer looks healthy.

    Raises:
      TypeError: built without ``layers`` (``BatchNormReport.__init__() missing 1 required
        positional argument: 'layers'``); :func:`inspect_batchnorm` builds it.

    Example:
        >>> import jax, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8,), num_classes=3)
        >>> x = jax.random.normal(jax.random.key(0), (16, 5))        # [N, features]
        >>> variables = model.init(jax.random.key(1), x, train=False)
        >>> report = jaxbn.inspect_batchnorm(variables)
        >>> [(layer.path, layer.channels) for layer in report.layers]
        [('layers_1', 8)]
        >>> report.problems
        ['layers_1: statistics never updated (trained with train=False, or loaded without
        batch_stats?)']
        >>> print(jaxbn.tools.inspect_bn.BatchNormReport([]))
        no batch norm layers with running statistics
    """

    layers: list[LayerSummary]

    @property
    def problems(self) -> list[str]:
        return [f"{layer.path}: {p}" for layer in self.layers for p in layer.problems]

    def __str__(self) -> str:
        if not self.layers:
            return "no batch norm layers with running statistics"
        layers = self.layers
        # (title, alignment, usual width, cells): a column grows to its widest cell, since
        # summaries vary in length ("+1" or "-0.000123 [-1.2e-05, +0.0031]")
        columns = [("layer", "<", 5, [layer.path for layer in layers])]
        if any(layer.kind is not None for layer in layers):
            columns.append(("kind", "<", 9, [layer.kind or "?" for layer in layers]))
        columns += [
            ("C", ">", 5, [_text(layer.channels) for layer in layers]),
            ("steps", ">", 6, [_text(layer.num_batches_tracked) for layer in layers]),
            ("mean (avg, range)", ">", 22, [_summary(layer.mean) for layer in layers]),
            ("var (avg, range)", ">", 24, [_summary(layer.var) for layer in layers]),
            ("scale avg", ">", 9, [_avg(layer.scale) for layer in layers]),
            ("bias avg", ">", 9, [_avg(layer.bias) for layer in layers]),
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
        for i, layer in enumerate(layers):
            cells = [column[i] for _, _, _, column in columns]
            rows.append(line(cells, "; ".join(layer.problems) or "ok"))
        return "\n".join(rows)


def inspect_batchnorm(
    variables: Mapping[str, Any],
    model: Any = None,
    *args: Any,
    method: str | Callable | None = None,
    kinds: Mapping[str | Path, str] | None = None,
    **kwargs: Any,
) -> BatchNormReport:
    """Summarises every jaxbn batch norm in ``variables`` (``params`` + ``batch_stats``).

    Args:
      variables: a model's variables (``{"params": …, "batch_stats": …}``); stacked
        statistics (``[T, C]``, ``[D, C]``) give a row per member.
      model: optional, the Flax linen model the variables belong to; with an example input
        in ``args`` the table shows each layer's kind and also lists the layers without
        running statistics. The call is traced in eval mode (the model's ``train=False`` or
        ``use_running_average=True``… flag, read from its signature, unless ``kwargs`` sets
        it); nothing is computed.
      *args: the example input(s) of ``model.apply(variables, *args, method=method,
        **kwargs)`` (a batch of 2 or more rows where a layer has ``track_running_stats=False``:
        its eval uses the batch's statistics).
      method: the model's method to trace (default ``__call__``).
      kinds: ``{path: kind}`` from a caller that knows the layers already (the NNX tools),
        a path ``"/"``-joined or a tuple (``""`` or ``()`` for the model itself); used where no
        model is given.
      **kwargs: keyword arguments of the traced call.

    Returns:
      A :class:`BatchNormReport`; ``print`` it for the table. Layers are listed in the
      model's order where the tree keeps it, else numerically (see the module docstring).

    Raises:
      TypeError: a model without an example input.
      ValueError: the model's eval call could not be traced with these variables.

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)
        >>> x = jax.random.normal(jax.random.key(0), (16, 5))        # [N, features]
        >>> variables = model.init(jax.random.key(1), x, train=False)
        >>> report = jaxbn.inspect_batchnorm(variables, model, x[:2])
        >>> [(layer.path, layer.kind) for layer in report.layers]
        [('layers_1', 'trained'), ('layers_4', 'trained')]
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(variables)):
        raise TypeError(
            "inspect_batchnorm reads the variables' values: call it outside jax.jit / vmap / "
            "scan, on the variables a step returns"
        )
    variables = unboxed(variables)  # nn.with_partitioning boxes: their values are read
    traced = {} if model is None else _traced(model, variables, args, method, kwargs)
    named_kinds = {_as_path(path): kind for path, kind in (kinds or {}).items()}
    named_kinds.update({path: layer.kind for path, layer in traced.items()})
    rank = _layer_order(variables.get("batch_stats", {}))
    stored = sorted(batch_norm_layers(variables), key=lambda layer: rank[layer[0]])
    paths = [path for path, _, _ in stored]
    known = list(traced) if model is not None else list(named_kinds)
    if known:  # the call's (or the caller's) order; stored layers it does not name come last
        paths = [*known, *(path for path in paths if path not in known)]
    by_path = {path: (stats, params) for path, stats, params in stored}
    layers = []
    for path in paths:
        kind = named_kinds.get(path)
        if path in by_path:
            rows = _stored_rows(path, *by_path[path], kind)
            if model is not None and path not in traced:
                for row in rows:
                    row.problems.append(f"not reached by the traced call ({UNREACHED})")
            layers += rows
        elif kind is not None and kind != FROZEN_KIND:  # no running statistics: untracked
            layers.append(_untracked_row(path, _params_at(variables, path), kind))
    return BatchNormReport(layers)


def _traced(model, variables, args, method, kwargs):
    """``{path: LayerCalls}`` of the model's eval call, or a one-line error."""
    # here: layers imports jaxbn.nnx, whose tools import this module
    from jaxbn.tools.layers import eval_kwargs, traced_layers

    name = type(model).__name__
    if not args and not kwargs:
        raise TypeError(
            f"inspect_batchnorm(variables, model, x): give {name}'s example input after the "
            "model (the layers' kinds come from tracing one eval call), or leave the model out"
        )
    call_kwargs = {**eval_kwargs(model, method), **kwargs}
    try:
        try:
            traced = traced_layers(model, variables, *args, method=method, **call_kwargs)
        except Exception:
            # pmap-replicated variables ([D, ...] everywhere): the layers are those of one
            # replica, so trace with the first one
            replica = _one_replica(variables)
            if replica is None:
                raise
            traced = traced_layers(model, replica, *args, method=method, **call_kwargs)
    except Exception as err:  # the model's own error, whatever its type: one line and a way out
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if "Expected more than 1 value per channel" in reason:
            hint = (
                " (a track_running_stats=False layer normalizes with the batch's statistics in "
                "eval too: give an example batch of 2 or more rows)"
            )
        raise ValueError(
            f"inspect_batchnorm could not trace {name}.apply(variables, ...) in eval mode to "
            f"find the layers' kinds: {reason}{hint}; inspect_batchnorm(variables) alone lists "
            "the stored statistics without kinds"
        ) from err
    return traced


def _one_replica(variables: Mapping[str, Any]) -> Any:
    """``variables[i][0]`` for every leaf when all leaves share a leading axis (a tree
    replicated for ``pmap``), else None."""
    leaves = jax.tree.leaves(variables)
    leading = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if not leaves or len(leading) != 1 or None in leading:
        return None
    return jax.tree.map(lambda leaf: leaf[0], variables)


def _stored_rows(path: Path, stats: Mapping, params: Mapping, kind: str | None) -> list:
    """One row per member of the layer at ``path`` (one row when it is not stacked)."""
    name = _name(path)
    mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    count = np.asarray(stats["num_batches_tracked"])
    leading = np.broadcast_shapes(mean.shape[:-1], var.shape[:-1]) if mean.ndim else ()
    channels = mean.shape[-1] if mean.ndim else 1
    arrays = {"mean": mean, "var": var, "num_batches_tracked": count}
    arrays.update({k: np.asarray(params[k], np.float64) for k in ("scale", "bias") if k in params})
    shapes = {"num_batches_tracked": leading}
    try:
        full = {
            k: np.broadcast_to(a, shapes.get(k, (*leading, channels))) for k, a in arrays.items()
        }
    except ValueError:  # shapes that do not belong together: say so, on one row
        described = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
        return [
            LayerSummary(
                name,
                channels,
                None,
                None,
                None,
                None,
                None,
                [f"shapes do not fit one layer: {described}"],
                kind,
            )
        ]
    rows = []
    for index in itertools.product(*map(range, leading)):
        member = f"{name}[{', '.join(map(str, index))}]" if leading else name
        rows.append(_summary_row(member, {k: a[index] for k, a in full.items()}, kind))
    return rows


def _summary_row(path: str, arrays: Mapping[str, np.ndarray], kind: str | None) -> LayerSummary:
    count = arrays["num_batches_tracked"]
    integral = np.issubdtype(count.dtype, np.integer) or np.issubdtype(count.dtype, np.bool_)
    steps = int(count) if integral else float(count)
    summary = LayerSummary(
        path,
        int(arrays["mean"].shape[-1]),
        steps,
        arrays["mean"],
        arrays["var"],
        arrays.get("scale"),
        arrays.get("bias"),
        kind=kind,
    )
    if not integral:
        summary.problems.append(FLOAT_COUNTER)
    elif steps == 0 and kind != FROZEN_KIND:  # a frozen layer's statistics are constants
        summary.problems.append(NEVER_UPDATED)
    _check_values(summary)
    return summary


def _untracked_row(path: Path, params: Mapping, kind: str | None) -> LayerSummary:
    scale = np.asarray(params["scale"], np.float64) if "scale" in params else None
    bias = np.asarray(params["bias"], np.float64) if "bias" in params else None
    channels = next((a.shape[-1] for a in (scale, bias) if a is not None and a.ndim), None)
    summary = LayerSummary(_name(path), channels, None, None, None, scale, bias, kind=kind)
    _check_values(summary)
    return summary


def _check_values(summary: LayerSummary) -> None:
    arrays = [a for a in (summary.mean, summary.var, summary.scale, summary.bias) if a is not None]
    if not all(np.all(np.isfinite(a)) for a in arrays):
        summary.problems.append("NaN/Inf in statistics or parameters")
    if summary.var is not None:
        collapsed = int(np.sum(summary.var < COLLAPSED_VAR))
        if collapsed:
            summary.problems.append(f"{collapsed} channel(s) with collapsed variance (< 1e-6)")
    if summary.scale is not None:
        dead = int(np.sum(np.abs(summary.scale) < DEAD_SCALE))
        if dead:
            summary.problems.append(f"{dead} dead channel(s) (|scale| < 1e-3)")


def _as_path(path: str | Path) -> Path:
    """A ``kinds`` key as a path tuple: ``"a/b"`` or ``("a", "b")``; ``""`` is the model."""
    if isinstance(path, str):
        return tuple(path.split("/")) if path else ()
    return tuple(str(key) for key in path)


def _name(path: Path) -> str:
    """A layer's row name: its ``/``-joined path, ``(top)`` for the model itself."""
    return "/".join(path) if path else "(top)"


def _params_at(variables: Mapping[str, Any], path: Path) -> Mapping:
    tree = variables.get("params", {})
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    return {k: v for k, v in tree.items() if not isinstance(v, Mapping)}


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


def _summary(a: np.ndarray | None) -> str:
    if a is None:
        return "-"
    return f"{np.mean(a):+.3g} [{np.min(a):+.2g}, {np.max(a):+.2g}]"


def _avg(a: np.ndarray | None) -> str:
    return "-" if a is None else f"{np.mean(a):+.3g}"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)
