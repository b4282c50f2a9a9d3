"""The tutorial's MLP (784→256→128→10, BatchNorm1d before each ReLU) as a Flax module.

Layer names follow the PyTorch twin ``nn.Sequential`` (``layers_0`` = ``layers.0``), so
:mod:`jaxbn.interop` maps weights one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn.models.norms import NormalizedModel


class MLP(NormalizedModel):
    """Dense → norm → ReLU blocks, then a Dense classifier.

    Attributes:
      hidden: widths of the hidden layers (tutorial: 256, 128).
      num_classes: number of outputs.
      norm, bn_momentum, dtype, param_dtype: keyword-only, see
        :class:`~jaxbn.models.norms.NormalizedModel`. ``norm``: "batch" (tutorial's NetWithBN),
        "none" (NetWithoutBN), "group", "layer", or a factory such as
        ``functools.partial(jaxbn.BatchNorm, momentum=0.2)``.

    Call: ``x`` [N, ...] (flattened to [N, D]; D taken from the data), ``train`` → logits [N, K].
    """

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        index = 0  # the position the layer has in the PyTorch twin's nn.Sequential
        for width in self.hidden:
            x = nn.Dense(width, name=f"layers_{index}", **self.layer_dtypes)(x)
            x = self.normalize(x, train=train, name=f"layers_{index + 1}")
            x = nn.relu(x)
            index += 3
        return nn.Dense(self.num_classes, name=f"layers_{index}", **self.layer_dtypes)(x)
