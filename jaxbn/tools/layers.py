"""What a batch norm layer is, once, for every tool: its kind, whether it is stacked, how it
is called.

Every tool (fold, update_bn, inspect, freeze, interop) reads this module instead of guessing
from the shape of a variables tree, because the tree alone cannot tell the kinds apart: a
``FrozenBatchNorm`` holds exactly a ``BatchNorm``'s variables, but its statistics are constants
that no tool may reset or re-estimate.

The kinds (:data:`KINDS`):

==============  =============================================================================
``trained``     ``BatchNorm``/``BatchNorm1d/2d/3d`` with running statistics (also under
                ``jaxbn.flax_compat.BatchNorm``): eval uses the running statistics.
``untracked``   the same with ``track_running_stats=False``: no running statistics; eval uses
                the batch's statistics (so it is not an affine map, and cannot be folded).
``frozen``      ``FrozenBatchNorm`` (also what ``freeze_batch_norm`` runs): constants; eval and
                train are the same affine map; never reset, re-estimated or updated.
``ghost``       ``GhostBatchNorm``: eval is BatchNorm's eval with the running statistics.
``renorm``      ``BatchRenorm``: eval is BatchNorm's eval with the running statistics.
==============  =============================================================================

A layer is *stacked* when its statistics have leading axes before the channel axis
(``[T, C]`` under ``nn.scan``/``nn.vmap``, ``[D, C]`` replicated for ``pmap``): one member per
leading index.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax

from jaxbn.linen.batch_norm import BatchNorm
from jaxbn.linen.batch_renorm import BatchRenorm
from jaxbn.linen.frozen_batch_norm import FrozenBatchNorm
from jaxbn.linen.ghost_batch_norm import GhostBatchNorm
from jaxbn.tools._tree import Path, batch_norm_layers, module_path
from jaxbn.tools.freeze import WrappedModel

TRAINED, UNTRACKED, FROZEN, GHOST, RENORM = "trained", "untracked", "frozen", "ghost", "renorm"
#: The layer kinds, as :func:`kind_of` names them (see the table above).
KINDS = (TRAINED, UNTRACKED, FROZEN, GHOST, RENORM)

#: Kinds whose eval is ``(x − mean)·rsqrt(var + eps)·scale + bias`` with stored statistics:
#: an affine map per channel, so they fold into a preceding Conv/Dense.
AFFINE_IN_EVAL = (TRAINED, FROZEN, GHOST, RENORM)

#: Kinds whose running statistics ``update_bn`` re-estimates (as a BatchNorm's: the cumulative
#: average of the batches' statistics). Frozen layers are constants; untracked have none.
RE_ESTIMATED = (TRAINED, GHOST, RENORM)


def kind_of(module: Any) -> str | None:
    """The kind of a jaxbn batch norm module (Linen or NNX), None for any other module.

    Args:
      module: a module instance.

    Returns:
      One of :data:`KINDS`, or None.
    """
    declared = getattr(type(module), "batch_norm_kind", None)
    if isinstance(declared, str):  # a class that says what it is (NNX/Equinox variants)
        kind = declared
    elif isinstance(module, FrozenBatchNorm):
        kind = FROZEN
    elif isinstance(module, GhostBatchNorm):
        kind = GHOST
    elif isinstance(module, BatchRenorm):
        kind = RENORM
    elif isinstance(module, BatchNorm) or _is_nnx_batch_norm(module):
        kind = TRAINED
    else:
        return None
    # GhostBatchNorm(track_running_stats=False) normalizes eval batches with their own statistics
    if kind in (TRAINED, GHOST) and not getattr(module, "track_running_stats", True):
        return UNTRACKED
    return kind


def _is_nnx_batch_norm(module: Any) -> bool:
    # Read from sys.modules, not imported: jaxbn.nnx imports the tools, and a module that was
    # never imported has no instances.
    nnx_batch_norm = sys.modules.get("jaxbn.nnx.batch_norm")
    return nnx_batch_norm is not None and isinstance(module, nnx_batch_norm.BatchNorm)


#: Keyword arguments that put a model in eval mode, by the name of its flag (a model's own
#: ``__call__`` signature tells which it has). ``nn.Sequential`` and models without a flag get
#: none: their batch norms carry the mode as a field (``use_running_average=True``).
EVAL_FLAGS = {
    "train": False,
    "training": False,
    "is_training": False,
    "use_running_average": True,
    "deterministic": True,
}


def eval_kwargs(model: nn.Module, method: str | Callable | None = None) -> dict[str, Any]:
    """The keyword arguments that call ``model`` (or its ``method``) in eval mode.

    Read from the signature: ``train``/``training``/``is_training`` → False,
    ``use_running_average``/``deterministic`` → True; none of them (``nn.Sequential``, a model
    whose batch norms carry the mode as a field) → no keyword. A flag the model already holds
    as a field (``flax.linen.BatchNorm(use_running_average=True)``, ``nn.merge_param``'s
    pattern) is left out: such modules refuse it given twice.

    Args:
      model: a Flax linen module.
      method: the method to call (name or function); default ``__call__``.

    Returns:
      ``{flag: value}`` (empty when the model has no eval flag).
    """
    if isinstance(model, WrappedModel):  # freeze/fold results forward the wrapped model's call
        model = model.model
    if isinstance(model, nn.Sequential):
        return {}
    function = method if callable(method) else getattr(type(model), method or "__call__", None)
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # no such method (a submodule's name), a C callable
        return {}
    return {
        name: value
        for name, value in EVAL_FLAGS.items()
        if name in parameters and getattr(model, name, None) is None
    }


@dataclasses.dataclass
class LayerCalls:
    """How one batch norm layer was called in a traced call of its model.

    Attributes:
      path: its scope path (as in the variables tree).
      kind: one of :data:`KINDS`.
      module_type: its class name.
      calls: how many times its ``__call__`` ran in the traced call (a subclass's
        ``super().__call__`` is the same call; a layer inside ``nn.scan`` counts each time
        Flax traces the body, which may be more than once).
      masked: whether any call passed a ``mask``.
      eps: its ``eps``.
      axis: its feature axis.
    """

    path: Path
    kind: str
    module_type: str
    calls: int = 0
    masked: bool = False
    eps: float = 1e-5
    axis: int = -1


def traced_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    method: str | Callable | None = None,
    **kwargs: Any,
) -> dict[Path, LayerCalls]:
    """Every jaxbn batch norm that ``model.apply(variables, *args, method=method, **kwargs)``
    calls, with its kind and how it was called, found by tracing the call abstractly
    (``jax.eval_shape``: nothing is computed, nothing is updated).

    Args:
      model: a Flax linen module.
      variables: its variables.
      *args, **kwargs: the call's arguments (``kwargs`` includes the mode flag, e.g.
        :func:`eval_kwargs`).
      method: the method to call; default ``__call__``.

    Returns:
      ``{path: LayerCalls}`` in the order of the first calls. For a ``freeze_batch_norm`` /
      ``fold_batch_norm`` result, the layers it freezes are ``frozen`` and those it folded
      are left out.
    """
    found: dict[Path, LayerCalls] = {}
    active: list[Path] = []  # the batch norm calls in progress

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        kind = kind_of(module)
        if kind is not None and context.method_name == "__call__":
            path = module_path(module)
            if path in active:  # a subclass's super().__call__: the same call
                return next_fun(*call_args, **call_kwargs)
            layer = found.setdefault(
                path,
                LayerCalls(
                    path,
                    kind,
                    type(module).__name__,
                    eps=getattr(module, "eps", 1e-5),
                    axis=getattr(module, "axis", -1),
                ),
            )
            layer.calls += 1
            layer.masked |= call_kwargs.get("mask") is not None
            active.append(path)
            try:
                return next_fun(*call_args, **call_kwargs)
            finally:
                active.pop()
        return next_fun(*call_args, **call_kwargs)

    plain = flax.core.unfreeze(variables)
    with nn.intercept_methods(record):
        # the arguments are closed over: flags such as train=False must stay Python values
        jax.eval_shape(lambda: model.apply(plain, *args, method=method, mutable=False, **kwargs))
    if isinstance(model, WrappedModel):
        # This interceptor runs outside the wrapper's, so it saw every layer as the model
        # declares it: apply what the wrapper does to them.
        selected = getattr(model, "frozen", ())  # None: every batch norm
        folded = set(getattr(model, "folded", ()))
        for path in list(found):
            name = "/".join(path)
            if name in folded:  # gone: its scale and shift live in the Conv/Dense weights
                del found[path]
            elif found[path].kind in RE_ESTIMATED and (selected is None or name in selected):
                found[path].kind = FROZEN  # it computes a frozen batch norm from its statistics
    return found


def stacked_shape(stats: Mapping[str, Any]) -> tuple[int, ...]:
    """The leading axes of a layer's statistics before its channel axis: ``()`` for a plain
    layer, ``(T,)`` under ``nn.scan``/``nn.vmap``, ``(D,)`` replicated for ``pmap``."""
    return tuple(jax.numpy.shape(stats["mean"])[:-1])


def stored_layers(variables: Mapping[str, Any]) -> dict[Path, tuple[dict, dict]]:
    """``{path: (batch_stats leaves, params leaves)}`` of every layer with running statistics
    in ``variables`` (stacked or not)."""
    return {path: (stats, params) for path, stats, params in batch_norm_layers(variables)}
