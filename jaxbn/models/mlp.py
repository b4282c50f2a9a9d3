"""The tutorial's MLP (784→256→128→10, BatchNorm1d before each ReLU) as a Flax module.

Layer names follow the PyTorch twin ``nn.Sequential`` (``layers_0`` = ``layers.0``), so
:mod:`jaxbn.interop` maps weights one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.models.norms import NormKind, check_norm, norm


class MLP(nn.Module):
    """Dense → norm → ReLU blocks, then a Dense classifier.

    Attributes:
      hidden: widths of the hidden layers (tutorial: 256, 128).
      num_classes: number of outputs.
      bn_momentum: batch norm momentum (PyTorch meaning: weight of the new batch).
      norm: "batch" (tutorial's NetWithBN), "none" (NetWithoutBN), "group", "layer".

    Call: ``x`` [N, ...] (flattened to [N, D]; D taken from the data), ``train`` → logits [N, K].
    """

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10
    norm: NormKind = "batch"
    bn_momentum: float | None = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_norm(self.norm)
        x = jnp.reshape(x, (x.shape[0], -1))
        index = 0  # the position the layer has in the PyTorch twin's nn.Sequential
        for width in self.hidden:
            x = nn.Dense(width, name=f"layers_{index}")(x)
            x = norm(
                self.norm, x, train=train, name=f"layers_{index + 1}", bn_momentum=self.bn_momentum
            )
            x = nn.relu(x)
            index += 3
        return nn.Dense(self.num_classes, name=f"layers_{index}")(x)
