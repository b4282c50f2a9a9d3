"""Freezing every batch norm of an NNX model for fine-tuning, and back (the NNX counterpart of
:func:`jaxbn.freeze_batch_norm`).

``freeze_batch_norm(model)`` replaces, in place, each batch norm of the model — jaxbn's
``BatchNorm`` (and 1d/2d/3d), ``nnx.flax_compat.BatchNorm``, ``BatchRenorm``,
``GhostBatchNorm``, and ``flax.nnx.BatchNorm`` — by a :class:`FrozenBatchNorm` holding the
same values under the same names: torchvision's ``FrozenBatchNorm2d``, detectron2's
``convert_frozen_batchnorm``. The frozen layer computes ``(x − mean)·rsqrt(var + eps)·scale +
bias`` with constants, in train and eval alike (the numbers of the Linen ``FrozenModel``); its
``scale``/``bias`` become :class:`FrozenParam`, which ``jaxbn.nnx.trainable`` leaves out::

    model = jaxbn.nnx.freeze_batch_norm(model)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=jaxbn.nnx.trainable)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, jaxbn.nnx.trainable))(model, x, y)
    optimizer.update(model, grads)

``unfreeze_batch_norm(model)`` puts the original layers back (their kind and fields, the
current values). Both return the model (the same object, changed in place; a model that is
itself a batch norm comes back replaced).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from jaxbn.nnx.batch_norm import BatchNorm
from jaxbn.nnx.batch_renorm import BatchRenorm
from jaxbn.nnx.flax_compat import BatchNorm as FlaxSpelledBatchNorm
from jaxbn.nnx.frozen_batch_norm import FrozenBatchNorm, FrozenParam
from jaxbn.nnx.ghost_batch_norm import GhostBatchNorm

__all__ = ["freeze_batch_norm", "unfreeze_batch_norm"]

#: the module classes :func:`freeze_batch_norm` replaces.
FREEZABLE = (BatchNorm, FlaxSpelledBatchNorm, BatchRenorm, GhostBatchNorm, nnx.BatchNorm)


def freeze_batch_norm(model: Any, *, where: Callable[[str], bool] | None = None) -> Any:
    """Replaces the model's batch norms by :class:`FrozenBatchNorm` s, in place.

    Args:
      model: any NNX model (or a batch norm).
      where: optional filter on the ``/``-joined attribute path of a batch norm
        (``lambda p: p.startswith("backbone")``); default every batch norm.

    Returns:
      The model (the same object; a batch norm given as the model comes back frozen).

    Raises:
      ValueError: a selected batch norm has no running statistics (``cannot freeze the batch
        norm at (top): it has no running statistics (track_running_stats=False); leave it out
        with freeze_batch_norm(..., where=...)``), or ``where`` selects none (``where=
        selects none of the batch norms with running statistics``).

    Example:
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> model = jaxbn.nnx.MLP(4, (8,), 3, rngs=nnx.Rngs(0))
      >>> model = jaxbn.nnx.freeze_batch_norm(model)
      >>> type(model.layers_1).__name__, type(model.layers_1.scale).__name__
      ('FrozenBatchNorm', 'FrozenParam')
      >>> [path for path, _ in nnx.to_flat_state(nnx.state(model, jaxbn.nnx.trainable))]
      [('layers_0', 'bias'), ('layers_0', 'kernel'),
       ('layers_3', 'bias'), ('layers_3', 'kernel')]
      >>> jaxbn.nnx.freeze_batch_norm(model, where=lambda path: path.startswith("head"))
      Traceback (most recent call last):
      ...
      ValueError: where= selects none of the batch norms with running statistics
    """
    found = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, FREEZABLE) and (where is None or where(_name(path)))
    ]
    if where is not None and not found:
        raise ValueError("where= selects none of the batch norms with running statistics")
    for path, node in found:
        if getattr(node, "mean", None) is None:
            raise ValueError(
                f"cannot freeze the batch norm at {_name(path) or '(top)'}: it has no running "
                "statistics (track_running_stats=False); leave it out with "
                "freeze_batch_norm(..., where=...)"
            )
    for path, node in found:
        model = _replace(model, path, _frozen(node))
    return model


def unfreeze_batch_norm(model: Any) -> Any:
    """Puts back the batch norms :func:`freeze_batch_norm` replaced, with their current values
    (a :class:`FrozenBatchNorm` built as one stays).

    Args:
      model: any NNX model (or a :class:`FrozenBatchNorm`); one with no frozen batch norm
        comes back unchanged.

    Returns:
      The model (the same object, changed in place; a frozen batch norm given as the model
      comes back as the original kind of layer): each replaced batch norm is its original
      class and fields again, with ``scale``/``bias`` as ``nnx.Param`` (trained again) and the
      running statistics of the frozen layer.

    Raises:
      No exception of its own: every layer it puts back was checked when it was frozen.

    Example:
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> model = jaxbn.nnx.freeze_batch_norm(jaxbn.nnx.MLP(4, (8,), 3, rngs=nnx.Rngs(0)))
      >>> model = jaxbn.nnx.unfreeze_batch_norm(model)
      >>> type(model.layers_1).__name__, type(model.layers_1.scale).__name__
      ('BatchNorm1d', 'Param')
    """
    found = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, FrozenBatchNorm) and node.unfrozen is not None
    ]
    for path, node in found:
        model = _replace(model, path, _unfrozen(node))
    return model


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _frozen(module: nnx.Module) -> FrozenBatchNorm:
    """The frozen twin of ``module``: its values (new Variables) and its fields."""
    eps = module.epsilon if hasattr(module, "epsilon") else module.eps
    axis = module.axis
    if not isinstance(axis, int):
        raise ValueError(f"cannot freeze a batch norm over several axes ({axis!r})")
    frozen = FrozenBatchNorm(
        module.num_features,
        eps,
        affine=False,
        axis=axis,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
    )
    for name in ("scale", "bias"):
        variable = getattr(module, name, None)
        if variable is not None:
            setattr(frozen, name, FrozenParam(variable[...], **variable.get_metadata()))
    frozen.affine = frozen.scale is not None or frozen.bias is not None
    frozen.mean = nnx.BatchStat(module.mean[...])
    frozen.var = nnx.BatchStat(module.var[...])
    count = getattr(module, "num_batches_tracked", None)
    frozen.num_batches_tracked = nnx.data(None) if count is None else nnx.BatchStat(count[...])
    # the rank check of BatchNorm1d/2d/3d stays, as in the Linen FrozenModel
    ranks = getattr(module, "expected_ranks", None)
    if ranks is not None:
        frozen.expected_ranks = ranks
        frozen.rank_message = module.rank_message
    frozen.unfrozen = nnx.graphdef(module)
    return frozen


def _unfrozen(frozen: FrozenBatchNorm) -> nnx.Module:
    """The module ``frozen`` replaced, with ``frozen``'s current values."""
    state = {}
    for name in ("scale", "bias", "mean", "var", "num_batches_tracked"):
        variable = getattr(frozen, name, None)
        if variable is None:
            continue
        kind = nnx.Param if isinstance(variable, FrozenParam) else nnx.BatchStat
        state[name] = kind(variable[...], **variable.get_metadata())
    return nnx.merge(frozen.unfrozen, nnx.State(state))


def _replace(model: Any, path: tuple[Any, ...], new: nnx.Module) -> Any:
    """``model`` with the node at ``path`` replaced by ``new`` (in place; the root: ``new``)."""
    if not path:
        return new
    attribute = lambda parent, key: isinstance(key, str) and hasattr(parent, key)
    parent = model
    for key in path[:-1]:
        parent = getattr(parent, key) if attribute(parent, key) else parent[key]
    key = path[-1]
    if attribute(parent, key):
        setattr(parent, key, new)
    else:  # a list, a dict, an nnx.List / nnx.Dict
        parent[key] = new
    return model
