"""One switch that syncs every jaxbn batch norm in a model across devices.

The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)``, without editing
or rebuilding the model: inside ``sync_batch_norm(axis_name)``, every ``jaxbn.BatchNorm`` that
was built without an ``axis_name`` of its own merges its training statistics over
``axis_name``. Module fields and the variables tree are untouched, so checkpoints move freely
between synced and unsynced runs.

The switch acts while the model is *traced*, so it is part of JAX's jit cache key — the
mechanism JAX uses for its own trace-time switches such as ``jax.default_matmul_precision``. A
jitted function traced without the switch is traced again when called inside it (and the
other way round), so no cached trace can run unsynced where sync was asked for, or synced
where it was not. The explicit alternative is the module field ``axis_name``.

Example:
    >>> import functools, jax
    >>> @functools.partial(jax.pmap, axis_name="batch")
    ... @jaxbn.sync_batch_norm("batch")
    ... def train_forward(variables, x):                        # x: [per-device N, ...]
    ...     return model.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from jax._src import config as _jax_config  # JAX's own jit-keyed trace-time states

__all__ = ["current_sync", "sync_batch_norm"]


class SyncSpec(NamedTuple):
    """The mapped axis (and optional device groups) batch statistics are merged over."""

    axis_name: str | tuple[str, ...]
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None


# include_in_jit_key: jit (and pmap) trace anew when the switch differs from the cached trace.
# The value is hashable (a SyncSpec of tuples) because it becomes part of the cache key.
_NAME = "jaxbn_sync_batch_norm_spec"
# A module reload (IPython's autoreload) must reuse the state: JAX refuses a second definition.
_SYNC = _jax_config.config_states.get(_NAME)
if _SYNC is None:
    _SYNC = _jax_config.string_or_object_state(
        _NAME,
        None,
        "The axis jaxbn batch norms without an axis_name sync over (set by jaxbn.sync_batch_norm).",
        include_in_jit_key=True,
        include_in_trace_context=True,
    )


def _spec(
    axis_name: str | Sequence[str], axis_index_groups: Sequence[Sequence[int]] | None
) -> SyncSpec:
    if isinstance(axis_name, str):
        name: str | tuple[str, ...] = axis_name
    elif (
        isinstance(axis_name, Sequence) and axis_name and all(isinstance(a, str) for a in axis_name)
    ):
        name = tuple(axis_name)
    else:
        raise TypeError(
            f"sync_batch_norm: axis_name must be a str or a sequence of str, got {axis_name!r}"
        )
    groups = None
    if axis_index_groups is not None:
        groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    return SyncSpec(name, groups)


@contextlib.contextmanager
def sync_batch_norm(
    axis_name: str | Sequence[str], axis_index_groups: Sequence[Sequence[int]] | None = None
) -> Iterator[SyncSpec]:
    """Context manager (and decorator): sync jaxbn batch norms traced inside over ``axis_name``.

    Args:
      axis_name: the pmap / shard_map / vmap axis name (or names) the batch is split over.
      axis_index_groups: optional device groups, each synced separately (pmap only).
    """
    spec = _spec(axis_name, axis_index_groups)
    with _SYNC(spec):
        yield spec


def current_sync() -> SyncSpec | None:
    """The innermost active ``sync_batch_norm`` switch, or None."""
    return _SYNC.value
