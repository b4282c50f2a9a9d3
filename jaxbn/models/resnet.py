"""The tutorial's ``ResidualBlock`` and a CIFAR-style ResNet built from it (Flax, channels-last).

Block: conv3x3(stride) → norm → ReLU → conv3x3 → norm, plus a shortcut (identity, or conv1x1
(stride) → norm when stride or width changes), then ReLU. Names follow the PyTorch twin:
``conv1, bn1, conv2, bn2, shortcut_0, shortcut_1``; the network: ``conv1, bn1,
layer{i}_{j}, fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.models.norms import NormKind, check_norm, norm


class ResidualBlock(nn.Module):
    """``x`` [N, H, W, C_in] → [N, H/stride, W/stride, out_channels]."""

    out_channels: int
    stride: int = 1
    norm: NormKind = "batch"
    bn_momentum: float | None = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        identity = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            identity = nn.Conv(
                self.out_channels, (1, 1), strides=self.stride, padding=0, name="shortcut_0"
            )(x)
            identity = norm(
                self.norm, identity, train=train, name="shortcut_1", bn_momentum=self.bn_momentum
            )
        out = nn.Conv(self.out_channels, (3, 3), strides=self.stride, padding=1, name="conv1")(x)
        out = nn.relu(norm(self.norm, out, train=train, name="bn1", bn_momentum=self.bn_momentum))
        out = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv2")(out)
        out = norm(self.norm, out, train=train, name="bn2", bn_momentum=self.bn_momentum)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet: conv3x3 stem, stages of residual blocks, global average pool, fc.

    Attributes:
      stage_sizes: blocks per stage (ResNet-18: 2, 2, 2, 2).
      widths: channels per stage (ResNet-18: 64, 128, 256, 512); stages after the first
        halve the resolution.
      num_classes: number of outputs.
      bn_momentum: batch norm momentum (PyTorch meaning: weight of the new batch).
      norm: "batch", "group", "layer", "none".

    Call: ``x`` [N, H, W, C_in], ``train`` → logits [N, K].
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 10
    norm: NormKind = "batch"
    bn_momentum: float | None = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_norm(self.norm)
        x = nn.Conv(self.widths[0], (3, 3), padding=1, name="conv1")(x)
        x = nn.relu(norm(self.norm, x, train=train, name="bn1", bn_momentum=self.bn_momentum))
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(
                    width, stride, self.norm, self.bn_momentum, name=f"layer{stage + 1}_{block}"
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


def resnet18(num_classes: int = 10, norm: NormKind = "batch") -> ResNet:
    """The CIFAR ResNet-18 (11M parameters)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, norm)
