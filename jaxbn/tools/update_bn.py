"""``update_bn``: recompute every batch norm's running statistics from a stream of batches.

The counterpart of ``torch.optim.swa_utils.update_bn``, for after weight averaging (SWA/EMA)
or any change that left the statistics stale: each jaxbn batch norm's statistics are reset and
re-estimated as the plain cumulative average over the batches (factor ``1/k`` for the k-th
batch, PyTorch's ``momentum=None``), so every batch weighs the same and
``num_batches_tracked`` ends as the number of batches.

How, without switching the modules' behaviour behind jit's back: the model runs in training
mode with the ``"batch_moments"`` collection mutable, so every batch norm *reports* its batch
statistics (count, mean, biased variance — merged over devices when synced) as data, and
``update_bn`` averages them itself with the running-update rule of
:func:`jaxbn.functional.update_running`. The model's own ``momentum`` plays no part, and a
jitted ``apply_fn`` gives the same result whichever call traced it first.

Example:
    >>> variables = jaxbn.update_bn(model.apply, variables, (x for x, _ in train_batches))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.core
import jax
import jax.numpy as jnp

from jaxbn._core.running import BatchMoments, update_running
from jaxbn.linen.batch_norm import MOMENTS_COLLECTION
from jaxbn.tools._tree import batch_norm_layers, get_path, set_path

__all__ = ["update_bn"]


def update_bn(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Resets and re-estimates the running statistics of every jaxbn batch norm.

    Args:
      apply_fn: ``model.apply``, or a (jitted) function with its signature: it is called as
        ``apply_fn(variables, x, train=True, mutable=("batch_stats", "batch_moments"),
        **apply_kwargs)`` and must return ``(y, updates)`` with both collections.
      variables: the model's variables; ``params`` are used as they are.
      batches: an iterable of inputs ``x``, or of tuples/lists whose first element is ``x``
        (like a data loader yielding ``(x, y)``).
      **apply_kwargs: further keyword arguments for ``apply_fn``.

    Returns:
      New variables: the same ``params``, fresh ``batch_stats``. With no batch norm in the
      model, the variables unchanged. A batch norm that no batch reached keeps the reset
      statistics (mean 0, var 1, count 0), as in PyTorch.

    Raises:
      ValueError: a batch norm was trained but reported no statistics: ``apply_fn`` did not
        pass ``mutable`` through to ``model.apply``, or the norm sits inside ``nn.scan`` /
        ``nn.vmap`` without ``"batch_moments"`` in ``variable_axes`` (then it says so).
    """
    variables = flax.core.unfreeze(variables)  # a mutable copy, also of a FrozenDict
    variables.pop(MOMENTS_COLLECTION, None)  # reports of an earlier call are not batches
    layers = [path for path, _, _ in batch_norm_layers(variables)]
    if not layers:
        return variables
    stats = variables["batch_stats"]
    for path in layers:
        layer = get_path(stats, path)
        set_path(stats, (*path, "mean"), jnp.zeros_like(layer["mean"]))
        set_path(stats, (*path, "var"), jnp.ones_like(layer["var"]))
        set_path(
            stats, (*path, "num_batches_tracked"), jnp.zeros_like(layer["num_batches_tracked"])
        )

    @jax.jit
    def step(variables, running, x):
        """One batch: the model's reports averaged into ``running`` ({path: stats})."""
        _, updates = apply_fn(
            variables, x, train=True, mutable=("batch_stats", MOMENTS_COLLECTION), **apply_kwargs
        )
        if not isinstance(updates, Mapping) or "batch_stats" not in updates:
            raise ValueError(
                "update_bn: apply_fn must return (y, updates) with the collections named in "
                "`mutable` (batch_stats and batch_moments), like model.apply"
            )
        reports = updates.get(MOMENTS_COLLECTION, {})
        unreported = {}
        for path in layers:
            layer_reports = _layer_reports(reports, path)
            for moments in layer_reports:
                running[path] = _accumulate(running[path], moments)
            if not layer_reports:  # trained without a report: nn.scan/nn.vmap drop them
                counter = get_path(updates["batch_stats"], path)["num_batches_tracked"]
                unreported[path] = jnp.any(counter > 0)
        return running, unreported

    running = {path: _running(get_path(stats, path)) for path in layers}
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        running, unreported = step(variables, running, x)
        _refuse_unreported(unreported)
    for path in layers:
        for key, value in running[path].items():
            set_path(stats, (*path, key), value)
    return variables


def _running(layer: Mapping[str, Any]) -> dict[str, Any]:
    return {key: layer[key] for key in ("mean", "var", "num_batches_tracked")}


def _refuse_unreported(unreported: Mapping[tuple[str, ...], jax.Array]) -> None:
    missing = ["/".join(path) or "(root)" for path, flag in unreported.items() if bool(flag)]
    if missing:
        raise ValueError(
            f"update_bn: batch norms {missing} were trained but reported no batch statistics. "
            "Inside nn.scan / nn.vmap, list the collection in variable_axes, e.g. "
            "variable_axes={'params': 0, 'batch_stats': 0, 'batch_moments': 0}; a wrapper "
            "apply_fn must forward its `mutable` argument to model.apply"
        )


def _layer_reports(reports: Mapping[str, Any], path: tuple[str, ...]) -> tuple[Any, ...]:
    try:
        return tuple(get_path(reports, (*path, "moments")))
    except (KeyError, TypeError):
        return ()  # not called in training on this batch


def _accumulate(layer: dict[str, Any], moments: dict[str, jax.Array]) -> dict[str, Any]:
    """One cumulative-average step: the k-th report weighs ``1/k``. Stacked layers (nn.scan,
    replicated pmap variables) have a leading axis on the counter and every statistic."""
    count = layer["num_batches_tracked"]
    momentum = 1.0 / (count.astype(layer["mean"].dtype) + 1)
    momentum = jnp.reshape(momentum, (*count.shape, *(1,) * (layer["mean"].ndim - count.ndim)))
    mean, var = update_running(layer["mean"], layer["var"], BatchMoments(**moments), momentum)
    return {"mean": mean, "var": var, "num_batches_tracked": count + 1}
