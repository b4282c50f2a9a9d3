"""Folding batch norm into the preceding conv/dense layer for inference.

In eval, ``bn(conv(x)) = γ·(W*x + b − μ)/√(σ²+ε) + β`` is one conv with

    W' = W · γ/√(σ²+ε)   (per output channel)        b' = (b − μ) · γ/√(σ²+ε) + β

— the counterpart of ``torch.nn.utils.fusion.fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``
in Flax layouts (the output channel is the kernel's last axis for both conv and dense).

``fold_batch_norm(model, variables, x)`` finds every batch norm fed directly by a Conv or Dense
layer (by watching one eval-mode call), folds it, and returns the model with ``norm="none"`` and
its variables: the same eval outputs, one pass fewer over every activation.

Example:
    >>> folded_model, folded_vars = jaxbn.fold_batch_norm(model, variables, x[:1])
    >>> folded_model.apply(folded_vars, x, train=False)        # == model.apply(..., train=False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.batch_norm import BatchNorm
from jaxbn.tree_paths import Path, batch_norm_layers, get_path, set_path

__all__ = [
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "fuse_conv_bn_weights",
    "fuse_dense_bn_weights",
]


def fuse_conv_bn_weights(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    eps: float,
    scale: jax.Array | None,
    bn_bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Conv kernel [*window, I, O] and bias [O] with a following batch norm folded in.

    Args:
      kernel: [*window, C_in, C_out] (Flax ``nn.Conv`` layout).
      bias: [C_out] or None (zeros).
      mean, var: the batch norm's running statistics [C_out].
      eps: the batch norm's eps.
      scale, bn_bias: the batch norm's affine parameters [C_out], or None (ones / zeros).

    Returns:
      ``(kernel', bias')`` in the dtypes of ``kernel`` and ``bias`` (or ``kernel``).
    """
    factor = jax.lax.rsqrt(var + eps)
    if scale is not None:
        factor = factor * scale
    bias_dtype = kernel.dtype if bias is None else bias.dtype
    bias = jnp.zeros_like(mean) if bias is None else bias
    bn_bias = jnp.zeros_like(mean) if bn_bias is None else bn_bias
    new_kernel = (kernel * factor).astype(kernel.dtype)
    new_bias = ((bias - mean) * factor + bn_bias).astype(bias_dtype)
    return new_kernel, new_bias


def fuse_dense_bn_weights(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    eps: float,
    scale: jax.Array | None,
    bn_bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Dense kernel [I, O] and bias [O] with a following batch norm folded in (see
    :func:`fuse_conv_bn_weights`; the output axis is last in both layouts)."""
    return fuse_conv_bn_weights(kernel, bias, mean, var, eps, scale, bn_bias)


def fold_batch_norm_variables(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> dict[str, Any]:
    """Variables with every batch norm folded into its producer and removed.

    Run them with a copy of the model that has no batch norm layers and the same names for
    everything else (for the jaxbn models: ``norm="none"``; :func:`fold_batch_norm` does that).

    Args:
      model: a Flax model using jaxbn batch norms, called as ``model.apply(v, x, train=...)``.
      variables: its variables, with tracked statistics.
      x: an example input (only shapes matter; one example is enough).

    Raises:
      ValueError: a batch norm whose statistics were never tracked, whose input does not come
        straight from a Conv/Dense layer, or whose producer has no bias.
    """
    layers = {path: (stats, params) for path, stats, params in batch_norm_layers(variables)}
    for path, (stats, _) in layers.items():
        if int(stats["num_batches_tracked"]) == 0:
            raise ValueError(
                f"cannot fold the batch norm at {'/'.join(path)}: its statistics were never "
                "tracked (num_batches_tracked == 0); train it or run jaxbn.update_bn first"
            )
    pairs = _find_producers(model, variables, x)
    params = flax.core.unfreeze(variables["params"])  # a mutable copy, also of a FrozenDict
    for bn_path, (producer, eps) in pairs.items():
        stats, bn_params = layers.get(bn_path, (None, None))
        if stats is None:
            raise ValueError(
                f"cannot fold the batch norm at {'/'.join(bn_path)}: it has no running "
                "statistics (track_running_stats=False)"
            )
        if producer is None:
            raise ValueError(
                f"cannot fold the batch norm at {'/'.join(bn_path)}: its input does not come "
                "straight from a Conv or Dense layer"
            )
        layer = get_path(params, producer)
        if "bias" not in layer:
            raise ValueError(
                f"cannot fold into {'/'.join(producer)}: it has no bias (use_bias=False)"
            )
        kernel, bias = fuse_conv_bn_weights(
            layer["kernel"],
            layer["bias"],
            stats["mean"],
            stats["var"],
            eps,
            bn_params.get("scale"),
            bn_params.get("bias"),
        )
        set_path(params, (*producer, "kernel"), kernel)
        set_path(params, (*producer, "bias"), bias)
        _remove(params, bn_path)
    return {"params": params}


def fold_batch_norm(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model with norm="none", folded variables)`` with the original's eval outputs.

    For the jaxbn models (any module with a ``norm`` field whose ``"none"`` setting drops the
    normalization layers and keeps every other name). See :func:`fold_batch_norm_variables`.
    """
    if not hasattr(model, "norm"):
        raise TypeError(
            f"{type(model).__name__} has no `norm` field; use fold_batch_norm_variables and a "
            "copy of the model without batch norm layers"
        )
    return model.clone(norm="none"), fold_batch_norm_variables(model, variables, x)


def _find_producers(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> dict[Path, tuple[Path | None, float]]:
    """Batch norm path → (path of the Conv/Dense whose output it normalizes, or None; eps)."""
    produced: list[tuple[Any, Path]] = []  # (output object, producer path); keeps outputs alive
    found: dict[Path, tuple[Path | None, float]] = {}

    def watch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        if isinstance(module, nn.Conv | nn.Dense):
            produced.append((out, tuple(module.scope.path)))
        elif isinstance(module, BatchNorm):
            if module.axis not in (-1, args[0].ndim - 1):
                raise ValueError(
                    f"cannot fold the batch norm at {'/'.join(module.scope.path)}: its feature "
                    "axis is not the producer's output axis (last)"
                )
            producer = next((p for o, p in produced if o is args[0]), None)
            found[tuple(module.scope.path)] = (producer, module.eps)
        return out

    with nn.intercept_methods(watch):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return found


def _remove(tree: dict, path: Path) -> None:
    parent = get_path(tree, path[:-1]) if len(path) > 1 else tree
    del parent[path[-1]]
    if len(path) > 1 and not parent:
        _remove(tree, path[:-1])
