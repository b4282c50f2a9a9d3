"""Convert ``flax.linen.BatchNorm`` variables (a Flax checkpoint) to jaxbn's.

Flax and jaxbn name the variables alike (``params: scale, bias``; ``batch_stats: mean, var``),
so a Flax checkpoint restores into a jaxbn model's tree shape except for two things a restore
cannot know: Flax's running variance is the EMA of **biased** batch variances (jaxbn's and
PyTorch's of unbiased ones), and Flax has no ``num_batches_tracked``. jaxbn's modules refuse
statistics without the counter, naming :func:`from_flax_batch_norm`, which adds both.

The assumption it states: every training batch gave each channel the same number ``n`` of
values (``batch_count``: the examples × the positions per example, over all devices when Flax
synced with ``axis_name`` — Flax's merge then equals the global biased variance — or one
device's when it did not). Then, after ``t`` steps of momentum ``m`` (Flax's meaning) from the
initial variance 1::

    flax_var  = m**t + (1 - m) * Σ m**(t-1-i) * σ²_i              (biased σ²_i)
    jaxbn_var = m**t + (1 - m) * Σ m**(t-1-i) * σ²_i * n / (n-1)
              = n / (n-1) * (flax_var - m**t) + m**t

exactly; the running mean needs no change. With masks or batches of varying size the result is
the same formula for a typical ``n`` (an approximation).

Not for PyTorch statistics: a torch ``state_dict`` without ``num_batches_tracked`` (saved by
torch < 0.4.1, or torchvision's ``FrozenBatchNorm2d`` buffers) already holds the unbiased
variance. Load it with :func:`jaxbn.interop.torch_to_flax`, which adds the counter as torch's
``load_state_dict`` does and keeps every number; converting it here would scale its variance
by ``n/(n-1)`` although it is already unbiased (on a ResNet-50 that moved the logits by
0.124).

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
    >>> flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jnp.ones((256, 7, 7, 4))                                  # [N, H, W, C]
    >>> flax_variables = flax_bn.init(jax.random.key(0), x)
    >>> variables = jaxbn.from_flax_batch_norm(
    ...     flax_variables, batch_count=256 * 7 * 7, num_batches_tracked=100,
    ...     flax_momentum=0.9)
    >>> sorted(variables["batch_stats"])
    ['mean', 'num_batches_tracked', 'var']
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp

from jaxbn.tools._tree import module_leaves

__all__ = ["from_flax_batch_norm"]


def from_flax_batch_norm(
    variables: Mapping[str, Any],
    *,
    batch_count: int | Mapping[str, int],
    num_batches_tracked: int,
    flax_momentum: float,
) -> dict[str, Any]:
    """``flax.linen.BatchNorm`` variables → jaxbn's (``jaxbn.BatchNorm`` or
    ``jaxbn.flax_compat.BatchNorm``), under the assumption in the module docstring.

    Every ``batch_stats`` entry with ``mean`` and ``var`` and no counter is a Flax batch norm:
    its variance becomes the unbiased running variance and it gets ``num_batches_tracked``.
    ``params`` and other collections are kept as they are (the names already agree).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` as Flax saved them (a leading device
        axis, as in replicated pmap state, is kept: the counter gets the same leading axes).
      batch_count: values per channel in one training batch, ``n`` ≥ 2; one int for every
        layer, or ``{path: n}`` per layer with paths inside ``batch_stats`` such as
        ``"ResNetBlock_0/BatchNorm_1"`` (layers at different resolutions see different ``n``).
      num_batches_tracked: the training steps of the Flax run (e.g. ``int(state.step)``): the
        counter jaxbn continues from. It sets the cumulative average of ``momentum=None``, so
        it is asked for, never defaulted to 0.
      flax_momentum: the run's momentum in Flax's meaning (e.g. 0.9); it removes the initial
        variance's share ``flax_momentum ** num_batches_tracked`` exactly.

    Returns:
      A new variables dict for the jaxbn model.

    Raises:
      ValueError: no ``batch_stats``, no Flax batch norm in it, a layer already converted
        (it has a counter), ``mean`` without ``var``, a ``batch_count`` below 2 or missing
        for a layer, a counter or momentum out of range.
      TypeError: non-integer ``batch_count`` / ``num_batches_tracked``, non-float momentum.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
        >>> x = jnp.ones((8, 4))                                         # [N, C]
        >>> flax_variables = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
        >>> variables = jaxbn.from_flax_batch_norm(
        ...     flax_variables, batch_count=8, num_batches_tracked=10, flax_momentum=0.9)
        >>> variables["batch_stats"]["num_batches_tracked"]
        Array(10, dtype=int32)
    """
    _check_int(num_batches_tracked, "num_batches_tracked", low=0, high=jnp.iinfo(jnp.int32).max)
    if isinstance(flax_momentum, bool) or not isinstance(flax_momentum, numbers.Real):
        raise TypeError(f"flax_momentum must be a float, got {flax_momentum!r}")
    if not 0.0 <= flax_momentum < 1.0:
        raise ValueError(
            f"flax_momentum is Flax's (the weight of the old value, e.g. 0.9), in [0, 1); "
            f"got {flax_momentum}"
        )
    variables = flax.core.unfreeze(variables)  # a copy; a FrozenDict is accepted too
    if not isinstance(variables, dict) or "batch_stats" not in variables:
        raise ValueError(
            "from_flax_batch_norm: variables has no 'batch_stats' collection; pass the whole "
            "variables dict ({'params': ..., 'batch_stats': ...}) of the Flax model"
        )
    stats = variables["batch_stats"]
    layers = []
    for path, leaves in module_leaves(stats):
        where = "/".join(("batch_stats", *path))
        if "num_batches_tracked" in leaves:
            raise ValueError(
                f"from_flax_batch_norm: {where} already has num_batches_tracked: these are "
                "jaxbn statistics (converting again would scale the variance twice)"
            )
        if "mean" in leaves or "var" in leaves:
            if not {"mean", "var"} <= set(leaves):
                raise ValueError(f"from_flax_batch_norm: {where} has only {sorted(leaves)}")
            layers.append(path)
    if not layers:
        raise ValueError(
            "from_flax_batch_norm: no flax.linen.BatchNorm statistics (mean and var) in batch_stats"
        )
    counts = _batch_counts(batch_count, layers)
    residual = float(flax_momentum) ** num_batches_tracked  # the initial variance's share
    for path in layers:
        layer = _get(stats, path)
        n = counts["/".join(path)]
        var = jnp.asarray(layer["var"])
        unbiased = n / (n - 1)
        layer["var"] = (unbiased * (var - residual) + residual).astype(var.dtype)
        layer["num_batches_tracked"] = jnp.full(
            jnp.shape(layer["mean"])[:-1], num_batches_tracked, jnp.int32
        )
    return variables


def _get(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _check_int(value: Any, name: str, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high or '∞'}], got {value}")


def _batch_counts(
    batch_count: int | Mapping[str, int], layers: list[tuple[str, ...]]
) -> dict[str, int]:
    names = ["/".join(path) for path in layers]
    if isinstance(batch_count, Mapping):
        missing = [name for name in names if name not in batch_count]
        unknown = sorted(set(batch_count) - set(names))
        if missing or unknown:
            raise ValueError(
                f"from_flax_batch_norm: batch_count has no entry for {missing} and entries "
                f"for no batch norm: {unknown}; its keys are the paths inside batch_stats: "
                f"{names}"
            )
        counts = dict(batch_count)
    else:
        counts = dict.fromkeys(names, batch_count)
    for name, n in counts.items():
        # n = 1 has no unbiased variance (PyTorch and jaxbn refuse to train on it).
        _check_int(n, f"batch_count for {name or '(root)'}", low=2)
    return counts
