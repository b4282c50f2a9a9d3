"""``update_bn``: recompute every batch norm's running statistics from a stream of batches.

The counterpart of ``torch.optim.swa_utils.update_bn``, for after weight averaging (SWA/EMA)
or any change that left the statistics stale: each jaxbn batch norm's statistics are reset and
re-estimated as the plain cumulative average over the batches (momentum ``None``, factor
``1/num_batches_tracked``), so every batch weighs the same and ``num_batches_tracked`` ends as
the number of batches.

Example:
    >>> variables = jaxbn.update_bn(model.apply, variables, (x for x, _ in train_batches))
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.core
import jax
import jax.numpy as jnp

from jaxbn.tree_paths import batch_norm_layers, set_path

__all__ = ["cumulative_average_active", "update_bn"]

_CUMULATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "jaxbn_cumulative", default=False
)


@contextlib.contextmanager
def _cumulative_average() -> Iterator[None]:
    token = _CUMULATIVE.set(True)
    try:
        yield
    finally:
        _CUMULATIVE.reset(token)


def cumulative_average_active() -> bool:
    """True while ``update_bn`` traces the model: batch norms then use momentum ``None``."""
    return _CUMULATIVE.get()


def update_bn(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Resets and re-estimates the running statistics of every jaxbn batch norm.

    Args:
      apply_fn: ``model.apply`` (called as ``apply_fn(variables, x, train=True,
        mutable=["batch_stats"], **apply_kwargs)``).
      variables: the model's variables; ``params`` are used as they are.
      batches: an iterable of inputs ``x``, or of tuples/lists whose first element is ``x``
        (like a data loader yielding ``(x, y)``).
      **apply_kwargs: further keyword arguments for ``apply_fn``.

    Returns:
      New variables: the same ``params``, fresh ``batch_stats``. With no batch norm in the
      model, the variables unchanged.
    """
    variables = flax.core.unfreeze(variables)  # a mutable copy, also of a FrozenDict
    if not any(True for _ in batch_norm_layers(variables)):
        return variables
    stats = variables["batch_stats"]
    for path, layer, _ in batch_norm_layers(variables):
        set_path(stats, (*path, "mean"), jnp.zeros_like(layer["mean"]))
        set_path(stats, (*path, "var"), jnp.ones_like(layer["var"]))
        set_path(
            stats, (*path, "num_batches_tracked"), jnp.zeros_like(layer["num_batches_tracked"])
        )

    @jax.jit
    def accumulate(variables, x):
        with _cumulative_average():  # entered at trace time, inside the jitted function
            _, updates = apply_fn(variables, x, train=True, mutable=["batch_stats"], **apply_kwargs)
        return updates["batch_stats"]

    variables["batch_stats"] = stats
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        variables["batch_stats"] = accumulate(variables, x)
    return variables
