"""The tutorial's ``ConvNetWithBN`` as a Flax module (channels-last).

Three conv blocks (64, 128, 256 channels; conv3x3 → norm → ReLU, max-pool after the first two)
and a classifier (Dense 512 → BatchNorm1d → ReLU → Dense K). Layer names follow the PyTorch
twin (``features_0`` = ``features.0``, ``classifier_0`` = ``classifier.0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.models.norms import NormKind, check_norm, norm


class ConvNet(nn.Module):
    """Conv blocks with normalization before ReLU, then a normalized MLP classifier.

    Attributes:
      widths: channels of the three conv blocks (tutorial: 64, 128, 256).
      hidden: width of the classifier's hidden layer (tutorial: 512).
      num_classes: number of outputs.
      bn_momentum: batch norm momentum (PyTorch meaning: weight of the new batch).
      norm: "batch" (tutorial), "group", "layer", "none".

    Call: ``x`` [N, H, W, C_in] (H, W divisible by 4), ``train`` → logits [N, K].
    """

    widths: Sequence[int] = (64, 128, 256)
    hidden: int = 512
    num_classes: int = 10
    norm: NormKind = "batch"
    bn_momentum: float | None = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_norm(self.norm)
        index = 0  # position in the PyTorch twin's `features` nn.Sequential
        for block, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding=1, name=f"features_{index}")(x)
            x = norm(
                self.norm,
                x,
                train=train,
                name=f"features_{index + 1}",
                bn_momentum=self.bn_momentum,
            )
            x = nn.relu(x)
            index += 3
            if block < len(self.widths) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.Dense(self.hidden, name="classifier_0")(x)
        x = norm(self.norm, x, train=train, name="classifier_1", bn_momentum=self.bn_momentum)
        x = nn.relu(x)
        return nn.Dense(self.num_classes, name="classifier_3")(x)

    def torch_flatten_shapes(self, height: int, width: int) -> dict[str, tuple[int, int, int]]:
        """The (C, H, W) feature map PyTorch flattens into ``classifier_0`` for an input of
        ``height × width`` (for :func:`jaxbn.interop.torch_to_flax`)."""
        pools = 2 ** (len(self.widths) - 1)
        return {"classifier_0": (self.widths[-1], height // pools, width // pools)}
