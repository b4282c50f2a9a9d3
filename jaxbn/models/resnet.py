"""The tutorial's ``ResidualBlock`` and a CIFAR-style ResNet built from it (Flax, channels-last).

Block: conv3x3(stride) → norm → ReLU → conv3x3 → norm, plus a shortcut (identity, or conv1x1
(stride) → norm when stride or width changes), then ReLU. Names follow the PyTorch twin:
``conv1, bn1, conv2, bn2, shortcut_0, shortcut_1``; the network: ``conv1, bn1,
layer{i}_{j}, fc``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.models.norms import NormalizedModel, NormFactory, NormKind


class ResidualBlock(NormalizedModel):
    """``x`` [N, H, W, C_in] → [N, H/stride, W/stride, out_channels].

    ``norm``, ``bn_momentum``, ``dtype``, ``param_dtype``: keyword-only, see
    :class:`~jaxbn.models.norms.NormalizedModel`.
    """

    out_channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, self.out_channels, **self.layer_dtypes)
        identity = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            identity = conv((1, 1), self.stride, padding=0, name="shortcut_0")(x)
            identity = self.normalize(identity, train=train, name="shortcut_1")
        out = conv((3, 3), self.stride, padding=1, name="conv1")(x)
        out = nn.relu(self.normalize(out, train=train, name="bn1"))
        out = conv((3, 3), padding=1, name="conv2")(out)
        out = self.normalize(out, train=train, name="bn2")
        return nn.relu(out + identity)


class ResNet(NormalizedModel):
    """CIFAR-style ResNet: conv3x3 stem, stages of residual blocks, global average pool, fc.

    Attributes:
      stage_sizes: blocks per stage (ResNet-18: 2, 2, 2, 2).
      widths: channels per stage (ResNet-18: 64, 128, 256, 512); stages after the first
        halve the resolution.
      num_classes: number of outputs.
      norm, bn_momentum, dtype, param_dtype: keyword-only, see
        :class:`~jaxbn.models.norms.NormalizedModel`. ``norm``: "batch", "group", "layer",
        "none", or a factory such as ``functools.partial(jaxbn.GroupNorm, 8)``.

    Call: ``x`` [N, H, W, C_in], ``train`` → logits [N, K].
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Conv(self.widths[0], (3, 3), padding=1, name="conv1", **self.layer_dtypes)(x)
        x = nn.relu(self.normalize(x, train=train, name="bn1"))
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(
                    width,
                    stride,
                    norm=self.norm,
                    bn_momentum=self.bn_momentum,
                    **self.layer_dtypes,
                    name=f"layer{stage + 1}_{block}",
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc", **self.layer_dtypes)(x)


def resnet18(
    num_classes: int = 10,
    norm: NormKind | NormFactory = "batch",
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> ResNet:
    """The CIFAR ResNet-18 (11M parameters); ``norm`` and the dtypes as in :class:`ResNet`."""
    return ResNet(
        (2, 2, 2, 2),
        (64, 128, 256, 512),
        num_classes,
        norm=norm,
        dtype=dtype,
        param_dtype=param_dtype,
    )
