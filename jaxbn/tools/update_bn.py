"""``update_bn``: recompute every batch norm's running statistics from a stream of batches.

The counterpart of ``torch.optim.swa_utils.update_bn``, for after weight averaging (SWA/EMA)
or any change that left the statistics stale: the statistics of each batch norm that trains
are re-estimated as the plain cumulative average over the batches (factor ``1/k`` for the
k-th batch statistics, PyTorch's ``momentum=None``), so every batch weighs the same and
``num_batches_tracked`` ends as the number of batch statistics averaged.

How, without switching the modules' behaviour behind jit's back: the model runs in training
mode, with its variables as they are, and the ``"batch_moments"`` collection named in
``mutable``; every batch norm that updates its statistics *reports* the batch statistics of each
update (count, mean, biased variance — merged over devices when synced) under its kind, and
``update_bn`` averages them itself with the running-update rule of
:func:`jaxbn._core.running.update_running`. The model's own ``momentum`` plays no part, and a
jitted ``apply_fn`` gives the same result whichever call traced it first.

What it does with each layer kind (:mod:`jaxbn.tools.layers`):

================  ===========================================================================
trained           re-estimated: the cumulative average over every call (``nn.scan`` carrying
                  one BN through T steps: T calls per batch, count T per batch, as torch)
untracked         nothing to do: it has no running statistics
frozen            left exactly as it was (``FrozenBatchNorm``, a ``freeze_batch_norm`` model, a
                  BN the model calls in eval): constants report nothing, so nothing is
                  written, and downstream layers see the frozen layer's constant map
ghost             re-estimated per virtual batch (count = virtual batches), as torch's BN
                  called split by split
renorm            re-estimated as a BatchNorm: the average of the batches' mean and unbiased
                  variance (its correction r, d uses its statistics as they were)
stacked           member by member (``nn.scan``/``nn.vmap`` over layers, pmap-replicated)
masked            only the elements the mask selects count, as in training
================  ===========================================================================

A layer is written only when it reported; one that no batch reached in training keeps its
statistics (torch resets those to 0/1: a layer that is not a ``_BatchNorm`` for torch, or that
no batch reached, is not distinguishable here from a frozen one, and a frozen layer must never
be reset).

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)     # Dense → BatchNorm → relu
    >>> x = jax.random.normal(jax.random.key(0), (16, 5))            # [N, features]
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> variables = {**variables, **updates}                         # one training step
    >>> batches = [x[:8], x[8:]]                       # any iterable of model inputs
    >>> variables = jaxbn.update_bn(model.apply, variables, batches)
    >>> variables["batch_stats"]["layers_1"]["num_batches_tracked"]   # the batches averaged
    Array(2, dtype=int32)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.core
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._core.running import BatchMoments, update_running
from jaxbn.linen.batch_norm import COUNTER, MOMENTS_COLLECTION
from jaxbn.tools._tree import Path, get_path, set_path
from jaxbn.tools.layers import RE_ESTIMATED, stacked_shape, stored_layers

__all__ = ["update_bn"]

#: What to do when a layer's reports do not fit its statistics under a Flax transform.
_AXES_ADVICE = (
    "inside nn.scan / nn.vmap give 'batch_moments' the variable_axes entry of 'batch_stats' "
    "(0 under nn.scan, also when 'batch_stats' is carried through the steps; None under "
    "nn.vmap when the members share one set of statistics)"
)


def update_bn(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Re-estimates the running statistics of every jaxbn batch norm that trains.

    Args:
      apply_fn: ``model.apply``, or a (jitted) function with its signature: it is called as
        ``apply_fn(variables, x, train=True, mutable=("batch_stats", "batch_moments"),
        **apply_kwargs)`` and must return ``(y, updates)`` with both collections.
      variables: the model's variables; ``params`` are used as they are, and so are the
        statistics while the batches run (frozen layers, and a ``BatchRenorm``'s correction,
        read them).
      batches: an iterable of inputs ``x``, or of tuples/lists whose first element is ``x``
        (like a data loader yielding ``(x, y)``).
      **apply_kwargs: further keyword arguments for ``apply_fn``.

    Returns:
      New variables: the same ``params``; for each batch norm that reported batch statistics
      (trained, ghost, renorm; stacked ones member by member) the cumulative average of them
      and ``num_batches_tracked`` = their number, in int32; every other layer (frozen, called
      in eval, reached by no batch) exactly as it was.

    Raises:
      ValueError: a batch norm updated its statistics but its reports did not reach
        ``update_bn`` (``apply_fn`` dropped ``mutable``, or an ``nn.scan``/``nn.vmap`` does not
        lift ``"batch_moments"``), or reported a number or shape of statistics that does not
        match its updates; the message says what to do.

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)
        >>> x = jax.random.normal(jax.random.key(0), (16, 5))        # [N, features]
        >>> variables = model.init(jax.random.key(1), x, train=False)
        >>> variables = jaxbn.update_bn(model.apply, variables, [x[:8], x[8:]])
        >>> variables["batch_stats"]["layers_4"]["num_batches_tracked"]
        Array(2, dtype=int32)
    """
    variables = flax.core.unfreeze(variables)  # a mutable copy, also of a FrozenDict
    variables.pop(MOMENTS_COLLECTION, None)  # reports of an earlier call are not batches
    layers = {path: stats for path, (stats, _) in stored_layers(variables).items()}
    if not layers:
        return variables

    @jax.jit
    def step(variables, running, x):
        """One batch: each layer's reports averaged into ``running`` ({path: stats}); also
        how many it reported and how far its own counter moved."""
        _, updates = apply_fn(
            variables, x, train=True, mutable=("batch_stats", MOMENTS_COLLECTION), **apply_kwargs
        )
        if not isinstance(updates, Mapping) or "batch_stats" not in updates:
            raise ValueError(
                "update_bn: apply_fn must return (y, updates) with the collections named in "
                "`mutable` (batch_stats and batch_moments), like model.apply"
            )
        reports = updates.get(MOMENTS_COLLECTION, {})
        tally = {}
        for path, stats in layers.items():
            moments = _layer_moments(reports, path, jnp.shape(stats["mean"]))
            if moments is not None:
                running[path] = _accumulate(running[path], moments)
            reported = 0 if moments is None else moments.count.shape[0]
            tally[path] = (jnp.asarray(reported), _counter_moved(variables, updates, path))
        return running, tally

    running = {path: _reset(stats) for path, stats in layers.items()}
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        running, tally = step(variables, running, x)
        _check_tally(tally)
        seen += 1
    stats_tree = variables["batch_stats"]
    reported = [path for path, new in running.items() if bool(jnp.any(new[COUNTER] > 0))]
    for path in reported:  # re-estimated; the others are left exactly as they were
        for key, value in running[path].items():
            set_path(stats_tree, (*path, key), value)
    if not reported:
        # A wholly frozen model is a correct no-op, but so silent an outcome must be visible:
        # an apply_fn that ignores train=True looks the same.
        warnings.warn(
            f"update_bn: no batch norm reported batch statistics over {seen} batch(es); the "
            f"{len(layers)} layer(s) with statistics are returned unchanged. Expected only when "
            "every batch norm is frozen; otherwise give batches, and an apply_fn that runs the "
            "model with the train=True it is given",
            UserWarning,
            stacklevel=2,
        )
    return variables


def _reset(layer: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The start of the average: mean 0, var 1, count 0 (int32), stacked like the layer."""
    return {
        "mean": jnp.zeros_like(layer["mean"]),
        "var": jnp.ones_like(layer["var"]),
        "num_batches_tracked": jnp.zeros(stacked_shape(layer), jnp.int32),
    }


def _name(path: Path) -> str:
    return "/".join(path) or "(root)"


def _layer_moments(
    reports: Mapping[str, Any], path: Path, shape: tuple[int, ...]
) -> BatchMoments | None:
    """The layer's reports of this batch, in call order, stacked on a new leading axis:
    ``[k, *shape]`` each (``shape``: the running mean's, stacked members included), or None.

    A report carries extra leading axes when the layer ran several times inside a transform
    that stacks its reports (``nn.scan`` carrying the statistics: ``[T, C]`` for a ``[C]``
    layer); they are calls in order.
    """
    try:
        entries = get_path(reports, path)
    except (KeyError, TypeError):
        return None  # not called in training on this batch (or frozen: never reports)
    if not isinstance(entries, Mapping):
        return None
    calls = []
    for kind in RE_ESTIMATED:  # a frozen or untracked layer has no batch statistics
        for entry in entries.get(kind, ()):
            got = tuple(jnp.shape(entry["mean"]))
            if len(got) < len(shape) or got[len(got) - len(shape) :] != shape:
                raise ValueError(
                    f"update_bn: the batch norm {_name(path)} reported batch statistics of "
                    f"shape {got} for running statistics of shape {shape}: {_AXES_ADVICE}"
                )
            steps = math.prod(got[: len(got) - len(shape)])
            calls.append({k: jnp.reshape(entry[k], (steps, *shape)) for k in BatchMoments._fields})
    if not calls:
        return None
    return BatchMoments(**{k: jnp.concatenate([c[k] for c in calls]) for k in BatchMoments._fields})


def _counter_moved(
    variables: Mapping[str, Any], updates: Mapping[str, Any], path: Path
) -> jax.Array:
    """How many updates the layer's own counter counted on this batch (0 when absent)."""
    before = get_path(variables["batch_stats"], path)["num_batches_tracked"]
    try:
        after = get_path(updates["batch_stats"], path)["num_batches_tracked"]
    except (KeyError, TypeError):
        return jnp.zeros(jnp.shape(before), jnp.int32)
    return (jnp.asarray(after) - before).astype(jnp.int32)


def _check_tally(tally: Mapping[Path, tuple[jax.Array, jax.Array]]) -> None:
    """Refuses before anything is written: a layer that updated its statistics without
    reporting them, or reported another number of statistics than it counted."""
    unreported = []
    for path, (reported, moved) in tally.items():
        reported, moved = int(reported), np.asarray(moved)
        if reported == 0 and np.any(moved > 0):
            unreported.append(_name(path))
        elif reported and np.any(moved != reported):
            raise ValueError(
                f"update_bn: the batch norm {_name(path)} reported {reported} batch statistics "
                f"per member for {sorted(set(moved.ravel().tolist()))} updates of its counter: "
                f"{_AXES_ADVICE}"
            )
    if unreported:
        raise ValueError(
            f"update_bn: batch norms {unreported} were trained but reported no batch "
            "statistics: apply_fn must pass its `mutable` argument on to model.apply, and "
            f"{_AXES_ADVICE}"
        )


def _accumulate(layer: dict[str, jax.Array], moments: BatchMoments) -> dict[str, jax.Array]:
    """The cumulative average over the reports in order (``moments``: ``[k, *shape]``): the
    n-th weighs ``1/n``. Stacked layers (nn.scan over layers, replicated pmap variables) have
    leading axes on the counter and every statistic: each member is averaged on its own."""

    def one(layer, report):
        count = layer["num_batches_tracked"]
        momentum = 1.0 / (count.astype(layer["mean"].dtype) + 1)
        momentum = jnp.reshape(momentum, (*count.shape, 1))
        mean, var = update_running(layer["mean"], layer["var"], BatchMoments(*report), momentum)
        return {"mean": mean, "var": var, "num_batches_tracked": count + 1}, None

    layer, _ = jax.lax.scan(one, layer, tuple(moments))
    return layer
