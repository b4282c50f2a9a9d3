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

from jaxbn.models.norms import NormalizedModel


class ConvNet(NormalizedModel):
    """Conv blocks with normalization before ReLU, then a normalized MLP classifier.

    Attributes:
      widths: channels of the three conv blocks (tutorial: 64, 128, 256).
      hidden: width of the classifier's hidden layer (tutorial: 512).
      num_classes: number of outputs.
      norm, bn_momentum, dtype, param_dtype: keyword-only, see
        :class:`~jaxbn.models.norms.NormalizedModel`. ``norm``: "batch" (tutorial), "group",
        "layer", "none", or a factory such as ``functools.partial(jaxbn.BatchNorm, momentum=0.2)``
        (called for the 4-D conv slots and the 2-D classifier slot alike).

    Call: ``x`` [N, H, W, C_in] (H, W divisible by 4), ``train`` → logits [N, K].
    """

    widths: Sequence[int] = (64, 128, 256)
    hidden: int = 512
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        index = 0  # position in the PyTorch twin's `features` nn.Sequential
        for block, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding=1, name=f"features_{index}", **self.layer_dtypes)(x)
            x = self.normalize(x, train=train, name=f"features_{index + 1}")
            x = nn.relu(x)
            index += 3
            if block < len(self.widths) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.Dense(self.hidden, name="classifier_0", **self.layer_dtypes)(x)
        x = nn.relu(self.normalize(x, train=train, name="classifier_1"))
        return nn.Dense(self.num_classes, name="classifier_3", **self.layer_dtypes)(x)

    def torch_flatten_shapes(self, height: int, width: int) -> dict[str, tuple[int, int, int]]:
        """The (C, H, W) feature map PyTorch flattens into ``classifier_0`` for an input of
        ``height × width`` (for :func:`jaxbn.interop.torch_to_flax`)."""
        pools = 2 ** (len(self.widths) - 1)
        return {"classifier_0": (self.widths[-1], height // pools, width // pools)}
