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

:func:`jaxbn.sync_batch_stats` is the other kind of sync: it averages *running* statistics that were
kept per device (batch norms without an ``axis_name``), like the cross-replica mean Flax's
ImageNet example applies to ``batch_stats``, keeping ``num_batches_tracked`` an integer. With
``axis_name`` (or this switch) the statistics are already identical on every device.

Example:
    >>> import functools, jax, jax.numpy as jnp, jaxbn
    >>> model = jaxbn.BatchNorm()                              # no axis_name of its own
    >>> n = jax.local_device_count()
    >>> x = jnp.arange(8.0 * n).reshape(n, 4, 2)              # [devices, per-device N, C]
    >>> variables = model.init(jax.random.key(0), x[0], train=False)
    >>> @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0))
    ... @jaxbn.sync_batch_norm("batch")
    ... def train_forward(variables, x):                        # x: [per-device N, C]
    ...     return model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> y, updates = train_forward(variables, x)
    >>> mean = updates["batch_stats"]["mean"][0]               # device 0's: the global batch's
    >>> bool(jnp.allclose(mean, 0.1 * x.reshape(-1, 2).mean(0)))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import config as _jax_config  # JAX's own jit-keyed trace-time states

__all__ = ["current_sync", "sync_batch_norm", "sync_batch_stats"]


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
    axis_name: str | Sequence[str],
    axis_index_groups: Sequence[Sequence[int]] | None,
    caller: str = "sync_batch_norm",
) -> SyncSpec:
    if isinstance(axis_name, str):
        name: str | tuple[str, ...] = axis_name
    elif (
        isinstance(axis_name, Sequence) and axis_name and all(isinstance(a, str) for a in axis_name)
    ):
        name = tuple(axis_name)
    else:
        raise TypeError(
            f"{caller}: axis_name must be a str or a sequence of str, got {axis_name!r}"
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

    Returns:
      A context manager that also decorates a function; entered, it gives the
      :class:`jaxbn.sync.SyncSpec` in force.

    Raises:
      TypeError: an ``axis_name`` that is not a string or a sequence of strings.

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> bn = jaxbn.BatchNorm()
        >>> x = jnp.arange(8.0).reshape(2, 2, 2)                  # [vmapped, N, C]
        >>> variables = bn.init(jax.random.key(0), x[0], train=False)
        >>> def step(x):
        ...     with jaxbn.sync_batch_norm("batch"):
        ...         return bn.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> _, updates = jax.vmap(step, axis_name="batch")(x)
        >>> updates["batch_stats"]["mean"]            # the same on both: 0.1·[3, 4]
        Array([[0.3, 0.4],
               [0.3, 0.4]], dtype=float32)
    """
    spec = _spec(axis_name, axis_index_groups)
    with _SYNC(spec):
        yield spec


def current_sync() -> SyncSpec | None:
    """The innermost active ``sync_batch_norm`` switch, or None."""
    return _SYNC.value


def sync_batch_stats(
    stats: Any,
    axis_name: str | Sequence[str],
    *,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Any:
    """Average per-device running statistics over a mapped axis; counters stay integers.

    Call it inside ``pmap`` / ``shard_map`` where ``axis_name`` is bound, on a ``batch_stats``
    tree (jaxbn's or Flax's) or any tree of them. Float leaves (``mean``, ``var``) are averaged
    with ``jax.lax.pmean``, as Flax's examples do. Integer leaves (``num_batches_tracked``) are
    not averaged: ``pmean`` would turn them into floats, which jaxbn's modules refuse. Every
    device counts the same steps, so the counters are equal by construction; the result is
    their ``pmax``, in their own dtype (a difference cannot be seen at trace time, and a
    run-time check would cost a host round trip every step).

    With ``axis_name`` on the batch norms (or under :func:`sync_batch_norm`) the running
    statistics are already identical on every device, and this changes nothing but rounding.

    Args:
      stats: a tree of arrays, e.g. ``variables["batch_stats"]``.
      axis_name: the mapped axis (or axes) to average over.
      axis_index_groups: optional device groups, each averaged separately (pmap only).

    Returns:
      ``stats`` with float leaves averaged and integer leaves kept.

    Raises:
      TypeError: a ``num_batches_tracked`` that is not an integer (averaged as a float
        earlier, e.g. by ``jax.lax.pmean``), or a leaf that is neither float nor integer.

    Example:
        >>> import functools, jax, jax.numpy as jnp, jaxbn
        >>> @functools.partial(jax.pmap, axis_name="batch")
        ... def cross_replica_mean(batch_stats):
        ...     return jaxbn.sync_batch_stats(batch_stats, "batch")
        >>> n = jax.local_device_count()
        >>> stats = {"mean": jnp.arange(n * 2.0).reshape(n, 2),        # [devices, C]
        ...          "num_batches_tracked": jnp.full((n,), 3, jnp.int32)}
        >>> synced = cross_replica_mean(stats)
        >>> bool(jnp.allclose(synced["mean"][0], stats["mean"].mean(0)))
        True
        >>> synced["num_batches_tracked"].dtype                        # still an integer
        dtype('int32')
    """
    spec = _spec(axis_name, axis_index_groups, "sync_batch_stats")
    groups = None if spec.axis_index_groups is None else [list(g) for g in spec.axis_index_groups]

    def sync(path, leaf):
        leaf = jnp.asarray(leaf)
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jax.lax.pmax(leaf, spec.axis_name, axis_index_groups=groups)
        if path and getattr(path[-1], "key", None) == "num_batches_tracked":
            raise TypeError(
                f"sync_batch_stats: {where} must be an integer counter, got dtype {leaf.dtype}: "
                "it was averaged as a float (jax.lax.pmean of batch_stats?); restore it as an "
                "integer (the number of training steps) and sync with jaxbn.sync_batch_stats"
            )
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.lax.pmean(leaf, spec.axis_name, axis_index_groups=groups)
        raise TypeError(
            f"sync_batch_stats: {where} has dtype {leaf.dtype}; running statistics are float "
            "arrays and counters integers"
        )

    return jax.tree_util.tree_map_with_path(sync, stats)
