"""``inspect_batch_norm`` and ``update_bn`` for Equinox models with jaxbn.equinox batch norms.

* :func:`~jaxbn.equinox.inspect_batch_norm` — the table of :func:`jaxbn.inspect_batchnorm`
  (running mean/var, counter, γ, β per layer; never-updated statistics, NaN/Inf, collapsed
  variance and dead channels flagged) for an Equinox model and its state. Rows:
  ``BatchNorm*`` (kind ``trained``, or ``untracked`` without running statistics) and
  ``FrozenBatchNorm`` (``frozen``: constants, never flagged as not updated), in the model's
  order.
* :func:`~jaxbn.equinox.update_bn` — ``torch.optim.swa_utils.update_bn``: every tracking
  ``BatchNorm``'s statistics are reset and re-estimated over the given batches as the
  cumulative average (``momentum=None``), the counter ends at the number of batches; the model
  itself (weights, momentum) comes back unchanged, frozen layers are left alone.

Example:
    >>> import jaxbn.equinox as jbn
    >>> model, state = eqx.nn.make_with_state(jbn.BatchNorm1d)(3, axis_name="batch")
    >>> batches = [jnp.arange(12.0).reshape(4, 3), jnp.ones((4, 3))]      # [N, C] each
    >>> state = update_bn(model, state, batches)          # e.g. after SWA weight averaging
    >>> print(inspect_batch_norm(model, state))
    layer kind ... steps ... flags
    ...
          trained   3      2 ...  ok
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.equinox.batch_norm import BatchNorm, FrozenBatchNorm
from jaxbn.tools.inspect_bn import BatchNormReport, _summary_row, _untracked_row

__all__ = ["batch_norm_layers", "inspect_batch_norm", "update_bn"]

_LAYERS = (BatchNorm, FrozenBatchNorm)


def _name(key: Any) -> str:
    for attr in ("name", "idx", "key"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def batch_norm_layers(model: Any) -> list[tuple[str, Any]]:
    """``(path, layer)`` of every jaxbn.equinox batch norm in ``model``, in its order; the
    path joins attribute names and indices with dots (``"layers.1"``; ``""`` for a bare
    layer)."""
    found = jax.tree_util.tree_flatten_with_path(
        model, is_leaf=lambda node: isinstance(node, _LAYERS)
    )[0]
    return [
        (".".join(_name(k) for k in path), layer)
        for path, layer in found
        if isinstance(layer, _LAYERS)
    ]


def inspect_batch_norm(model: Any, state: eqx.nn.State) -> BatchNormReport:
    """The :class:`jaxbn.BatchNormReport` of ``model``'s batch norms (``str()``: the table)."""
    rows = []
    for path, layer in batch_norm_layers(model):
        params = {}
        if layer.weight is not None:
            params = {"scale": np.asarray(layer.weight), "bias": np.asarray(layer.bias)}
        if isinstance(layer, FrozenBatchNorm):
            arrays = {
                "mean": np.asarray(layer.running_mean),
                "var": np.asarray(layer.running_var),
                "num_batches_tracked": np.asarray(0),
                **params,
            }
            rows.append(_summary_row(path, arrays, "frozen"))
        elif layer.state_index is None:
            rows.append(_untracked_row((path,), params, "untracked"))
        else:
            stats = state.get(layer.state_index)
            arrays = {
                "mean": np.asarray(stats.mean),
                "var": np.asarray(stats.var),
                "num_batches_tracked": np.asarray(stats.num_batches_tracked),
                **params,
            }
            rows.append(_summary_row(path, arrays, "trained"))
    return BatchNormReport(rows)


def _per_example(model: Any, state: eqx.nn.State, x: Any) -> eqx.nn.State:
    """The Equinox idiom: one example per call inside ``jax.vmap(axis_name="batch")``."""
    forward = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return forward(x, state)[1]


def _cumulative(layer: BatchNorm) -> BatchNorm:
    # momentum is a static field (eqx.tree_at cannot set it): a copy with momentum=None
    twin = copy.copy(layer)
    object.__setattr__(twin, "momentum", None)
    object.__setattr__(twin, "inference", False)
    return twin


def update_bn(
    model: Any,
    state: eqx.nn.State,
    batches: Iterable[Any],
    *,
    forward: Callable[[Any, eqx.nn.State, Any], eqx.nn.State] | None = None,
) -> eqx.nn.State:
    """Re-estimates every tracking ``BatchNorm``'s running statistics over ``batches``.

    Args:
      model: the Equinox model (unchanged; its layers run in training mode here).
      state: its state; the returned one holds the new statistics.
      batches: inputs, one per step (as ``forward`` takes them).
      forward: ``forward(model, state, batch) -> state``; default: the per-example call
        ``jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))``.

    Returns:
      The new state: per layer the cumulative average of the batches' means and unbiased
      variances (torch's ``update_bn``), ``num_batches_tracked`` = the number of batches.
    """
    forward = forward or _per_example
    layers = [(path, layer) for path, layer in batch_norm_layers(model)]
    tracking = [
        layer
        for _, layer in layers
        if isinstance(layer, BatchNorm) and layer.state_index is not None
    ]
    if not tracking:
        return state
    for layer in tracking:
        stats = state.get(layer.state_index)
        state = state.set(
            layer.state_index,
            type(stats)(
                jnp.zeros_like(stats.mean),
                jnp.ones_like(stats.var),
                jnp.zeros_like(stats.num_batches_tracked),
            ),
        )
    ids = {id(layer) for layer in tracking}
    estimating = jax.tree.map(
        lambda node: _cumulative(node) if id(node) in ids else node,
        model,
        is_leaf=lambda node: isinstance(node, _LAYERS),
    )
    step = eqx.filter_jit(forward)
    for batch in batches:
        state = step(estimating, state, batch)
    return state
