"""Walking a Flax variables tree by module: the dicts of leaves that one layer owns."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn

Path = tuple[str, ...]


def module_leaves(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, dict]]:
    """Yields ``(module path, {leaf name: array})`` for every module in one collection's tree."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield prefix, leaves
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from module_leaves(value, (*prefix, key))


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def batch_norm_layers(variables: Mapping[str, Any]) -> Iterator[tuple[Path, dict, dict]]:
    """Yields ``(path, batch_stats leaves, params leaves)`` for every jaxbn batch norm layer
    with running statistics (recognised by its ``mean``/``var``/``num_batches_tracked``)."""
    params = variables.get("params", {})
    for path, stats in module_leaves(variables.get("batch_stats", {})):
        if {"mean", "var", "num_batches_tracked"} <= set(stats):
            try:
                own_params = dict(get_path(params, path))
            except KeyError:
                own_params = {}
            yield path, stats, own_params


def module_path(module: Any) -> Path:
    """The path of a bound module's variables (as in the variables tree).

    ``module.scope.path`` is fixed when the scope is made; ``nn.share_scope`` (a wrapper that
    keeps its model's variable names, e.g. around an ``nn.Sequential``, whose layers are bound
    before) re-parents scopes without changing it. The parent chain is the truth, up to the
    root of a lifted transform (``nn.scan``, ``nn.vmap``, ``nn.remat``), whose own ``path``
    says where it sits.
    """
    scope = module.scope
    names: list[str] = []
    while scope.parent is not None:
        names.append(scope.name)
        scope = scope.parent
    return (*scope.path, *reversed(names))


def unboxed(tree: Any) -> Any:
    """``tree`` with Flax's metadata boxes (``nn.with_partitioning``'s ``Partitioned``, ...)
    replaced by their values, every dict keeping its key order (``nn.meta.unbox`` maps with
    ``jax.tree.map``, which sorts keys, and the order a model created its layers in is what
    the tools report them in)."""
    if isinstance(tree, nn.meta.AxisMetadata):
        return tree.unbox()
    if isinstance(tree, Mapping):
        return {key: unboxed(value) for key, value in tree.items()}
    return tree
