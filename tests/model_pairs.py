"""Matched (jaxbn model, PyTorch twin) pairs used by the interop, training-parity and fold tests.

Sizes are small so the suite stays fast; the architecture is the tutorial's.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn
from jaxbn import models
from tests import linen_builders, torch_models


@dataclass
class Pair:
    name: str
    model: object  # flax module
    torch_model: torch.nn.Module
    input_shape: tuple[int, ...]  # torch layout (N, C, H, W) or (N, D)
    flatten_shapes: dict
    torch_renames: dict  # torch module path -> jaxbn module path where they differ

    @property
    def channels_last_shape(self):
        s = self.input_shape
        return (s[0], *s[2:], s[1]) if len(s) == 4 else s

    def to_jax_input(self, x: torch.Tensor) -> jnp.ndarray:
        a = x.detach().numpy()
        return jnp.asarray(np.moveaxis(a, 1, -1) if a.ndim == 4 else a)

    def state_dict_for_jax(self) -> dict:
        sd = self.torch_model.state_dict()
        out = {}
        for key, value in sd.items():
            module, leaf = key.rsplit(".", 1)
            out[f"{self.torch_renames.get(module, module)}.{leaf}"] = value
        return out

    def torch_keys(self, state_dict: dict) -> dict:
        """Undo ``torch_renames``: a jaxbn-named state_dict keyed as the torch model expects."""
        inverse = {v: k for k, v in self.torch_renames.items()}
        out = {}
        for key, value in state_dict.items():
            module, leaf = key.rsplit(".", 1)
            out[f"{inverse.get(module, module)}.{leaf}"] = value
        return out

    def load_into_jax(self, dtype=jnp.float32) -> dict:
        # names, shapes and dtypes only: the weights come from torch (an init would compile
        # JAX's random number generator for every layer's shape)
        template = linen_builders.template(
            self.model, jnp.zeros(self.channels_last_shape, dtype), train=False
        )
        if dtype == jnp.float64:
            template = jax.tree.map(
                lambda s: (
                    jax.ShapeDtypeStruct(s.shape, dtype)
                    if jnp.issubdtype(s.dtype, jnp.floating)
                    else s
                ),
                template,
            )
        return jaxbn.interop.torch_to_flax(
            self.state_dict_for_jax(), template, flatten_shapes=self.flatten_shapes
        )


def make_pairs(seed: int = 0) -> dict[str, Pair]:
    torch.manual_seed(seed)
    convnet = models.ConvNet(widths=(8, 16, 32), hidden=32, num_classes=10)
    return {
        "mlp-bn": Pair(
            "mlp-bn",
            models.MLP(hidden=(32, 16), norm="batch"),
            torch_models.NetWithBN(64, (32, 16)),
            (16, 64),
            {},
            {},
        ),
        "mlp-none": Pair(
            "mlp-none",
            models.MLP(hidden=(32, 16), norm="none"),
            torch_models.NetWithoutBN(64, (32, 16)),
            (16, 64),
            {},
            {"layers.2": "layers.3", "layers.4": "layers.6"},  # NetWithoutBN has no BN slots
        ),
        "convnet": Pair(
            "convnet",
            convnet,
            torch_models.ConvNetWithBN(10, 1, 8, (8, 16, 32), 32),
            (8, 1, 8, 8),
            convnet.torch_flatten_shapes(8, 8),
            {},
        ),
        "resnet": Pair(
            "resnet",
            models.ResNet((1, 1), (8, 16), num_classes=10),
            torch_models.ResNet((1, 1), (8, 16), 10, in_channels=1),
            (8, 1, 8, 8),
            {},
            {},
        ),
    }
