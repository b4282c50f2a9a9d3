"""jaxbn's tools for NNX models: fold, update_bn, inspect, torch state dicts — on any NNX model.

An NNX model's ``nnx.Param`` state is a Linen ``params`` tree and its ``nnx.BatchStat`` state a
``batch_stats`` tree, keyed by attribute names: :func:`to_linen_variables` and
:func:`from_linen_variables` convert between the two, and the tools that work on Linen
variable trees work on an NNX model through them:

* :func:`torch_to_nnx` / :func:`nnx_to_torch` (:mod:`jaxbn.interop`): torch names are the
  attribute paths (:func:`torch_names`; ``nnx.List``/``nnx.Sequential`` indices as torch's
  ``ModuleList``/``Sequential``);
* :func:`inspect_batchnorm` (:func:`jaxbn.inspect_batchnorm`), with each layer's kind and a
  row per member of a stacked (``nnx.vmap``) layer;
* :func:`update_bn` (:func:`jaxbn.update_bn`, running the NNX model itself): trained,
  ghost and renorm layers re-estimated (stacked ones member by member), frozen ones left alone;
* :func:`fold_batch_norm`: :mod:`jaxbn.nnx.fold` for any NNX model; the tutorial models fold
  through their Linen twin, as before.

Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
    >>> state_dict = jaxbn.nnx.nnx_to_torch(model)          # torch's names, numpy arrays
    >>> sorted(state_dict)[:5]
    ['layers.0.bias', 'layers.0.weight', 'layers.1.bias', 'layers.1.num_batches_tracked',
     'layers.1.running_mean']
    >>> other = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(1))
    >>> other = jaxbn.nnx.torch_to_nnx(state_dict, other)   # in place (a torch state_dict too)
    >>> print(jaxbn.nnx.inspect_batchnorm(other))           # fresh statistics are flagged
    layer    kind          C  steps ... flags
    ------...
    layers_1 trained       8      0 ...  statistics never updated (...)
    layers_4 trained       4      0 ...  statistics never updated (...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn.linen.batch_norm import MOMENTS_COLLECTION
from jaxbn.nnx import fold as _nnx_fold
from jaxbn.nnx.batch_norm import MOMENTS_NAME, resolve_mode
from jaxbn.tools import fold as _fold
from jaxbn.tools import inspect_bn as _inspect
from jaxbn.tools import interop as _interop
from jaxbn.tools.layers import RE_ESTIMATED
from jaxbn.tools.update_bn import update_bn as _linen_update_bn

#: Linen collection ← the NNX variable type that holds it.
COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def to_linen_variables(model: nnx.Module) -> dict[str, Any]:
    """``{"params": …, "batch_stats": …}`` of an NNX model, keyed by attribute names.

    ``nnx.Param`` leaves go to ``params`` and ``nnx.BatchStat`` leaves to ``batch_stats``
    (a collection without leaves is left out, as Linen's ``init`` does); list indices become
    strings. Other variable types (RNG state, intermediates) are not variables of a Linen
    tree and are left out. The arrays are the model's, not copies.

    Args:
      model: an NNX model.

    Returns:
      ``{"params": {...}, "batch_stats": {...}}``, Linen's layout.

    Raises:
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> from flax import nnx
        >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
        >>> variables = jaxbn.nnx.to_linen_variables(model)
        >>> sorted(variables["batch_stats"]["layers_1"])
        ['mean', 'num_batches_tracked', 'var']
    """
    _check_model(model, "to_linen_variables")
    out = {}
    for collection, kind in COLLECTIONS:
        tree = _string_keys(nnx.to_pure_dict(nnx.state(model, kind)))
        if tree:
            out[collection] = tree
    return out


def from_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Sets the model's ``nnx.Param`` / ``nnx.BatchStat`` values from a Linen variables tree.

    The tree must hold exactly the model's leaves (names as :func:`to_linen_variables` gives
    them) with the same shapes; values keep their dtypes.

    Args:
      model: an NNX model.
      variables: a Linen variables tree with exactly the model's leaves.

    Returns:
      ``model``, updated in place.

    Raises:
      KeyError: naming the missing and the unexpected leaves.
      ValueError: naming a leaf whose shape differs.
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> from flax import nnx
        >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
        >>> other = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(1))
        >>> _ = jaxbn.nnx.from_linen_variables(other, jaxbn.nnx.to_linen_variables(model))
        >>> bool(jnp.array_equal(other.layers_0.kernel[...], model.layers_0.kernel[...]))
        True
    """
    _check_model(model, "from_linen_variables")
    unknown = sorted(set(variables) - {c for c, _ in COLLECTIONS})
    missing, unexpected, states = [], [f"{c}/..." for c in unknown], []
    for collection, kind in COLLECTIONS:
        state = nnx.state(model, kind)
        have = _flat(_string_keys(nnx.to_pure_dict(state)))
        given = _flat(variables.get(collection, {}))
        missing += [f"{collection}/{'/'.join(p)}" for p in have if p not in given]
        unexpected += [f"{collection}/{'/'.join(p)}" for p in given if p not in have]
        for path, value in given.items():
            if path in have and jnp.shape(value) != jnp.shape(have[path]):
                raise ValueError(
                    f"{collection}/{'/'.join(path)}: shape {tuple(jnp.shape(value))} does not "
                    f"fit the model's {tuple(jnp.shape(have[path]))}"
                )
        states.append((state, variables.get(collection, {})))
    if missing or unexpected:
        raise KeyError(
            f"variables do not match the NNX model: missing {missing}, unexpected {unexpected}"
        )
    for state, tree in states:
        if tree:
            nnx.replace_by_pure_dict(state, tree)
            nnx.update(model, state)
    return model


def torch_to_nnx(state_dict: Mapping[str, Any], model: nnx.Module, **kwargs: Any) -> nnx.Module:
    """Loads a PyTorch ``state_dict`` into an NNX model in place (and returns it).

    :func:`jaxbn.interop.torch_to_flax` on the model's Linen layout; ``kwargs`` are its
    (``flatten_shapes``, ``rename``, ``norm_layouts``). Lossless, in the model's dtypes. The
    torch names are the attribute paths (:func:`torch_names`: ``blocks.0.conv.weight``; an
    ``nnx.Sequential``'s ``layers`` is left out, as in ``torch.nn.Sequential``) unless
    ``rename`` is given; the tutorial models keep their Linen twins' names.

    Args:
      state_dict: a torch ``state_dict`` (tensors or numpy arrays).
      model: the NNX model to load into (its shapes and dtypes are the template).
      **kwargs: :func:`jaxbn.interop.torch_to_flax`'s options.

    Returns:
      ``model``, loaded in place.

    Raises:
      KeyError: torch names without a leaf in the model, or leaves without a torch name.
      ValueError: a weight whose shape fits neither layout.
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> from flax import nnx
        >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
        >>> state_dict = jaxbn.nnx.nnx_to_torch(model)
        >>> other = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(1))
        >>> other = jaxbn.nnx.torch_to_nnx(state_dict, other)
        >>> bool(jnp.array_equal(other.layers_6.kernel[...], model.layers_6.kernel[...]))
        True
    """
    template = to_linen_variables(model)
    kwargs = _with_torch_names(model, kwargs)
    return from_linen_variables(model, _interop.torch_to_flax(state_dict, template, **kwargs))


def nnx_to_torch(model: nnx.Module, **kwargs: Any) -> dict[str, Any]:
    """A torch ``state_dict`` (numpy arrays) of an NNX model: :func:`jaxbn.interop.flax_to_torch`
    on its Linen layout, named as :func:`torch_to_nnx` reads them; ``kwargs`` are its.

    Args:
      model: an NNX model.
      **kwargs: :func:`jaxbn.interop.flax_to_torch`'s options.

    Returns:
      ``{torch name: numpy array}``, loadable by ``torch_module.load_state_dict`` (after
      ``torch.as_tensor``).

    Raises:
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> from flax import nnx
        >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
        >>> state_dict = jaxbn.nnx.nnx_to_torch(model)
        >>> state_dict["layers.0.weight"].shape                    # torch's [out, in]
        (8, 5)
    """
    kwargs = _with_torch_names(model, kwargs)
    return _interop.flax_to_torch(to_linen_variables(model), **kwargs)


def torch_names(model: nnx.Module) -> Callable[[str], str]:
    """The torch module name of each module path of an NNX model: its attribute path joined by
    dots (``blocks/0/conv`` → ``blocks.0.conv``), without the ``layers`` attribute of an
    ``nnx.Sequential`` (``torch.nn.Sequential`` numbers its children itself).

    Args:
      model: an NNX model.

    Returns:
      ``"/"``-joined module path → torch module path (a ``rename`` for
      :func:`jaxbn.interop.torch_to_flax`).

    Raises:
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jaxbn.nnx
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(3))
        >>> jaxbn.nnx.torch_names(model)("layers/1")
        '1'
    """
    _check_model(model, "torch_names")
    hidden = {
        (*(str(p) for p in path), "layers")
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Sequential)
    }

    def name(flax_path: str) -> str:
        parts = flax_path.split("/") if flax_path else []
        return ".".join(p for i, p in enumerate(parts) if tuple(parts[: i + 1]) not in hidden)

    return name


def _with_torch_names(model: nnx.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    # the tutorial models are named like their Linen twins (classifier_0 → classifier.0)
    if kwargs.get("rename") is not None or hasattr(model, "linen_twin"):
        return kwargs
    return {**kwargs, "rename": torch_names(model)}


def inspect_batchnorm(model: nnx.Module) -> _inspect.BatchNormReport:
    """:func:`jaxbn.inspect_batchnorm` of an NNX model's jaxbn batch norms, with each layer's
    kind (trained, untracked, frozen, ghost, renorm; read from the modules, nothing is run).

    Stacked layers (made under ``nnx.vmap``, run under ``nnx.scan``: statistics ``[T, C]``)
    get a row per member (``blocks/bn[2]``); ``track_running_stats=False`` layers a row
    without statistics; a frozen layer's counter of 0 is not flagged (its statistics are
    constants).

    Args:
      model: an NNX model.

    Returns:
      A :class:`jaxbn.BatchNormReport`; ``print`` it for the table.

    Raises:
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> from flax import nnx
        >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
        >>> report = jaxbn.nnx.inspect_batchnorm(model)
        >>> [(layer.path, layer.kind) for layer in report.layers]
        [('layers_1', 'trained'), ('layers_4', 'trained')]
    """
    _check_model(model, "inspect_batchnorm")
    kinds = {}
    for path, node in nnx.iter_graph(model):
        kind = _nnx_fold.kind_of_nnx(node)
        if kind is not None:
            kinds.setdefault("/".join(str(p) for p in path), kind)
    return _inspect.inspect_batchnorm(to_linen_variables(model), kinds=kinds)


def update_bn(model: nnx.Module, batches: Iterable[Any], **call_kwargs: Any) -> nnx.Module:
    """Re-estimates every jaxbn batch norm's running statistics, in place (see
    :func:`jaxbn.update_bn`, ``torch.optim.swa_utils.update_bn``): the plain cumulative average
    over ``batches`` of the statistics each batch norm reported in training (the model's
    momentum plays no part); a batch norm that reported none keeps its statistics, and a
    frozen one (``FrozenBatchNorm``, ``freeze_batch_norm``) is left exactly as it was. Stacked
    layers (``nnx.vmap``/``nnx.scan``) are averaged member by member; a ``GhostBatchNorm``
    counts one report per virtual batch, a ``BatchRenorm`` its batch's mean and unbiased
    variance. The model runs on a copy in training mode (``use_running_average=False``;
    dropout is left as it is) and is called as ``model(x, **call_kwargs)``. ``batches``:
    inputs, or tuples whose first element is the input.

    Args:
      model: an NNX model with jaxbn batch norms.
      batches: an iterable of inputs, or of tuples whose first element is the input.
      **call_kwargs: more keyword arguments of ``model(x, ...)``.

    Returns:
      ``model``, updated in place; its mode is left as it was.

    Raises:
      TypeError: ``model`` that is not a ``flax.nnx.Module`` (a Linen tree goes to the
        jaxbn tools directly).

    Example:
        >>> import jax.numpy as jnp, jaxbn.nnx
        >>> from flax import nnx
        >>> model = jaxbn.nnx.MLP(5, hidden=(8, 4), num_classes=3, rngs=nnx.Rngs(0))
        >>> x = jnp.arange(80.0).reshape(16, 5) / 80
        >>> model = jaxbn.nnx.update_bn(model, [x[:8], x[8:]])
        >>> model.layers_1.num_batches_tracked[...]
        Array(2, dtype=int32)
    """
    _check_model(model, "update_bn")
    graphdef, state = nnx.split(_nnx_fold.instrumented(model, _report_moments, _reports_itself))

    def apply_fn(variables, x, *, train, mutable, **kwargs):
        del train, mutable  # training with reports, as update_bn asks
        # New Variable objects at this trace level (merge would reuse the split's).
        copy = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        from_linen_variables(copy, variables)
        copy.set_attributes(
            use_running_average=False, _report_moments=True, raise_if_not_found=False
        )
        y, reports = nnx.capture(lambda model, x: model(x, **kwargs), nnx.Intermediate)(copy, x)
        reports = _as_trained_reports(_string_keys(nnx.to_pure_dict(reports)))
        stats = to_linen_variables(copy).get("batch_stats", {})
        return y, {"batch_stats": stats, MOMENTS_COLLECTION: reports}

    variables = _linen_update_bn(apply_fn, to_linen_variables(model), batches, **call_kwargs)
    return from_linen_variables(model, variables)


def _reports_itself(module: nnx.Module) -> bool:
    """A batch norm that re-estimates but does not sow its moments itself (no
    ``_report_moments`` switch: the NNX GhostBatchNorm and BatchRenorm): update_bn reports
    for it."""
    kind = _nnx_fold.kind_of_nnx(module)
    return kind in RE_ESTIMATED and not hasattr(module, "_report_moments")


def _report_moments(node, key, call, args, kwargs):
    """Sows the batch moments each statistics update of ``node`` averages in, then runs it:
    one per virtual batch for a GhostBatchNorm, the batch's for a BatchRenorm (as their Linen
    twins report them)."""
    del key
    x = args[0] if args else kwargs["x"]
    mode = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    training = resolve_mode(node, kwargs.get("train"), mode, node.use_running_average)
    if training and getattr(node, "mean", None) is not None:
        x = jnp.asarray(x)
        mask = kwargs.get("mask")
        mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
        size = getattr(node, "virtual_batch_size", None) or x.shape[0]
        synced = hasattr(node, "axis_name")  # the NNX GhostBatchNorm has no sync axis
        for start in range(0, x.shape[0], size):
            part = slice(start, start + size)
            part_mask = None if mask is None else mask[part]
            moments = logic.batch_moments(node, x[part], part_mask, synced=synced)
            node.sow(nnx.Intermediate, MOMENTS_NAME, dict(moments._asdict()))
    return call(node, *args, **kwargs)


def _as_trained_reports(tree: Any) -> Any:
    """NNX batch norms sow their moments as ``moments`` (a tuple, one entry per update); the
    Linen layout files them under the layer's kind (``trained``), where :func:`jaxbn.update_bn`
    reads them. Layers named ``trained`` or ``moments`` are modules (mappings), not reports."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        reports = isinstance(value, tuple | list) and all(_is_moments(v) for v in value)
        if key == MOMENTS_NAME and reports:
            out["trained"] = value
        else:
            out[key] = _as_trained_reports(value)
    return out


def _is_moments(value: Any) -> bool:
    # a report itself ({count, mean, var}) vs the sown entries under the name "moments"
    return isinstance(value, Mapping) and {"count", "mean", "var"} <= set(value)


def fold_batch_norm(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    """Folds the batch norms of an NNX model into the ``nnx.Linear``/``nnx.Conv`` before them.

    Any NNX model: ``jaxbn.nnx.fold.fold_batch_norm`` (a new NNX model, ``.folded`` and
    ``.left``, the outputs checked). The tutorial models (``jaxbn.nnx.MLP``/``ConvNet``/``ResNet``,
    which have a Linen twin, ``model.linen_twin()``) keep folding through it:
    :func:`jaxbn.fold_batch_norm` of the twin and ``to_linen_variables(model)``, whose result
    is the folded *Linen* model and variables.

    Args:
      model: the NNX model (left untouched).
      *args: the sample call's positional inputs (one example is enough).
      **kwargs: the sample call's keyword arguments.

    Returns:
      For a tutorial model, :func:`jaxbn.fold_batch_norm`'s :class:`jaxbn.FoldResult` (the
      folded Linen model and its variables, ``.folded``, ``.left``); for any other NNX model,
      a ``jaxbn.nnx.fold.FoldResult`` (``.model``, a new NNX model in eval, ``.folded``
      and ``.left``, ``{batch norm path: Linear/Conv path}`` and ``{batch norm path: why}``).

    Raises:
      TypeError: ``model`` is not an NNX module (``jaxbn.nnx.fold_batch_norm takes a
        flax.nnx.Module, got dict; for a Linen variables tree use the jaxbn tools directly``),
        or no sample input (``fold_batch_norm needs a sample input: fold_batch_norm(model,
        x)``).
      ValueError: a batch norm to fold was never trained (``cannot fold the batch norm at bn:
        its statistics were never tracked (num_batches_tracked == 0); train it or run
        jaxbn.update_bn first``), or the folded outputs differ from the original's on the
        sample input (``folding changed the model's eval outputs on the sample input: ...``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(4, 3, rngs=rngs)
      ...         self.bn = jaxbn.nnx.BatchNorm1d(3, rngs=rngs)
      ...     def __call__(self, x, train=None):
      ...         return self.bn(self.linear(x), train=train)
      >>> net, x = Net(nnx.Rngs(0)), jnp.arange(8.0).reshape(2, 4)
      >>> jaxbn.nnx.fold_batch_norm(net, x)
      Traceback (most recent call last):
      ...
      ValueError: cannot fold the batch norm at bn: its statistics were never tracked
      (num_batches_tracked == 0); train it or run jaxbn.update_bn first
      >>> _ = net(x, train=True)  # one training step: running statistics to fold
      >>> result = jaxbn.nnx.fold_batch_norm(net, x)
      >>> result
      FoldResult(model=Net(...), folded={'bn': 'linear'}, left={})
      >>> bool(jnp.allclose(result.model(x), net(x, train=False), atol=1e-5))
      True
    """
    _check_model(model, "fold_batch_norm")
    if hasattr(model, "linen_twin"):
        if not args:
            raise TypeError("fold_batch_norm needs a sample input: fold_batch_norm(model, x)")
        return _fold.fold_batch_norm(model.linen_twin(), to_linen_variables(model), *args, **kwargs)
    return _nnx_fold.fold_batch_norm(model, *args, **kwargs)


def _check_model(model: Any, name: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"jaxbn.nnx.{name} takes a flax.nnx.Module, got {type(model).__name__}; for a Linen "
            "variables tree use the jaxbn tools directly"
        )


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out
