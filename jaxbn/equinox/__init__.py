"""jaxbn's batch norms as Equinox layers: PyTorch's numbers in ``eqx.nn.BatchNorm``'s slot.

``import jaxbn.equinox`` needs Equinox (``pip install "jaxbn[equinox]"``); ``import jaxbn``
does not. The layers are thin shells over ``jaxbn._module_logic`` and
:mod:`jaxbn.functional`: the statistics are the same code as the Flax modules'.
:mod:`.models` holds the tutorial's ConvNet, :mod:`.interop` torch state dicts ⇄ Equinox
models, :mod:`.tools` ``update_bn`` and ``inspect_batch_norm``.

Example (the one-line switch from ``eqx.nn.BatchNorm``):
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import jaxbn.equinox as jbn
    >>> bn, state = eqx.nn.make_with_state(jbn.BatchNorm)(3, axis_name="batch")
    >>> train = eqx.nn.inference_mode(bn, False)
    >>> x = jnp.arange(12.0).reshape(4, 3)                       # [N, C]: one [C] per example
    >>> y, state = jax.vmap(train, axis_name="batch", in_axes=(0, None),
    ...                     out_axes=(0, None))(x, state)
"""

from __future__ import annotations

try:
    import equinox as _equinox  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess without equinox
    raise ImportError(
        "jaxbn.equinox needs Equinox, which is not installed: pip install 'jaxbn[equinox]' "
        "(or pip install equinox)"
    ) from err

from jaxbn.equinox import interop, models, tools
from jaxbn.equinox.batch_norm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm,
)
from jaxbn.equinox.group_norm import GroupNorm
from jaxbn.equinox.interop import equinox_to_torch, torch_to_equinox
from jaxbn.equinox.layer_norm import LayerNorm
from jaxbn.equinox.tools import inspect_batch_norm, update_bn

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "equinox_to_torch",
    "inspect_batch_norm",
    "interop",
    "models",
    "tools",
    "torch_to_equinox",
    "update_bn",
]
