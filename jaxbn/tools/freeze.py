"""Freezing every batch norm of a model for fine-tuning, and back, without rebuilding it.

``freeze_batch_norm(model, variables)`` returns the model wrapped so that each jaxbn batch norm
(``BatchNorm`` and its 1d/2d/3d and Flax-spelled forms, ``BatchRenorm``, ``GhostBatchNorm``)
computes :func:`jaxbn.linen.frozen_batch_norm.frozen_batch_norm` instead — torchvision's
``FrozenBatchNorm2d``: ``y = (x − mean)·rsqrt(var + eps)·scale + bias`` with its own variables,
constant, in train and eval alike — the counterpart of detectron2's
``FrozenBatchNorm2d.convert_frozen_batchnorm(model)`` or of putting PyTorch's BNs in
``eval()`` with ``requires_grad_(False)``. The variables tree is unchanged (the same arrays, the
same names), so checkpoints move freely between the frozen and the original model, and
``unfreeze_batch_norm`` gives the original model back. Any method of the model runs frozen
(``frozen_model.apply(variables, x, train=True, method="encode")``). Freezing a folded model
and folding a frozen one (:func:`jaxbn.fold_batch_norm`) give one wrapper with both changes:
fine-tune with frozen batch norms, then fold for deployment.

Frozen parameters get a zero gradient. An optimizer still moves a parameter with a zero
gradient if it has weight decay or momentum left over; the result's ``param_labels`` (one
``"frozen"`` / ``"trainable"`` per leaf of ``variables["params"]``) leaves them alone::

    result = jaxbn.freeze_batch_norm(model, variables)
    frozen_model, variables = result
    tx = optax.multi_transform(
        {"trainable": optax.adamw(1e-4), "frozen": optax.set_to_zero()}, result.param_labels
    )
    # loss = f(frozen_model.apply(variables, x, train=True)): no mutable=["batch_stats"] needed

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)     # Dense → BatchNorm → relu
    >>> x = jax.random.normal(jax.random.key(0), (16, 5))            # [N, features]
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> variables = {**variables, **updates}                         # one training step
    >>> result = jaxbn.freeze_batch_norm(model, variables)
    >>> frozen_model, same_variables = result
    >>> y = frozen_model.apply(variables, x, train=True)  # BNs use their running statistics
    >>> bool(jnp.allclose(y, model.apply(variables, x, train=False)))
    True
    >>> original, _ = jaxbn.unfreeze_batch_norm(frozen_model, variables)
    >>> original == model
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.core
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from jaxbn.linen.batch_norm import BatchNorm
from jaxbn.linen.batch_renorm import BatchRenorm
from jaxbn.linen.frozen_batch_norm import frozen_batch_norm
from jaxbn.linen.ghost_batch_norm import GhostBatchNorm
from jaxbn.tools._tree import Path, batch_norm_layers, module_path

__all__ = [
    "FreezeResult",
    "FrozenModel",
    "WrappedModel",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
]

#: the module classes whose calls a :class:`FrozenModel` replaces.
FREEZABLE = (BatchNorm, BatchRenorm, GhostBatchNorm)


class _ModelAndVariables(NamedTuple):
    model: nn.Module
    variables: dict[str, Any]


class FreezeResult(_ModelAndVariables):
    """What :func:`freeze_batch_norm` / :func:`unfreeze_batch_norm` return: unpacks as
    ``(model, variables)``.

    Attributes:
      model: the (un)frozen model.
      variables: the variables, unchanged.
      frozen: ``/``-joined paths of the batch norms that are frozen (found in ``variables``).
      param_labels: ``variables["params"]``'s tree with ``"frozen"`` for the frozen batch
        norms' ``scale``/``bias`` and ``"trainable"`` elsewhere: the labels for
        ``optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)``.

    Raises:
      No exception of its own: a ``NamedTuple`` of what :func:`freeze_batch_norm` computed.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
        >>> class Net(nn.Module):                       # Dense → BatchNorm1d, no norm switch
        ...     @nn.compact
        ...     def __call__(self, x, train=False):
        ...         return jaxbn.BatchNorm1d(3)(nn.Dense(3)(x), train=train)
        >>> model, x = Net(), jnp.arange(8.0).reshape(2, 4)                # x: [N, features]
        >>> variables = model.init(jax.random.key(0), x)
        >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> variables = {**variables, **updates}                         # one training step
        >>> result = jaxbn.freeze_batch_norm(model, variables)
        >>> result
        FreezeResult(model=FrozenModel(...), frozen=('BatchNorm1d_0',))
        >>> result.param_labels["BatchNorm1d_0"], result.param_labels["Dense_0"]["kernel"]
        ({'scale': 'frozen', 'bias': 'frozen'}, 'trainable')
        >>> frozen_model, same_variables = result                         # unpacks as a pair
        >>> same_variables == variables
        True
    """

    frozen: tuple[str, ...]
    param_labels: Any

    def __new__(
        cls,
        model: nn.Module,
        variables: dict[str, Any],
        frozen: tuple[str, ...] = (),
        param_labels: Any = None,
    ) -> FreezeResult:
        self = super().__new__(cls, model, variables)
        self.frozen = tuple(frozen)
        self.param_labels = param_labels
        return self

    def __repr__(self) -> str:
        return f"FreezeResult(model={type(self.model).__name__}(...), frozen={self.frozen!r})"


class WrappedModel(nn.Module):
    """A model run with some of its batch norms changed, under the model's own variable names.

    The base of :class:`FrozenModel` and :class:`jaxbn.tools.fold.FoldedModel`. Both have a
    ``frozen`` selection, so freezing or folding a wrapped model changes its fields instead of
    wrapping it twice (two wrappers would both claim the scope name ``model``). Any method of
    the wrapped model runs with the changes: ``wrapped.apply(v, x, method="encode")``, or a
    function ``method=lambda model, x: ...`` that receives the wrapped model.

    Attributes:
      model: the original model (never itself a ``WrappedModel``).
    """

    model: nn.Module

    def __post_init__(self) -> None:
        if isinstance(self.model, WrappedModel):
            raise TypeError(
                f"{type(self).__name__} of a {type(self.model).__name__}: two wrappers would "
                "both claim the scope name 'model'; use jaxbn.freeze_batch_norm / "
                "jaxbn.fold_batch_norm on it, which return one wrapper"
            )
        super().__post_init__()

    def setup(self) -> None:
        nn.share_scope(self, self.model)  # the model's variable names, not nested under "model"

    def interceptor(self, base: Path) -> Callable:
        """The ``nn.intercept_methods`` function that makes the changes; ``base`` is the
        wrapper's scope path (paths in the fields are relative to it)."""
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run_method("__call__", *args, **kwargs)

    def run_method(self, method: str | Callable, *args: Any, **kwargs: Any) -> Any:
        """``model.<method>(*args, **kwargs)`` (a name) or ``method(model, *args, **kwargs)``
        (a function) with the wrapper's changes in effect."""
        if isinstance(method, str):
            function = getattr(self.model, method)
        else:
            function = functools.partial(method, self.model)
        with nn.intercept_methods(self.interceptor(module_path(self))):
            return function(*args, **kwargs)

    @nn.nowrap
    def apply(self, variables: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        return super().apply(variables, *args, method=self._forwarded(method), **kwargs)

    @nn.nowrap
    def init_with_output(self, rngs: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        return super().init_with_output(rngs, *args, method=self._forwarded(method), **kwargs)

    @nn.nowrap
    def _forwarded(self, method: Any) -> Any:
        """``apply``'s ``method`` for a method of the wrapped model (the wrapper has only
        ``__call__`` of its own)."""
        own = type(self).__call__
        if method is None or method == "__call__" or getattr(method, "__func__", method) is own:
            return method
        if not isinstance(method, str) and not callable(method):
            return method  # Flax says what is wrong with it
        return lambda wrapper, *args, **kwargs: wrapper.run_method(method, *args, **kwargs)


def relative_path(path: Path, base: Path) -> Path:
    """``path`` relative to a wrapper's scope path ``base`` (as the wrapper's fields name it)."""
    return path[len(base) :] if path[: len(base)] == base else path


def freezes(module: nn.Module, relative: Path, frozen: tuple[str, ...] | None) -> bool:
    """Whether a wrapper with the selection ``frozen`` (None: every one) computes frozen batch
    norm for this ``__call__`` of ``module``."""
    if not isinstance(module, FREEZABLE) or module.is_initializing():
        return False
    return frozen is None or "/".join(relative) in frozen


class FrozenModel(WrappedModel):
    """``model`` with its jaxbn batch norms computing frozen batch norm (see module docstring).

    Attributes:
      model: the original model; its variable names are kept (not nested under ``model``).
      frozen: ``/``-joined paths (relative to ``model``) of the batch norms to freeze, or None
        for every one.

    Call:
      As ``model``'s (``frozen_model.apply(variables, x, train=True)``): ``x`` [N, ..., C]
      into each frozen batch norm, no ``mutable`` needed (the statistics stay as they are).

    Raises:
      TypeError: a wrapped model given as ``model`` (``FrozenModel of a FoldedModel: two
        wrappers would both claim the scope name 'model'; use jaxbn.freeze_batch_norm /
        jaxbn.fold_batch_norm on it, which return one wrapper``).
      ValueError: at the call, a selected batch norm without running statistics (``cannot
        freeze the batch norm at BatchNorm1d_0: it has no running statistics
        (track_running_stats=False); leave it out with freeze_batch_norm(..., where=...)``),
        or an input rank the batch norm does not take (``expected 2D or 3D input (got 1D
        input)``).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
        >>> class Net(nn.Module):                       # Dense → BatchNorm1d, no norm switch
        ...     @nn.compact
        ...     def __call__(self, x, train=False):
        ...         return jaxbn.BatchNorm1d(3)(nn.Dense(3)(x), train=train)
        >>> model, x = Net(), jnp.arange(8.0).reshape(2, 4)                # x: [N, features]
        >>> variables = model.init(jax.random.key(0), x)
        >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> variables = {**variables, **updates}                         # one training step
        >>> frozen_model = jaxbn.tools.freeze.FrozenModel(model)   # jaxbn.freeze_batch_norm's
        >>> y = frozen_model.apply(variables, x, train=True)     # running statistics, even so
        >>> bool(jnp.allclose(y, model.apply(variables, x, train=False)))
        True
        >>> try:
        ...     frozen_model.apply(variables, x[0], train=True)      # one example: [features]
        ... except ValueError as error:
        ...     print(error)
        expected 2D or 3D input (got 1D input)
    """

    frozen: tuple[str, ...] | None = None

    def interceptor(self, base: Path) -> Callable:
        def freeze(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            relative = relative_path(module_path(module), base)
            if not freezes(module, relative, self.frozen):
                return next_fun(*args, **kwargs)
            return frozen_call(module, "/".join(relative), args, kwargs)

        return freeze


def frozen_call(module: nn.Module, where: str, args: tuple, kwargs: dict) -> jax.Array:
    """What a batch norm's ``__call__(*args, **kwargs)`` computes when frozen; ``where`` is its
    path for the error messages."""
    x = jnp.asarray(args[0] if args else kwargs["x"])
    if not getattr(module, "track_running_stats", True) or not module.has_variable(
        "batch_stats", "mean"
    ):
        raise ValueError(
            f"cannot freeze the batch norm at {where or '(top)'}: it has no running statistics "
            "(track_running_stats=False); leave it out with freeze_batch_norm(..., where=...)"
        )
    ranks = getattr(module, "expected_ranks", None)
    if ranks is not None and x.ndim not in ranks:
        raise ValueError(module.rank_message.format(ndim=x.ndim))
    # get_variable returns a boxed value as stored (nn.with_partitioning); the map needs arrays
    get = lambda collection, name: nn.meta.unbox(module.get_variable(collection, name))
    read = lambda name: get("params", name) if module.has_variable("params", name) else None
    y = frozen_batch_norm(
        x,
        get("batch_stats", "mean"),
        get("batch_stats", "var"),
        read("scale"),
        read("bias"),
        module.eps,
        axis=module.axis,
        mask=kwargs.get("mask"),
    )
    return y.astype(module.dtype) if module.dtype is not None else y


def freeze_batch_norm(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    where: Callable[[str], bool] | None = None,
) -> FreezeResult:
    """The model with its batch norms frozen, the same variables, and optimizer labels.

    Args:
      model: a Flax linen model using jaxbn batch norms, or a :class:`FrozenModel` (its
        selection grows) or a ``FoldedModel`` (its remaining batch norms are frozen too).
      variables: its variables (unchanged; read for the labels and the paths).
      where: optional filter on the ``/``-joined batch norm path (``lambda p:
        p.startswith("backbone")``); default every batch norm, and one without running
        statistics is then an error when the model runs.

    Returns:
      A :class:`FreezeResult` ``(frozen_model, variables)`` with ``.frozen`` and
      ``.param_labels``.

    Raises:
      ValueError: ``where`` selects no batch norm with running statistics.

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)
        >>> x = jax.random.normal(jax.random.key(0), (16, 5))        # [N, features]
        >>> variables = model.init(jax.random.key(1), x, train=False)
        >>> result = jaxbn.freeze_batch_norm(model, variables)
        >>> result.frozen
        ('layers_1', 'layers_4')
        >>> sorted(result.param_labels["layers_1"].items())
        [('bias', 'frozen'), ('scale', 'frozen')]
    """
    layers = ["/".join(path) for path, _, _ in batch_norm_layers(variables)]
    previous: tuple[str, ...] | None = ()
    if isinstance(model, WrappedModel):
        previous = model.frozen
    if where is None or previous is None:
        selection = None
        frozen = tuple(layers)
    else:
        chosen = [p for p in layers if where(p)]
        if not chosen:
            raise ValueError(
                f"where= selects none of the batch norms with running statistics "
                f"({', '.join(layers) or 'none found in variables'})"
            )
        selection = tuple(dict.fromkeys((*previous, *chosen)))
        frozen = selection
    labels = _labels(variables, frozen)
    if isinstance(model, WrappedModel):  # one wrapper, with a larger selection
        frozen_model = model.clone(frozen=selection)
    else:
        frozen_model = FrozenModel(model, selection)
    return FreezeResult(frozen_model, dict(variables), frozen, labels)


def unfreeze_batch_norm(model: nn.Module, variables: Mapping[str, Any]) -> FreezeResult:
    """The original model of a :func:`freeze_batch_norm` result (a model that is not frozen
    comes back as it is; a folded one keeps its folds), the same variables, and every parameter
    labelled ``"trainable"``.

    Args:
      model: a :class:`FrozenModel`, a folded-and-frozen model, or any Flax linen model.
      variables: its variables (returned unchanged).

    Returns:
      A :class:`FreezeResult` ``(model, variables)`` with ``.frozen == ()``.

    Raises:
      TypeError: ``variables`` that is not a mapping (any model is accepted).

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((2, 5)), train=False)
        >>> frozen_model, _ = jaxbn.freeze_batch_norm(model, variables)
        >>> original, _ = jaxbn.unfreeze_batch_norm(frozen_model, variables)
        >>> original == model
        True
    """
    if isinstance(model, FrozenModel):
        model = model.model
    elif isinstance(model, WrappedModel):
        model = model.clone(frozen=())
    return FreezeResult(model, dict(variables), (), _labels(variables, ()))


def _labels(variables: Mapping[str, Any], frozen: tuple[str, ...]) -> Any:
    params = flax.core.unfreeze(variables.get("params", {}))
    if not params:
        return {}
    chosen = {tuple(p.split("/")) for p in frozen}
    flat = flax.traverse_util.flatten_dict(params)
    labels = {key: "frozen" if key[:-1] in chosen else "trainable" for key in flat}
    return flax.traverse_util.unflatten_dict(labels)
