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
      ValueError: ``apply_fn`` did not return the reported statistics (it must pass
        ``mutable`` through to ``model.apply``).
    """
    variables = flax.core.unfreeze(variables)  # a mutable copy, also of a FrozenDict
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

    mutable = ("batch_stats", MOMENTS_COLLECTION)
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        _, updates = apply_fn(variables, x, train=True, mutable=mutable, **apply_kwargs)
        reports = _reports(updates)
        for path in layers:
            for moments in _layer_reports(reports, path):
                layer = get_path(stats, path)
                running = {key: layer[key] for key in ("mean", "var", "num_batches_tracked")}
                for key, value in _accumulate(running, moments).items():
                    set_path(stats, (*path, key), value)
    return variables


def _reports(updates: Any) -> Mapping[str, Any]:
    if not isinstance(updates, Mapping) or MOMENTS_COLLECTION not in updates:
        raise ValueError(
            "update_bn: apply_fn returned no 'batch_moments' collection, so the batch "
            "statistics cannot be read; apply_fn must forward its `mutable` argument to "
            "model.apply (a jitted wrapper: jax.jit(model.apply, static_argnames=('train', "
            "'mutable')))"
        )
    return updates[MOMENTS_COLLECTION]


def _layer_reports(reports: Mapping[str, Any], path: tuple[str, ...]) -> tuple[Any, ...]:
    try:
        return tuple(get_path(reports, (*path, "moments")))
    except KeyError:
        return ()  # not called in training on this batch


@jax.jit
def _accumulate(layer: dict[str, Any], moments: dict[str, jax.Array]) -> dict[str, Any]:
    """One cumulative-average step: the k-th report weighs ``1/k``."""
    count = layer["num_batches_tracked"]
    momentum = 1.0 / (count.astype(layer["mean"].dtype) + 1)
    mean, var = update_running(layer["mean"], layer["var"], BatchMoments(**moments), momentum)
    return {"mean": mean, "var": var, "num_batches_tracked": count + 1}
