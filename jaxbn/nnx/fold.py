"""Folding batch norm into the preceding ``nnx.Linear`` / ``nnx.Conv`` of any NNX model.

The NNX counterpart of :func:`jaxbn.fold_batch_norm`, with its guarantees: a batch norm is
folded only where its eval is an affine map with stored statistics (trained, frozen, ghost,
renorm: :mod:`jaxbn.tools.layers`), it is the only consumer of an ``nnx.Linear``/``nnx.Conv``
output and that layer runs once per call; every other batch norm is kept and ``.left`` says
why (a skip connection, shared weights, ``track_running_stats=False``, ``mask=``, stacked
statistics under ``nnx.vmap``/``nnx.scan``, a loop or branch folding does not look into,
``flax.nnx.BatchNorm``). Every batch norm ends in ``.folded`` or ``.left``; the result is a new
model (the original is untouched) whose eval output on the sample was checked against the
original's before it is returned.

How: the decision is the Linen fold's own (:func:`jaxbn.tools.fold._plan`: one eval call traced
to a jaxpr, every layer output and batch norm input tagged with ``checkpoint_name``, uses
counted). The NNX model runs inside a one-module Linen adapter, in which each
``nnx.Linear``/``nnx.Conv``/batch norm call passes through a Linen *probe* named by the layer's
attribute path (``"blocks/0/bn"``): fold's interceptor sees the probes as Dense layers and batch
norms and tags them; the variables it reads are the NNX model's ``nnx.Param`` / ``nnx.BatchStat``
values keyed by those paths. The folded model is a copy of the original whose folded batch
norms are :class:`FoldedBatchNorm` (the identity) and whose layers hold the fused weights
(:func:`jaxbn.fuse_conv_bn_weights`); a ``use_bias=False`` layer gets a bias.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbn.nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm1d(4))
    >>> model.train(); y = model(jnp.arange(12.0).reshape(4, 3))   # statistics to fold
    >>> result = jaxbn.nnx.fold_batch_norm(model, jnp.ones((1, 3)))
    >>> result.folded, result.left
    ({'layers/1': 'layers/0'}, {})
    >>> type(result.model.layers[1]).__name__                      # the identity now
    'FoldedBatchNorm'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn.nnx.batch_renorm import BatchRenorm
from jaxbn.nnx.flax_compat import BatchNorm as FlaxSpelledBatchNorm
from jaxbn.nnx.frozen_batch_norm import FrozenBatchNorm
from jaxbn.nnx.ghost_batch_norm import GhostBatchNorm
from jaxbn.tools import fold as _fold
from jaxbn.tools.layers import FROZEN, GHOST, KINDS, RENORM, TRAINED, UNTRACKED, kind_of

__all__ = ["FoldResult", "FoldedBatchNorm", "fold_batch_norm", "kind_of_nnx"]

_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}

#: The NNX layers a batch norm folds into (output channel on the kernel's last axis).
PRODUCERS = (nnx.Linear, nnx.Conv)

#: NNX variants that do not declare ``batch_norm_kind``: what :func:`kind_of` would say.
_UNDECLARED = (
    (FrozenBatchNorm, FROZEN),
    (GhostBatchNorm, GHOST),
    (BatchRenorm, RENORM),
    (FlaxSpelledBatchNorm, TRAINED),
)


def kind_of_nnx(module: Any) -> str | None:
    """The kind (:data:`jaxbn.tools.layers.KINDS`) of an NNX batch norm, None for any other
    module (``flax.nnx.BatchNorm`` included): :func:`jaxbn.tools.layers.kind_of`, and the NNX
    variants by class where they do not declare ``batch_norm_kind``."""
    kind = kind_of(module)
    if kind is None:
        kind = next((k for cls, k in _UNDECLARED if isinstance(module, cls)), None)
    if kind in (TRAINED, GHOST) and not getattr(module, "track_running_stats", True):
        return UNTRACKED
    return kind


def is_batch_norm(module: Any) -> bool:
    """A jaxbn NNX batch norm or a ``flax.nnx.BatchNorm`` (which fold keeps and names)."""
    return kind_of_nnx(module) is not None or isinstance(module, nnx.BatchNorm)


class FoldedBatchNorm(nnx.Module):
    """What a folded batch norm becomes: the identity (its scale and shift now live in the
    ``nnx.Linear``/``nnx.Conv`` before it). No variables; the mode arguments are accepted.

    Args:
      num_features: C of the batch norm it replaces.
      folded_into: the ``/``-joined path of the layer that holds its scale and shift.
      dtype: the batch norm's output dtype (None: the input's).

    Call:
      ``bn(x, *mode)``: ``x`` [N, ..., C] → ``x`` (cast to ``dtype``).

    Raises:
      ValueError: a call with a ``mask`` (the folded weights hold the unmasked statistics):
        ``this batch norm was folded into {folded_into} by fold_batch_norm, whose sample call
        passed it no mask; a masked call needs the batch norm: fold with a sample call that
        passes the mask, and it is kept``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn.nnx import FoldedBatchNorm
      >>> bn = FoldedBatchNorm(3, "linear", dtype=jnp.float16)
      >>> bn(jnp.ones((2, 3)), train=False).dtype
      dtype('float16')
      >>> bn(jnp.ones((2, 3)), mask=jnp.ones(2, bool))
      Traceback (most recent call last):
      ...
      ValueError: this batch norm was folded into linear by fold_batch_norm, whose sample call
      passed it no mask; a masked call needs the batch norm: fold with a sample call that
      passes the mask, and it is kept
    """

    def __init__(self, num_features: int, folded_into: str, dtype: Any = None) -> None:
        self.num_features = num_features
        self.folded_into = folded_into
        self.dtype = dtype

    def __call__(self, x: jax.Array, *args: Any, mask: Any = None, **kwargs: Any) -> jax.Array:
        del args, kwargs  # the mode: folded weights are eval only
        if mask is not None:
            raise ValueError(
                f"this batch norm was folded into {self.folded_into} by fold_batch_norm, whose "
                "sample call passed it no mask; a masked call needs the batch norm: fold with a "
                "sample call that passes the mask, and it is kept"
            )
        return x if self.dtype is None else jnp.asarray(x).astype(self.dtype)


@dataclasses.dataclass
class FoldResult:
    """What :func:`fold_batch_norm` returns for an NNX model.

    Attributes:
      model: the folded model (a new one), called as the original, in eval.
      folded: ``{batch norm path: Linear/Conv path}`` (``/``-joined attribute paths).
      left: ``{batch norm path: why it was kept}``.
    """

    model: nnx.Module
    folded: dict[str, str]
    left: dict[str, str]

    def __repr__(self) -> str:
        return (
            f"FoldResult(model={type(self.model).__name__}(...), folded={self.folded!r}, "
            f"left={self.left!r})"
        )


def fold_batch_norm(model: nnx.Module, *args: Any, **kwargs: Any) -> FoldResult:
    """Folds every foldable batch norm of an NNX model into the layer feeding it.

    Args:
      model: any NNX model with ``nnx.Linear``/``nnx.Conv`` layers and jaxbn NNX batch norms
        (``BatchNorm``, ``BatchNorm1d/2d/3d``, ``flax_compat.BatchNorm``, ``FrozenBatchNorm``,
        ``GhostBatchNorm``, ``BatchRenorm``); left untouched.
      *args: the sample call's inputs (one example is enough); the folded model is checked
        against the original on them.
      **kwargs: more keyword arguments of the sample call (e.g. ``train=False`` for a model
        that takes a flag; the model is also put in eval with ``.eval()``).

    Returns:
      A :class:`FoldResult`: ``.model`` (new), ``.folded``, ``.left``.

    Raises:
      ValueError: statistics never tracked (``num_batches_tracked == 0``) in a batch norm that
        would be folded, or folded outputs that differ from the original's beyond rounding.
      TypeError: no sample input, or arrays that are tracers (call it outside ``jax.jit``).
    """
    if not args and not kwargs:
        raise TypeError("fold_batch_norm needs a sample input: fold_batch_norm(model, x)")
    original = _in_eval(model)
    variables = _variables(original)
    plan = _trace_plan(original, variables, args, kwargs)

    folded_model = nnx.clone(original)
    nodes = _nodes(folded_model)
    folded: dict[str, str] = {}
    for (bn_key,), ((producer_key,), eps) in plan.folded.items():
        _fuse(nodes[producer_key][1], nodes[bn_key][1], eps)
        folded[bn_key] = producer_key
    for bn_key, producer_key in folded.items():
        path, bn = nodes[bn_key]
        identity = FoldedBatchNorm(bn.num_features, producer_key, getattr(bn, "dtype", None))
        folded_model = _replace(folded_model, path, identity)
    left = {"/".join(path): _nnx_reason(why) for path, why in plan.left.items()}
    for key, (_, node) in _nodes(original).items():  # every batch norm is reported
        if is_batch_norm(node) and key not in folded and key not in left:
            left[key] = (
                "the sample call did not run it (another method, or a branch not taken); "
                "kept as it is"
            )
    mismatch = _fold._output_mismatch(
        _run(folded_model, args, kwargs), _run(original, args, kwargs)
    )
    if mismatch is not None:
        raise ValueError(
            f"folding changed the model's eval outputs on the sample input: {mismatch}; "
            "not returning a model that computes something else"
        )
    return FoldResult(folded_model, folded, left)


def _in_eval(model: nnx.Module) -> nnx.Module:
    """A copy of the model in eval mode (batch norms on running statistics, dropout off)."""
    copy = nnx.clone(model)
    copy.eval()
    return copy


def _key(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _nodes(model: nnx.Module) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """``{"/"-joined path: (path, module)}`` of every Linear/Conv and batch norm (a module
    reachable twice, shared weights, under its first path)."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if path and (isinstance(node, PRODUCERS) or is_batch_norm(node)):
            found.setdefault(_key(path), (tuple(path), node))
    return found


def _variables(model: nnx.Module) -> dict[str, Any]:
    """The model's ``nnx.Param``/``nnx.BatchStat`` values as a Linen variables tree with one
    level of modules, keyed by ``/``-joined attribute paths (``{"params": {"blocks/0/conv":
    {"kernel": …}}}``)."""
    variables: dict[str, Any] = {}
    for collection, kind in _COLLECTIONS.items():
        for path, value in _flat(nnx.to_pure_dict(nnx.state(model, kind))):
            module, leaf = _key(path[:-1]), str(path[-1])
            variables.setdefault(collection, {}).setdefault(module, {})[leaf] = value
    return variables


def _flat(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    if isinstance(tree, Mapping):
        return [item for k, v in tree.items() for item in _flat(v, (*prefix, k))]
    return [(prefix, tree)]


class _Producer(nn.Dense):
    """A Linear/Conv call as fold's interceptor sees it (a Dense layer at the NNX path)."""

    features: int = 0

    def __call__(self, x: Any, *, _run: Callable) -> Any:  # type: ignore[override]
        return _run(x)


class _Norm(nn.Module):
    """A batch norm call as fold's interceptor sees it (its kind: the class's)."""

    eps: float = 1e-5
    axis: int = -1
    track_running_stats: bool = True
    dtype: Any = None

    def __call__(self, x: Any, *args: Any, _run: Callable, **kwargs: Any) -> Any:
        return _run(x)


class _FlaxNorm(nn.BatchNorm):
    """A ``flax.nnx.BatchNorm`` call: fold keeps it (not a jaxbn batch norm)."""

    def __call__(self, x: Any, *args: Any, _run: Callable, **kwargs: Any) -> Any:  # type: ignore[override]
        return _run(x)


_NORM_PROBES = {kind: type(f"_{kind}Norm", (_Norm,), {"batch_norm_kind": kind}) for kind in KINDS}


def instrumented(model: nnx.Module, handler: Callable, select: Callable[[Any], bool]) -> Any:
    """A copy of ``model`` whose selected modules call ``handler(module, key, call, args,
    kwargs)`` instead of their ``__call__`` (``call``: the original, unbound). Each gets a
    subclass of its own class, which ``nnx.split``/``nnx.merge`` keep, so the handler also sees
    the calls inside ``nnx.vmap``/``nnx.scan``/``nnx.jit``."""
    copy = nnx.clone(model)
    for key, (_, node) in _nodes(copy).items():
        if select(node):
            cls = type(node)

            def call(self, *args, __cls=cls, __key=key, **kwargs):
                return handler(self, __key, __cls.__call__, args, kwargs)

            node.__class__ = type(
                cls.__name__,
                (cls,),
                {"__call__": call, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
            )
    return copy


def _trace_plan(model, variables, args, kwargs) -> Any:
    """The Linen fold's plan (:func:`jaxbn.tools.fold._plan`) for the NNX model's sample call."""
    probes: dict[str, nn.Module] = {}

    def through_probe(node, key, call, call_args, call_kwargs):
        if not call_args:  # x by keyword: not a call fold can follow
            return call(node, *call_args, **call_kwargs)
        rest = call_args[1:]
        probe = probes.get(key)
        if probe is None:
            if isinstance(node, PRODUCERS):
                probe = _Producer(name=key)
            else:
                kind = kind_of_nnx(node)
                eps = getattr(node, "eps", getattr(node, "epsilon", 1e-5))
                if kind is None:
                    probe = _FlaxNorm(name=key, axis=node.axis, epsilon=eps)
                else:
                    probe = _NORM_PROBES[kind](
                        name=key,
                        eps=eps,
                        axis=node.axis,
                        track_running_stats=getattr(node, "track_running_stats", True),
                        dtype=getattr(node, "dtype", None),
                    )
            probes[key] = probe
        run = lambda x: call(node, x, *rest, **call_kwargs)
        return probe(call_args[0], _run=run, **call_kwargs)

    tagged = instrumented(model, through_probe, lambda node: True)
    graphdef, state = nnx.split(tagged)
    paths = {
        collection: [path for path, _ in _flat(nnx.to_pure_dict(nnx.state(tagged, kind)))]
        for collection, kind in _COLLECTIONS.items()
    }

    def run(linen_variables, *call_args):
        pure = nnx.to_pure_dict(state)
        for collection, leaves in paths.items():
            for path in leaves:
                value = linen_variables[collection][_key(path[:-1])][str(path[-1])]
                _set(pure, path, value)
        new_state = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(new_state, pure)
        return nnx.merge(graphdef, new_state)(*call_args, **kwargs)

    adapter = _Adapter(run)
    call = _fold._Call(adapter, (), (), (), (), tuple(args), {}, None)
    return _fold._plan(call, variables)


class _Adapter(nn.Module):
    """The NNX model's call as a Linen model: its variables are the adapter's."""

    run: Callable

    @nn.compact
    def __call__(self, *args: Any) -> Any:
        return self.run(self.variables, *args)


def _set(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _nnx_reason(why: str) -> str:
    """The Linen fold's reasons in NNX's words."""
    if why.startswith("flax.linen.BatchNorm is not a jaxbn batch norm"):
        return (
            "flax.nnx.BatchNorm is not a jaxbn batch norm; use jaxbn.nnx.flax_compat.BatchNorm "
            "(the same spelling and parameters) to fold it"
        )
    return (
        why.replace("nn.scan or nn.vmap", "nnx.scan or nnx.vmap")
        .replace(
            "(nn.scan, nn.while_loop, nn.cond, jax.lax",
            "(nnx.scan, nnx.while_loop, nnx.cond, jax.lax",
        )
        .replace("Conv or Dense layer", "nnx.Conv or nnx.Linear layer")
        .replace("Conv/Dense", "Linear/Conv")
    )


def _fuse(producer: nnx.Module, bn: nnx.Module, eps: float) -> None:
    """Folds ``bn``'s eval affine map into ``producer``'s weights, in place."""
    value = lambda name: None if getattr(bn, name, None) is None else getattr(bn, name)[...]
    bias = None if producer.bias is None else producer.bias[...]
    kernel, new_bias = _fold.fuse_conv_bn_weights(
        producer.kernel[...], bias, bn.mean[...], bn.var[...], eps, value("scale"), value("bias")
    )
    producer.kernel[...] = kernel
    if producer.bias is None:  # a use_bias=False layer gets a bias
        producer.use_bias = True
        producer.bias = nnx.Param(new_bias)
    else:
        producer.bias[...] = new_bias


def _replace(model: Any, path: tuple[Any, ...], new: nnx.Module) -> Any:
    """``model`` with the node at ``path`` replaced by ``new``, in place."""
    parent = model
    for key in path[:-1]:
        parent = (
            getattr(parent, key) if isinstance(key, str) and hasattr(parent, key) else (parent[key])
        )
    key = path[-1]
    if isinstance(key, str) and hasattr(parent, key):
        setattr(parent, key, new)
    else:  # a list, a dict, an nnx.List / nnx.Dict
        parent[key] = new
    return model


def _run(model: nnx.Module, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """The model's eval output on the sample, untracked batch norms as the identity (their eval
    takes the sample's own statistics, and folding leaves them as they are), compiled once."""

    def identity(node, key, call, call_args, call_kwargs):
        x = call_args[0] if call_args else call_kwargs["x"]
        dtype = getattr(node, "dtype", None)
        return x if dtype is None else jnp.asarray(x).astype(dtype)

    copy = instrumented(model, identity, lambda node: kind_of_nnx(node) == UNTRACKED)
    return nnx.jit(lambda m, *a: m(*a, **kwargs))(copy, *args)
