"""One switch that syncs every jaxbn batch norm in a model across devices.

The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)``, without editing
or rebuilding the model: inside ``sync_batch_norm(axis_name)``, every ``jaxbn.BatchNorm`` that
was built without an ``axis_name`` of its own merges its training statistics over
``axis_name``. Module fields and the variables tree are untouched, so checkpoints move freely
between synced and unsynced runs.

The switch acts while the model is *traced*, so put it inside the function you map (or
decorate that function); a jitted function traced outside the switch stays unsynced.

Example:
    >>> import functools, jax
    >>> @functools.partial(jax.pmap, axis_name="batch")
    ... @jaxbn.sync_batch_norm("batch")
    ... def train_forward(variables, x):                        # x: [per-device N, ...]
    ...     return model.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import NamedTuple

__all__ = ["current_sync", "sync_batch_norm"]


class SyncSpec(NamedTuple):
    """The mapped axis (and optional device groups) batch statistics are merged over."""

    axis_name: str | Sequence[str]
    axis_index_groups: Sequence[Sequence[int]] | None = None


_SYNC: contextvars.ContextVar[SyncSpec | None] = contextvars.ContextVar("jaxbn_sync", default=None)


@contextlib.contextmanager
def sync_batch_norm(
    axis_name: str | Sequence[str], axis_index_groups: Sequence[Sequence[int]] | None = None
) -> Iterator[SyncSpec]:
    """Context manager (and decorator): sync jaxbn batch norms traced inside over ``axis_name``.

    Args:
      axis_name: the pmap / shard_map axis name (or names) the batch is split over.
      axis_index_groups: optional device groups, each synced separately (pmap only).
    """
    spec = SyncSpec(axis_name, axis_index_groups)
    token = _SYNC.set(spec)
    try:
        yield spec
    finally:
        _SYNC.reset(token)


def current_sync() -> SyncSpec | None:
    """The innermost active ``sync_batch_norm`` switch, or None."""
    return _SYNC.get()
