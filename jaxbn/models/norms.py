"""The normalization slot of the models: one switch picks batch, group, layer norm or none.

With ``"none"`` the slot is empty and every other layer keeps its name, so a ``"batch"`` model
whose batch norms were all folded (:func:`jaxbn.fold_batch_norm`) runs as the ``"none"`` model.
"""

from __future__ import annotations

from typing import Literal

import jax

from jaxbn.linen.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d
from jaxbn.linen.group_norm import GroupNorm
from jaxbn.linen.layer_norm import LayerNorm

NormKind = Literal["batch", "group", "layer", "none"]
NORM_KINDS: tuple[str, ...] = ("batch", "group", "layer", "none")


def check_norm(kind: str) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


def norm(
    kind: NormKind, x: jax.Array, *, train: bool, name: str, bn_momentum: float | None = 0.1
) -> jax.Array:
    """Applies the chosen normalization to ``x`` ([N, C] or [N, H, W, C]) inside a compact module.

    Batch norm is ``BatchNorm1d`` for [N, C] and ``BatchNorm2d`` for [N, H, W, C]; group norm uses
    the largest group count ≤ 32 that divides C; layer norm normalizes each example over all of
    its features (the tutorial's ``nn.LayerNorm([C, H, W])``). ``bn_momentum`` is batch norm's
    (PyTorch meaning).
    """
    check_norm(kind)
    channels = x.shape[-1]
    if kind == "batch":
        cls: type[BatchNorm] = BatchNorm1d if x.ndim == 2 else BatchNorm2d
        return cls(channels, momentum=bn_momentum, name=name)(x, train=train)
    if kind == "group":
        groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
        return GroupNorm(groups, channels, name=name)(x)
    if kind == "layer":
        return LayerNorm(x.shape[1:], name=name)(x)
    return x
