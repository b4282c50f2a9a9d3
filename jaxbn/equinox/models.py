"""The tutorial's ``ConvNetWithBN`` as an Equinox model (channels first, one example per call).

Three conv blocks (conv3x3 → norm → ReLU, max-pool after the first two) and a classifier
(Linear → BatchNorm1d → ReLU → Linear), as :class:`jaxbn.models.ConvNet` (Flax) and the
PyTorch twin. Called per example inside ``jax.vmap(..., axis_name="batch")`` — the Equinox way
— with the norms' statistics over the vmap's members. The flatten before the classifier is
PyTorch's (C, H, W) order.

Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> from jaxbn.equinox.models import ConvNet
    >>> model, state = eqx.nn.make_with_state(ConvNet)(1, key=jax.random.key(0))
    >>> model = eqx.nn.inference_mode(model, False)                   # training
    >>> forward = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> logits, state = forward(jnp.ones((8, 1, 16, 16)), state)      # [N, C, H, W]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn.equinox.batch_norm import BatchNorm1d, BatchNorm2d

__all__ = ["TORCH_RENAME", "ConvNet"]

#: :class:`ConvNet`'s module paths → the tutorial's PyTorch ``ConvNetWithBN`` (``features`` and
#: ``classifier`` Sequentials), for :func:`jaxbn.equinox.torch_to_equinox`'s ``rename``.
TORCH_RENAME = {
    "convs.0": "features.0",
    "norms.0": "features.1",
    "convs.1": "features.4",
    "norms.1": "features.5",
    "convs.2": "features.8",
    "norms.2": "features.9",
    "hidden_linear": "classifier.0",
    "hidden_norm": "classifier.1",
    "output_linear": "classifier.3",
}

#: ``factory(num_features) -> layer`` called as ``layer(x, state) -> (y, state)``.
NormFactory = Callable[[int], Any]


class ConvNet(eqx.Module):
    """Conv blocks with a norm before each ReLU, then a normalized MLP classifier.

    Attributes:
      convs, norms: the three conv blocks' ``eqx.nn.Conv2d`` and norm layers.
      hidden_linear, hidden_norm, output_linear: the classifier.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[Any, ...]
    hidden_linear: eqx.nn.Linear
    hidden_norm: Any
    output_linear: eqx.nn.Linear
    pool: eqx.nn.MaxPool2d
    whole_batch: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = (64, 128, 256),
        hidden: int = 512,
        num_classes: int = 10,
        image_size: int = 16,
        *,
        key: jax.Array,
        norm2d: NormFactory | None = None,
        norm1d: NormFactory | None = None,
        bn_momentum: float | None = 0.1,
        dtype: Any = None,
        whole_batch: bool = False,
    ) -> None:
        """Builds the layers (a per-example model unless ``whole_batch``).

        Args:
          in_channels: C of the input images [C, H, W].
          widths: the conv blocks' channels (tutorial: 64, 128, 256).
          hidden: width of the classifier's hidden layer (tutorial: 512).
          num_classes: outputs.
          image_size: H = W of the input (divisible by 4): sizes the classifier.
          key: initialization key.
          norm2d: norm factory ``factory(C)`` of the conv blocks; default
            ``BatchNorm2d(C, momentum=bn_momentum, axis_name="batch")``. ``eqx.nn.BatchNorm``
            fits too: ``functools.partial(eqx.nn.BatchNorm, axis_name="batch", mode="batch")``.
          norm1d: the classifier's, default ``BatchNorm1d`` likewise.
          bn_momentum: the default norms' momentum (PyTorch's meaning).
          dtype: parameter dtype (default float32, float64 under ``jax_enable_x64``).
          whole_batch: called on the whole batch [N, C, H, W] instead of one example (the
            default norms then take ``axis=1`` and no ``axis_name``; the other layers are
            vmapped inside): the batch norms reduce over the batch at once, as PyTorch's
            and Flax's do, where the per-example form merges the members' moments.
        """
        where = {"axis": 1} if whole_batch else {"axis_name": "batch"}
        norm2d = norm2d or functools.partial(
            BatchNorm2d, momentum=bn_momentum, param_dtype=dtype, **where
        )
        norm1d = norm1d or functools.partial(
            BatchNorm1d, momentum=bn_momentum, param_dtype=dtype, **where
        )
        self.whole_batch = whole_batch
        keys = jax.random.split(key, len(widths) + 2)
        chans = (in_channels, *widths)
        self.convs = tuple(
            eqx.nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, key=keys[i], dtype=dtype)
            for i in range(len(widths))
        )
        self.norms = tuple(norm2d(w) for w in widths)
        self.pool = eqx.nn.MaxPool2d(2, 2)
        side = image_size // 2 ** (len(widths) - 1)
        flat = widths[-1] * side * side
        self.hidden_linear = eqx.nn.Linear(flat, hidden, key=keys[-2], dtype=dtype)
        self.hidden_norm = norm1d(hidden)
        self.output_linear = eqx.nn.Linear(hidden, num_classes, key=keys[-1], dtype=dtype)

    def __call__(
        self, x: jax.Array, state: eqx.nn.State, *, key: jax.Array | None = None
    ) -> tuple[jax.Array, eqx.nn.State]:
        """``x``: one image [C, H, W] → ``(logits [K], state)`` (``whole_batch``: [N, C, H, W]
        → [N, K])."""
        del key
        each = jax.vmap if self.whole_batch else lambda layer: layer
        for block, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x, state = norm(each(conv)(x), state)
            x = jax.nn.relu(x)
            if block < len(self.convs) - 1:
                x = each(self.pool)(x)
        x = each(self.hidden_linear)(each(jnp.ravel)(x))
        x, state = self.hidden_norm(x, state)
        return each(self.output_linear)(jax.nn.relu(x)), state
