"""Lossless weight conversion between a PyTorch ``state_dict`` and jaxbn/Flax variables.

Names: a Flax module path maps to a PyTorch module path by turning ``name_<digits>`` segments
into ``name.<digits>`` (``layer1_0/conv1`` ↔ ``layer1.0.conv1``, ``features_0`` ↔
``features.0``) — the jaxbn models are named that way. Leaves:

=============================  ==============================  ===============================
Flax (channels-last)           PyTorch                         conversion
=============================  ==============================  ===============================
conv ``kernel`` [*k, I, O]     ``weight`` [O, I, *k]           transpose
dense ``kernel`` [I, O]        ``weight`` [O, I]               transpose (+ flatten permute)
``bias``                       ``bias``                        as is
norm ``scale``                 ``weight``                      as is ([H, W, C] ↔ [C, H, W])
``batch_stats/mean``, ``var``  ``running_mean``, ``running_var``  as is
``num_batches_tracked``        ``num_batches_tracked``         int32 ↔ int64
=============================  ==============================  ===============================

A dense layer fed by a flattened conv feature map needs its input rows permuted, because
PyTorch flattens (C, H, W) and channels-last code flattens (H, W, C); pass the (C, H, W) shape
per such layer in ``flatten_shapes`` (``ConvNet.torch_flatten_shapes`` gives it). Everything
is a transpose or reshape of the same numbers, so torch → jaxbn → torch is bit-identical.

Example:
    >>> net = ConvNetWithBN()                                   # the PyTorch model
    >>> model = jaxbn.models.ConvNet()
    >>> template = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    >>> variables = jaxbn.interop.torch_to_flax(
    ...     net.state_dict(), template, flatten_shapes=model.torch_flatten_shapes(32, 32))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbn.tree_paths import Path, module_leaves, set_path

__all__ = ["flax_to_torch", "torch_module_path", "torch_to_flax"]

FlattenShapes = Mapping[str, tuple[int, int, int]]

# (collection, flax leaf) -> torch leaf
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}


def torch_module_path(path: Path) -> str:
    """``("layer1_0", "conv1")`` → ``"layer1.0.conv1"``."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def torch_to_flax(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    flatten_shapes: FlattenShapes | None = None,
) -> dict[str, Any]:
    """Variables shaped like ``variables`` (e.g. from ``model.init``) holding the torch weights.

    Args:
      state_dict: ``torch_module.state_dict()`` (tensors or numpy arrays).
      variables: a template tree (``params``/``batch_stats``) giving names, shapes, dtypes.
      flatten_shapes: Flax module path (``"classifier_0"``) → torch (C, H, W) it flattens.

    Raises:
      KeyError: naming the missing and the unexpected torch keys.
      ValueError: naming the key whose shape does not fit.
    """
    flatten_shapes = flatten_shapes or {}
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    out: dict[str, Any] = {}
    missing = []
    for collection, path, leaf, template in _template_leaves(variables):
        key = _torch_key(collection, path, leaf)
        if key not in arrays:
            missing.append(key)
            continue
        raw = arrays.pop(key)
        value = _from_torch(raw, template, path, leaf, flatten_shapes)
        if value.shape != template.shape:
            raise ValueError(
                f"{key}: torch shape {tuple(raw.shape)} does not fit "
                f"{collection}/{'/'.join((*path, leaf))} of shape {tuple(template.shape)}"
            )
        set_path(out.setdefault(collection, {}), (*path, leaf), jnp.asarray(value, template.dtype))
    if missing or arrays:
        raise KeyError(
            f"state_dict does not match the model: missing keys {missing}, "
            f"unexpected keys {sorted(arrays)}"
        )
    return out


def flax_to_torch(
    variables: Mapping[str, Any], *, flatten_shapes: FlattenShapes | None = None
) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` (of numpy arrays) from jaxbn variables.

    Load it with ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
    """
    flatten_shapes = flatten_shapes or {}
    out = {}
    for collection, path, leaf, value in _template_leaves(variables):
        key = _torch_key(collection, path, leaf)
        # a writable C-contiguous copy: torch.from_numpy accepts it without a warning
        out[key] = np.array(_to_torch(np.asarray(value), path, leaf, flatten_shapes), order="C")
    return out


def _template_leaves(variables: Mapping[str, Any]):
    for collection in ("params", "batch_stats"):
        for path, leaves in module_leaves(variables.get(collection, {})):
            for leaf, value in leaves.items():
                if (collection, leaf) not in _LEAF_NAMES:
                    raise ValueError(f"no PyTorch counterpart for {collection}/{path}/{leaf}")
                yield collection, path, leaf, value


def _torch_key(collection: str, path: Path, leaf: str) -> str:
    return f"{torch_module_path(path)}.{_LEAF_NAMES[(collection, leaf)]}"


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not a dependency of the library
        value = value.detach().cpu().numpy()
    # Copy: .numpy() shares the tensor's memory and jnp.asarray may alias it on CPU, so a later
    # in-place torch update (optimizer.step) would silently change the imported jax arrays.
    return np.array(value, copy=True)


def _from_torch(w: np.ndarray, template, path: Path, leaf: str, flatten) -> np.ndarray:
    if leaf == "kernel" and w.ndim == 2:
        module = "/".join(path)
        if module in flatten:
            c, h, wd = flatten[module]
            return w.reshape(w.shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, -1)
        return w.T
    if leaf == "kernel":  # conv [O, I, *k] -> [*k, I, O]
        return w.transpose(*range(2, w.ndim), 1, 0)
    if leaf in ("scale", "bias") and w.ndim == 3 and template.ndim == 3:
        return np.moveaxis(w, 0, -1)  # layer norm over [C, H, W] -> [H, W, C]
    return w


def _to_torch(k: np.ndarray, path: Path, leaf: str, flatten) -> np.ndarray:
    if leaf == "kernel" and k.ndim == 2:
        module = "/".join(path)
        if module in flatten:
            c, h, wd = flatten[module]
            return k.reshape(h, wd, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * wd)
        return k.T
    if leaf == "kernel":  # conv [*k, I, O] -> [O, I, *k]
        return k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))
    if leaf == "num_batches_tracked":
        return k.astype(np.int64)
    if leaf in ("scale", "bias") and k.ndim == 3:
        return np.moveaxis(k, -1, 0)
    return k
