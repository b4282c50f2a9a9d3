"""PyTorch state dicts ⇄ an Equinox model's parameters and jaxbn batch norm state.

An Equinox model's array at attribute path ``features[1].weight`` is torch's
``features.1.weight``: attribute names and list/tuple indices joined with dots, where an
``eqx.nn.Sequential``'s ``layers`` is left out (torch's ``nn.Sequential`` names its children by
index). A jaxbn.equinox ``BatchNorm*`` adds its state's ``running_mean``, ``running_var`` and
``num_batches_tracked``; a ``FrozenBatchNorm`` has torchvision's four buffers. Arrays whose
torch shape differs only by size-1 dims (an ``eqx.nn.Conv``'s bias ``[C, 1, 1]``, torch's
``[C]``) are reshaped. Layout is otherwise the same: Equinox, like PyTorch, is channels first.

The strictness is :func:`jaxbn.interop.torch_to_flax`'s: every model array needs its key and
every key a model array (the error counts both and shows a few), shapes must fit, the counter
is loaded as torch loads it (missing in old checkpoints: the model's own is kept).
``eqx.nn.BatchNorm`` is refused: its running statistics (biased variance, EMAs) are not
torch's — replace it with :class:`jaxbn.equinox.BatchNorm` first.

Example:
    >>> import torch
    >>> import jaxbn.equinox as jbn
    >>> torch_net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
    ...     [eqx.nn.Linear(4, 8, key=jax.random.key(0)), jbn.BatchNorm1d(8, axis_name="batch")])
    >>> torch_names(model)
    ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var',
     '1.num_batches_tracked']
    >>> model, state = torch_to_equinox(model, state, torch_net.state_dict())
    >>> torch_net.load_state_dict({k: torch.from_numpy(v)
    ...                            for k, v in equinox_to_torch(model, state).items()})
    <All keys matched successfully>
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.equinox.batch_norm import BatchNorm
from jaxbn.tools.interop import _counter, _few, _refuse_removed_counter, _to_numpy

__all__ = ["equinox_to_torch", "torch_names", "torch_to_equinox"]

#: Equinox module path (dotted, e.g. ``"convs.0"``) → torch module path, or a mapping of paths
#: (a parent's entry renames its children too).
Rename = Callable[[str], str] | Mapping[str, str]

STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One array of the model: where it lives and its torch name."""

    module: str  # dotted Equinox module path
    leaf: str  # torch's leaf name
    get: Callable[[Any, Any], Any]  # (model, state) -> value
    bn: BatchNorm | None = None  # for state leaves: the layer whose state it is


def _slots(model: Any) -> list[_Slot]:
    slots: list[_Slot] = []

    def walk(node: Any, path: tuple[str, ...], getter: Callable[[Any], Any]) -> None:
        module = ".".join(path)
        if isinstance(node, eqx.nn.BatchNorm):
            raise TypeError(
                f"{module or 'the model'} is an eqx.nn.BatchNorm, whose running statistics "
                "(biased variance; EMAs) are not PyTorch's: use jaxbn.equinox.BatchNorm "
                "(PyTorch's numbers) before converting"
            )
        if isinstance(node, jax.Array | np.ndarray):
            parent, leaf = ".".join(path[:-1]), path[-1]
            slots.append(_Slot(parent, leaf, lambda m, s, g=getter: g(m)))
            return
        if isinstance(node, eqx.nn.StateIndex):
            return
        if isinstance(node, eqx.Module):
            for field in dataclasses.fields(node):
                if field.metadata.get("static", False) or field.name == "state_index":
                    continue
                child = getattr(node, field.name)
                sequential = isinstance(node, eqx.nn.Sequential) and field.name == "layers"
                child_path = path if sequential else (*path, field.name)
                walk(child, child_path, lambda m, g=getter, n=field.name: getattr(g(m), n))
            if isinstance(node, BatchNorm) and node.state_index is not None:
                for i, leaf in enumerate(STATS):
                    get = lambda m, s, g=getter, i=i: s.get(g(m).state_index)[i]
                    slots.append(_Slot(module, leaf, get, node))
        elif isinstance(node, list | tuple):
            for i, child in enumerate(node):
                walk(child, (*path, str(i)), lambda m, g=getter, i=i: g(m)[i])
        elif isinstance(node, dict):
            for key, child in node.items():
                walk(child, (*path, str(key)), lambda m, g=getter, k=key: g(m)[k])

    walk(model, (), lambda m: m)  # a bare layer's keys have no prefix, as a bare torch layer's
    return slots


def _renamer(rename: Rename | None) -> Callable[[str], str]:
    if rename is None:
        return lambda path: path
    if callable(rename):
        return rename
    table = dict(rename)

    def renamed(path: str) -> str:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                return ".".join(filter(None, [table[head], *parts[cut:]]))
        return path

    return renamed


def torch_names(model: Any, *, rename: Rename | None = None) -> list[str]:
    """The torch ``state_dict`` keys of ``model``'s arrays and batch norm state, in order."""
    name = _renamer(rename)
    return [".".join(filter(None, [name(s.module), s.leaf])) for s in _slots(model)]


def torch_to_equinox(
    model: Any,
    state: eqx.nn.State,
    state_dict: Mapping[str, Any],
    *,
    rename: Rename | None = None,
) -> tuple[Any, eqx.nn.State]:
    """``(model, state)`` holding the torch weights and batch norm statistics.

    Args:
      model: an Equinox model (its arrays give names, shapes and dtypes).
      state: the model's ``eqx.nn.State`` (from ``eqx.nn.make_with_state``).
      state_dict: ``torch_module.state_dict()`` (tensors or numpy arrays).
      rename: Equinox module path → torch module path where the default rule does not hold.

    Raises:
      KeyError: counting the missing and unexpected keys, showing a few of each.
      ValueError: naming a key whose shape does not fit.
    """
    slots = _slots(model)
    keys = torch_names(model, rename=rename)
    metadata = getattr(state_dict, "_metadata", None)
    arrays = dict(state_dict)
    given = set(arrays)
    missing, values = [], []
    for slot, key in zip(slots, keys, strict=True):
        template = slot.get(model, state)
        if key not in arrays:
            running_mean = key[: -len("num_batches_tracked")] + "running_mean"
            if slot.leaf == "num_batches_tracked" and running_mean in given:
                _refuse_removed_counter(key, metadata)
                values.append(template)  # as torch: an old checkpoint keeps the model's counter
            else:
                missing.append(key)
            continue
        raw = _to_numpy(key, arrays.pop(key))
        if raw.shape != template.shape:
            if np.squeeze(np.empty(raw.shape)).shape != np.squeeze(template).shape:
                raise ValueError(
                    f"{key}: torch shape {tuple(raw.shape)} does not fit the model's "
                    f"{slot.module}.{slot.leaf} of shape {tuple(template.shape)}"
                )
            raw = raw.reshape(template.shape)
        if slot.leaf == "num_batches_tracked":
            values.append(_counter(key, raw))
        else:
            values.append(jnp.asarray(raw, template.dtype))
    if missing or arrays:
        unexpected = sorted(arrays)
        raise KeyError(
            f"state_dict does not match the model: {len(missing)} missing keys "
            f"{_few(sorted(missing))}, {len(unexpected)} unexpected keys {_few(unexpected)}. "
            "Equinox paths map to torch names by joining attribute names and indices with "
            "dots (an eqx.nn.Sequential's 'layers' left out); for others pass "
            "rename={'<Equinox path>': '<torch module>'} or rename=lambda path: torch_path"
        )
    by_layer: dict[int, dict[str, Any]] = {}
    model_slots = []
    for slot, value in zip(slots, values, strict=True):
        if slot.bn is None:
            model_slots.append((slot, value))
        else:
            by_layer.setdefault(id(slot.bn), {"bn": slot.bn})[slot.leaf] = value
    model = eqx.tree_at(
        lambda m: [s.get(m, None) for s, _ in model_slots], model, [v for _, v in model_slots]
    )
    for entry in by_layer.values():
        stats = state.get(entry["bn"].state_index)
        state = state.set(
            entry["bn"].state_index,
            type(stats)(*(jnp.asarray(entry[k], stats[i].dtype) for i, k in enumerate(STATS))),
        )
    return model, state


def equinox_to_torch(
    model: Any, state: eqx.nn.State, *, rename: Rename | None = None
) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` of numpy arrays (int64 counters, torch's shapes: an
    ``eqx.nn.Conv`` bias loses its size-1 dims). Load it with
    ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``."""
    out = {}
    for slot, key in zip(_slots(model), torch_names(model, rename=rename), strict=True):
        array = np.asarray(slot.get(model, state))
        if slot.leaf == "num_batches_tracked":
            array = array.astype(np.int64)
        elif slot.leaf == "bias" and array.ndim > 1:
            array = array.reshape(-1)  # eqx.nn.Conv's [C, 1, ...] bias is torch's [C]
        out[key] = np.array(array, order="C")
    return out
