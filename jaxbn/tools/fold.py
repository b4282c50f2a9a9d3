"""Folding batch norm into the preceding conv/dense layer for inference.

In eval, ``bn(conv(x)) = γ·(W*x + b − μ)/√(σ²+ε) + β`` is one conv with

    W' = W · γ/√(σ²+ε)   (per output channel)        b' = (b − μ) · γ/√(σ²+ε) + β

— the counterpart of ``torch.nn.utils.fusion.fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``
in Flax layouts (the output channel is the kernel's last axis for both conv and dense).

The identity holds only where the conv's output goes to that batch norm and nowhere else: with a
skip connection ``bn(h) + h``, or a conv whose weights serve a second call, folding would change
the other use. ``fold_batch_norm(model, variables, x)`` therefore traces one eval-mode call to a
jaxpr and folds a batch norm only when it is the single consumer of a Conv/Dense output and that
layer runs once; every other batch norm stays (pre-activation batch norms after a concatenation,
an addition or an activation, two batch norms reading one conv), and the result says which and
why. It works on any Flax linen model, and a ``use_bias=False`` layer gets a bias. Before
returning, the folded model is run against the original on ``x``; a difference beyond rounding
raises.

What each batch norm kind (:mod:`jaxbn.tools.layers`) becomes:

- trained, frozen, ghost, renorm (also ``jaxbn.flax_compat.BatchNorm``, and any of them frozen
  by ``freeze_batch_norm``): eval is ``(x − mean)·rsqrt(var + eps)·scale + bias`` with stored
  statistics, so each folds where the graph allows. A frozen layer is a constant and needs no
  counter; the others refuse statistics that were never tracked.
- untracked (``track_running_stats=False``, GhostBatchNorm's too): kept, eval uses the batch.
- called with ``mask=``, or with stacked statistics (``nn.scan``/``nn.vmap`` members), or inside
  a loop or branch: kept. ``jax.jit``/``nn.jit``/``nn.remat`` are looked into.
- ``flax.linen.BatchNorm``: kept and named (it is not a jaxbn layer).

Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)     # Dense → BatchNorm → relu
    >>> x = jax.random.normal(jax.random.key(0), (16, 5))            # [N, features]
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> variables = {**variables, **updates}                         # one training step
    >>> folded_model, folded_vars = jaxbn.fold_batch_norm(model, variables, x[:1])
    >>> y = folded_model.apply(folded_vars, x, train=False)
    >>> bool(jnp.allclose(y, model.apply(variables, x, train=False), atol=1e-5))
    True
    >>> jaxbn.fold_batch_norm(model, variables, x[:1]).left    # {bn path: why it was kept}
    {}
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.core
import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxbn.tools._tree import (
    Path,
    batch_norm_layers,
    get_path,
    module_path,
    set_path,
    unboxed,
)
from jaxbn.tools.freeze import (
    FrozenModel,
    WrappedModel,
    freezes,
    frozen_call,
    relative_path,
)
from jaxbn.tools.layers import (
    FROZEN,
    UNTRACKED,
    eval_kwargs,
    kind_of,
    stacked_shape,
    stored_layers,
)

__all__ = [
    "FoldResult",
    "FoldedModel",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "fuse_conv_bn_weights",
    "fuse_dense_bn_weights",
]


def fuse_conv_bn_weights(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    eps: float,
    scale: jax.Array | None,
    bn_bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Conv kernel ``[*window, I, O]`` and bias [O] with a following batch norm folded in.

    Args:
      kernel: ``[*window, C_in, C_out]`` (Flax ``nn.Conv`` layout).
      bias: [C_out] or None (zeros).
      mean, var: the batch norm's running statistics [C_out].
      eps: the batch norm's eps.
      scale, bn_bias: the batch norm's affine parameters [C_out], or None (ones / zeros).

    Returns:
      ``(kernel', bias')`` in the dtypes of ``kernel`` and ``bias`` (or ``kernel``).

    Raises:
      ValueError: statistics or parameters whose size is not ``C_out`` (JAX's broadcasting
        error).

    Example:
        >>> import jax.numpy as jnp, numpy as np, jaxbn
        >>> kernel = jnp.ones((3, 3, 2, 4))                       # [*window, C_in, C_out]
        >>> k, b = jaxbn.fuse_conv_bn_weights(
        ...     kernel, None, jnp.zeros(4), jnp.full(4, 3.0), 1.0, None, None)
        >>> print(np.asarray(k[0, 0, 0]))                         # 1 / sqrt(3 + 1)
        [0.5 0.5 0.5 0.5]
    """
    factor = jax.lax.rsqrt(var + eps)
    if scale is not None:
        factor = factor * scale
    bias_dtype = kernel.dtype if bias is None else bias.dtype
    bias = jnp.zeros_like(mean) if bias is None else bias
    bn_bias = jnp.zeros_like(mean) if bn_bias is None else bn_bias
    new_kernel = (kernel * factor).astype(kernel.dtype)
    new_bias = ((bias - mean) * factor + bn_bias).astype(bias_dtype)
    return new_kernel, new_bias


#: Dense kernel [I, O] and bias [O] with a following batch norm folded in: the same function
#: as :func:`fuse_conv_bn_weights` (the output axis is last in both Flax layouts).
fuse_dense_bn_weights = fuse_conv_bn_weights


class _ModelAndVariables(NamedTuple):
    model: nn.Module
    variables: dict[str, Any]


class FoldResult(_ModelAndVariables):
    """What :func:`fold_batch_norm` returns: unpacks as ``(model, variables)``, and reports.

    Attributes:
      model: the folded model, called as the original (``apply(variables, x, train=False)``).
      variables: its variables.
      folded: ``{batch norm path: Conv/Dense path}`` for each batch norm folded away
        (paths ``/``-joined, as in the variables tree), those of a folded model given to
        :func:`fold_batch_norm` included.
      left: ``{batch norm path: why}`` for each batch norm that was kept as it is.

    Raises:
      No exception of its own: a ``NamedTuple`` of what :func:`fold_batch_norm` computed.

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
        >>> result = jaxbn.fold_batch_norm(model, variables, x)
        >>> result
        FoldResult(model=FoldedModel(...), folded={'BatchNorm1d_0': 'Dense_0'}, left={})
        >>> folded_model, folded_variables = result                      # unpacks as a pair
        >>> sorted(folded_variables)                                      # no batch_stats left
        ['params']
    """

    folded: dict[str, str]
    left: dict[str, str]

    def __new__(
        cls,
        model: nn.Module,
        variables: dict[str, Any],
        folded: Mapping[str, str] | None = None,
        left: Mapping[str, str] | None = None,
    ) -> FoldResult:
        self = super().__new__(cls, model, variables)
        self.folded = dict(folded or {})
        self.left = dict(left or {})
        return self

    def __repr__(self) -> str:
        return (
            f"FoldResult(model={type(self.model).__name__}(...), folded={self.folded!r}, "
            f"left={self.left!r})"
        )


class FoldedModel(WrappedModel):
    """``model`` with the batch norms named in ``folded`` replaced by the identity.

    What :func:`fold_batch_norm` returns for any Flax model (unless every batch norm was folded
    and the model has a ``norm="none"`` switch that reproduces it): the same module code and
    variable names, the folded batch norms skipped (their scale and shift live in the Conv/Dense
    weights), the others run as before. A Conv/Dense layer built with ``use_bias=False`` that a
    batch norm was folded into gets a ``bias`` in its variables; the layers named in ``biased``
    add it to their output (what the layer would compute with ``use_bias=True``). Any method of
    ``model`` runs folded: ``folded_model.apply(v, x, train=False, method="encode")``.

    Attributes:
      model: the original model.
      folded: ``/``-joined paths (relative to ``model``) of the batch norms to skip.
      biased: ``/``-joined paths of the ``use_bias=False`` layers that add the ``bias`` found in
        their ``params``.
      frozen: the batch norms that compute frozen batch norm, as :class:`FrozenModel`'s
        (None: every one left); ``()`` (default) none. Set when a ``freeze_batch_norm`` result
        is folded, or a folded model frozen.
      into: the Conv/Dense path each of ``folded`` was folded into, in the same order (for
        the report of a later fold; changes nothing that runs).

    Raises:
      TypeError: a wrapped model given as ``model`` (``FoldedModel of a FrozenModel: two
        wrappers would both claim the scope name 'model'; use jaxbn.freeze_batch_norm /
        jaxbn.fold_batch_norm on it, which return one wrapper``).
      ValueError: a call that passes a ``mask`` to a folded batch norm (``the batch norm at
        BatchNorm1d_0 was folded by fold_batch_norm, whose sample call passed it no mask; a
        masked call needs the batch norm: fold with a sample call that passes the mask, and
        it is kept``).

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
        >>> folded_model, folded_variables = jaxbn.fold_batch_norm(model, variables, x)
        >>> type(folded_model).__name__, folded_model.folded, folded_model.into
        ('FoldedModel', ('BatchNorm1d_0',), ('Dense_0',))
        >>> y = folded_model.apply(folded_variables, x)                   # [N, 3], no batch norm
        >>> bool(jnp.allclose(y, model.apply(variables, x), atol=1e-5))
        True
    """

    folded: tuple[str, ...] = ()
    biased: tuple[str, ...] = ()
    frozen: tuple[str, ...] | None = ()
    into: tuple[str, ...] = ()

    def interceptor(self, base: Path) -> Callable:
        return _Rewriter(base, self.folded, self.biased, self.frozen)


@dataclasses.dataclass
class _NormCall:
    """One traced ``__call__`` of a batch norm (fold's trace)."""

    path: Path  # relative to the traced model
    kind: str | None  # one of layers.KINDS; None for flax.linen.BatchNorm
    eps: float
    last: bool  # its feature axis is its input's last axis
    masked: bool
    tag: str  # the name of its input's tag in the jaxpr


class _Trace:
    """What fold's trace records: the Conv/Dense calls and batch norm calls, in call order, and
    the tags (``checkpoint_name``) it puts on their outputs and inputs."""

    def __init__(self) -> None:
        self.producers: list[Path] = []  # Conv/Dense call index → path
        self.norms: list[_NormCall] = []

    def norm(self, module, path, kind, next_fun, args, kwargs) -> Any:
        index = len(self.norms)
        tag = f"{_MARK}in{index}"
        x = args[0] if args else kwargs.get("x")
        last = False
        if isinstance(x, jax.Array):
            x = checkpoint_name(x, tag)
            last = getattr(module, "axis", -1) % x.ndim == x.ndim - 1
            args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})
        eps = getattr(module, "eps", getattr(module, "epsilon", 1e-5))
        masked = kwargs.get("mask") is not None
        self.norms.append(_NormCall(path, kind, eps, last, masked, tag))
        # an untracked one's eval would take the sample's statistics: see _as_identity
        out = _identity(module, x) if kind == UNTRACKED else next_fun(*args, **kwargs)
        if isinstance(out, jax.Array):  # a batch norm folded away may feed the next one
            out = checkpoint_name(out, f"{_MARK}bn{index}")
        return out

    def producer(self, path: Path, out: Any) -> Any:
        if isinstance(out, jax.Array):
            out = checkpoint_name(out, f"{_MARK}out{len(self.producers)}")
            self.producers.append(path)
        return out


def _effective_kind(module: nn.Module, frozen: bool) -> str | None:
    """The layer's kind as fold sees it: :func:`kind_of`, with ``track_running_stats=False``
    untracked whatever the class (a GhostBatchNorm's too) and a frozen selection frozen."""
    kind = kind_of(module)
    if kind is None or kind == FROZEN:
        return kind
    if not getattr(module, "track_running_stats", True):
        return UNTRACKED
    return FROZEN if frozen else kind


def _identity(module: nn.Module, x: Any) -> Any:
    """A skipped batch norm's output: its input, in the module's output dtype."""
    dtype = getattr(module, "dtype", None)
    return x if dtype is None else jnp.asarray(x).astype(dtype)


class _Rewriter:
    """The ``nn.intercept_methods`` function of a :class:`FoldedModel` (skip the folded batch
    norms, add the new biases, freeze the frozen selection), and of fold's trace (the same, and
    every Conv/Dense output and batch norm input tagged).

    A subclass's ``super().__call__`` runs the same module's ``__call__`` again inside the
    first: a batch norm is handled at its outermost call, a Conv/Dense at its innermost (the
    ``nn.Conv``/``nn.Dense`` computation whose output a bias or a fold concerns).
    """

    def __init__(self, base, folded, biased, frozen, trace: _Trace | None = None) -> None:
        self.base = base
        self.folded = {tuple(path.split("/")) for path in folded}
        self.biased = {tuple(path.split("/")) for path in biased}
        self.frozen = frozen
        self.trace = trace
        self.active: list[list] = []  # [path, re-entered] per Conv/Dense/norm call in progress

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        is_norm = kind_of(module) is not None or isinstance(module, nn.BatchNorm)
        if not (is_norm or isinstance(module, nn.Conv | nn.Dense)):
            return next_fun(*args, **kwargs)
        path = module_path(module)
        outer = [frame for frame in self.active if frame[0] == path]
        if is_norm and outer:  # a batch norm subclass's super().__call__
            return next_fun(*args, **kwargs)
        for frame in outer:
            frame[1] = True
        frame = [path, False]
        self.active.append(frame)
        try:
            if is_norm:
                return self._norm(module, relative_path(path, self.base), next_fun, args, kwargs)
            out = next_fun(*args, **kwargs)
        finally:
            self.active.pop()
        if frame[1]:  # not the innermost call of this Conv/Dense
            return out
        relative = relative_path(path, self.base)
        if relative in self.biased:
            # nn.Conv/nn.Dense add their bias last, in the output's (promoted) dtype
            out = out + jnp.asarray(module.get_variable("params", "bias")).astype(out.dtype)
        return out if self.trace is None else self.trace.producer(relative, out)

    def _norm(self, module, relative, next_fun, args, kwargs):
        if relative in self.folded:
            if kwargs.get("mask") is not None:
                raise ValueError(
                    f"the batch norm at {'/'.join(relative)} was folded by fold_batch_norm, "
                    "whose sample call passed it no mask; a masked call needs the batch norm: "
                    "fold with a sample call that passes the mask, and it is kept"
                )
            return _identity(module, args[0] if args else kwargs["x"])
        frozen = freezes(module, relative, self.frozen)
        if self.trace is not None:
            kind = None if kind_of(module) is None else _effective_kind(module, frozen)
            if frozen and kind == UNTRACKED:  # the wrapped model cannot run: say why
                return frozen_call(module, "/".join(relative), args, kwargs)
            return self.trace.norm(module, relative, kind, next_fun, args, kwargs)
        if frozen:
            return frozen_call(module, "/".join(relative), args, kwargs)
        return next_fun(*args, **kwargs)


def _as_identity(next_fun, args, kwargs, context):
    """Untracked batch norms as the identity, for fold's comparison of the folded and the
    original model: their eval takes the input's own statistics (a sample of one example would
    raise "Expected more than 1 value per channel"), and folding leaves them as they are."""
    module = context.module
    if context.method_name == "__call__" and _effective_kind(module, False) == UNTRACKED:
        return _identity(module, args[0] if args else kwargs["x"])
    return next_fun(*args, **kwargs)


@dataclasses.dataclass
class _Plan:
    folded: dict[Path, tuple[Path, float]]  # batch norm path → (producer path, eps), call order
    left: dict[Path, str]  # batch norm path → why it stays
    biased: list[Path]  # use_bias=False producers that get a bias


@dataclasses.dataclass
class _Call:
    """A model call to fold: the model unwrapped, and what its wrapper already changed."""

    model: nn.Module  # never a WrappedModel
    folded: tuple[str, ...]
    biased: tuple[str, ...]
    frozen: tuple[str, ...] | None
    into: tuple[str, ...]  # the producer of each of `folded`
    args: tuple
    kwargs: dict[str, Any]
    method: str | Callable | None

    @classmethod
    def of(cls, model, args, method, kwargs) -> _Call:
        folded: tuple[str, ...] = ()
        biased: tuple[str, ...] = ()
        into: tuple[str, ...] = ()
        frozen: tuple[str, ...] | None = ()
        if isinstance(model, WrappedModel):
            frozen = model.frozen
            folded = getattr(model, "folded", ())
            biased = getattr(model, "biased", ())
            into = getattr(model, "into", ())
            model = model.model
        if not args and not kwargs:
            raise TypeError("fold_batch_norm needs a sample input: fold_batch_norm(model, v, x)")
        flags = eval_kwargs(model, method)  # none for a submodule's name: the caller's to pass
        return cls(model, folded, biased, frozen, into, tuple(args), {**flags, **kwargs}, method)

    def wrapped(self, folded: dict[str, str], biased: tuple[str, ...]) -> nn.Module:
        """The model with these folds (``{batch norm: producer}``), as one wrapper."""
        if not folded and not biased:
            return self.model if self.frozen == () else FrozenModel(self.model, self.frozen)
        return FoldedModel(
            self.model, tuple(folded), biased, self.frozen, into=tuple(folded.values())
        )

    def run(self, model: nn.Module, variables: Mapping[str, Any]) -> Any:
        """``model.apply(variables, ...)`` in eval, untracked batch norms as the identity;
        compiled as one program (op by op, a ResNet compiles each convolution on its own)."""

        def apply(v, *args):
            with nn.intercept_methods(_as_identity):
                return model.apply(v, *args, method=self.method, **self.kwargs)

        if _all_arrays(self.args):
            return jax.jit(apply)(variables, *self.args)
        return jax.jit(lambda v: apply(v, *self.args))(variables)


def fold_batch_norm_variables(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    method: str | Callable | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Variables with every batch norm folded into its producer and removed.

    Run them with a copy of the model that has no batch norm layers and the same names for
    everything else (for the jaxbn models: ``norm="none"``). :func:`fold_batch_norm` does that,
    keeps the batch norms that cannot be folded, and checks the outputs.

    Args:
      model: a Flax model using jaxbn batch norms.
      variables: its variables, with tracked statistics.
      *args: the sample call's positional inputs, as for :func:`fold_batch_norm`.
      method: the method to trace (default ``__call__``).
      **kwargs: more keyword arguments of the sample call.

    A layer built with ``use_bias=False`` gets a ``bias``: the copy of the model must build it
    with ``use_bias=True``.

    Returns:
      The variables of the model without batch norms: ``params`` with each batch norm folded
      into its producer's ``kernel``/``bias``, and no ``batch_stats`` left for them.

    Raises:
      ValueError: a batch norm whose statistics were never tracked, or one that cannot be folded
        (the message says why, as :func:`fold_batch_norm`'s ``.left``).

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)
        >>> x = jax.random.normal(jax.random.key(0), (16, 5))
        >>> variables = model.init(jax.random.key(1), x, train=False)
        >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> folded = jaxbn.fold_batch_norm_variables(model, {**variables, **updates}, x[:1])
        >>> sorted(folded["params"])                  # run them with model.clone(norm="none")
        ['layers_0', 'layers_3', 'layers_6']
    """
    variables = unboxed(variables)  # nn.with_partitioning boxes: the values are folded
    call = _Call.of(model, args, method, kwargs)
    plan = _plan(call, variables)
    for path, reason in plan.left.items():
        raise ValueError(f"cannot fold the batch norm at {'/'.join(path)}: {reason}")
    return _folded_variables(variables, plan.folded)


def fold_batch_norm(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    method: str | Callable | None = None,
    **kwargs: Any,
) -> FoldResult:
    """The model with every foldable batch norm folded into the Conv/Dense layer feeding it.

    Works on any Flax linen model: a batch norm is folded when its eval is an affine map with
    stored statistics (``BatchNorm``, ``FrozenBatchNorm``, ``GhostBatchNorm``, ``BatchRenorm``,
    ``jaxbn.flax_compat.BatchNorm``, or any of them frozen by :func:`freeze_batch_norm`), it is
    the only consumer of a Conv/Dense output (or of a batch norm folded that way) and that layer
    runs once per call (found by tracing the sample call in eval mode); a layer with
    ``use_bias=False`` gets a bias. The others stay as they are, and ``.left`` says why: a layer
    whose output also feeds a skip connection (``bn(h) + h``) or a second batch norm, a layer
    called twice with the same weights, a batch norm after an activation, a concatenation or an
    addition, one called with ``mask=``, one with stacked statistics (under ``nn.scan`` or
    ``nn.vmap``), one inside ``nn.scan``/``jax.lax`` control flow, or an untracked one
    (``track_running_stats=False``: its eval uses the batch's statistics). Every batch norm ends
    in ``.folded`` or ``.left``. The folded model is ``model.clone(norm="none")`` when every
    batch norm was folded and the model has a ``norm`` field (the jaxbn models) whose
    ``"none"`` reproduces the outputs; otherwise a :class:`FoldedModel`, which runs ``model``
    with the folded batch norms skipped (and the biases added). Either is checked against the
    original on the sample call before it is returned (untracked batch norms, unchanged by
    folding, count as the identity in that check, so one example is enough).

    A :class:`FrozenModel` (a ``freeze_batch_norm`` result) or a :class:`FoldedModel` folds too:
    its frozen batch norms fold (constants: no counter needed), the rest stay frozen, and the
    result is one :class:`FoldedModel`.

    Args:
      model: a Flax linen model using jaxbn batch norms; no ``norm`` field or other change is
        needed.
      variables: its variables, with tracked statistics.
      *args: the sample call's positional inputs (``x``; one example is enough); the folded
        model is checked against the original on them.
      method: the method to trace and check, as in ``model.apply`` (default ``__call__``).
      **kwargs: more keyword arguments of the sample call (e.g. ``mask=``). The eval flag is
        added from the method's signature (``train``/``training``/``is_training`` = False,
        ``use_running_average``/``deterministic`` = True; none for ``nn.Sequential`` or a model
        without a flag, whose batch norms carry the mode); pass it here to override.

    Returns:
      A :class:`FoldResult`: unpacks as ``(folded_model, folded_variables)``; ``.folded`` and
      ``.left`` say which batch norms were folded and why the others were kept. The folded
      model is called as the original: ``folded_model.apply(folded_variables, x, train=False)``.

    Raises:
      ValueError: statistics that were never tracked (of a layer that would be folded; a frozen
        one's are constants and need no counter), or folded outputs that differ from the
        original's on the sample beyond rounding (the message names the largest difference).

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)     # Dense → BatchNorm → relu
        >>> x = jax.random.normal(jax.random.key(0), (16, 5))            # [N, features]
        >>> variables = model.init(jax.random.key(1), x, train=False)
        >>> _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> variables = {**variables, **updates}                         # one training step
        >>> result = jaxbn.fold_batch_norm(model, variables, x[:1])
        >>> folded_model, folded_vars = result
        >>> result.folded, result.left                 # {bn path: the layer it went into}
        ({'layers_1': 'layers_0', 'layers_4': 'layers_3'}, {})
        >>> type(folded_model).__name__, folded_model.norm      # the model without norms
        ('MLP', 'none')
    """
    variables = unboxed(variables)  # nn.with_partitioning boxes: the values are folded
    call = _Call.of(model, args, method, kwargs)
    plan = _plan(call, variables)
    folded_variables = _folded_variables(variables, plan.folded)
    expected = call.run(model, variables)
    # the folds of a FoldedModel given here stay, and are reported with this call's
    into = (*call.into, *["(an earlier fold)"] * (len(call.folded) - len(call.into)))
    earlier = dict(zip(call.folded, into, strict=False))
    folded = {
        **earlier,
        **{"/".join(bn): "/".join(producer) for bn, (producer, _) in plan.folded.items()},
    }
    biased = (*call.biased, *("/".join(path) for path in plan.biased))
    candidates: list[nn.Module] = []
    if not plan.left and hasattr(call.model, "norm"):
        candidates.append(call.model.clone(norm="none"))
    candidates.append(call.wrapped(folded, tuple(dict.fromkeys(biased))))
    mismatch = None
    for candidate in candidates:
        if isinstance(candidate, WrappedModel) or candidate is call.model:
            got = call.run(candidate, folded_variables)
        else:
            try:  # a model whose norm="none" is not "the same network without batch norm"
                got = call.run(candidate, folded_variables)
            except Exception:  # the FoldedModel below is the fallback
                continue
        mismatch = _output_mismatch(got, expected)
        if mismatch is None:
            return FoldResult(
                candidate,
                folded_variables,
                folded,
                {"/".join(bn): reason for bn, reason in plan.left.items()},
            )
    raise ValueError(
        f"folding changed the model's eval outputs on the sample input: {mismatch}; "
        "not returning a model that computes something else"
    )


def _plan(call: _Call, variables: Mapping[str, Any]) -> _Plan:
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(variables)):
        raise TypeError(
            "fold_batch_norm needs concrete variables (it runs the folded model to check it); "
            "call it outside jax.jit, jax.grad or any other transformation"
        )
    try:
        traced = _trace(call, variables)
    except Exception as error:
        leading = {stacked_shape(stats)[:1] for stats, _ in stored_layers(variables).values()}
        if len(leading) == 1 and (replicas := leading.pop()):
            raise ValueError(
                f"the sample call failed ({type(error).__name__}), and every batch norm's "
                f"statistics have a leading axis of {replicas[0]}, as pmap-replicated variables "
                "do; fold one replica: jax.tree.map(lambda a: a[0], variables)"
            ) from error
        raise
    trace, uses, tagged = traced.calls, traced.uses, traced
    stats_tree = variables.get("batch_stats", {})
    params = variables.get("params", {})

    # Reasons that belong to a layer, whichever of its calls: decided before the calls.
    by_path: dict[Path, list[int]] = defaultdict(list)
    for index, norm in enumerate(trace.norms):
        by_path[norm.path].append(index)
    layer_reason: dict[Path, str] = {}
    for path, indices in by_path.items():
        norm = trace.norms[indices[0]]
        stats = _lookup(stats_tree, path)
        real = [i for i in indices if traced.ran(trace.norms[i])]
        if norm.kind is None:
            layer_reason[path] = (
                "flax.linen.BatchNorm is not a jaxbn batch norm; use jaxbn.flax_compat.BatchNorm "
                "(jaxbn.from_flax_batch_norm converts its statistics) to fold it"
            )
        elif norm.kind == UNTRACKED:
            layer_reason[path] = (
                "it is untracked (track_running_stats=False): its eval normalizes with the "
                "batch's own statistics, which no Conv/Dense weights can hold"
            )
        elif stats is None or "mean" not in stats or "var" not in stats:
            layer_reason[path] = "it has no running statistics in variables['batch_stats']"
        elif shape := stacked_shape(stats):
            layer_reason[path] = (
                f"its statistics are stacked {[*shape, stats['mean'].shape[-1]]} (one member per "
                "step or mapped index, as under nn.scan or nn.vmap); folding keeps them"
            )
        elif any(trace.norms[i].masked for i in indices):
            layer_reason[path] = (
                "it is called with mask=, and its masked elements output 0, which folded "
                "Conv/Dense weights cannot reproduce"
            )
        elif any(trace.norms[i].tag in traced.nested for i in indices):
            layer_reason[path] = (
                "it runs inside a loop or branch (nn.scan, nn.while_loop, nn.cond, jax.lax "
                "control flow) that folding does not look into"
            )
        elif len(real) > 1:
            layer_reason[path] = f"it is called {len(real)} times"

    producer_calls = Counter(trace.producers)
    plan = _Plan({}, {}, [])
    chained: dict[Any, str] = {}  # output of a folded batch norm → its path
    for index, norm in enumerate(trace.norms):
        path = norm.path
        if path in plan.left or path in plan.folded:
            continue
        if path in layer_reason:
            plan.left[path] = layer_reason[path]
            continue
        source = tagged.out.get(tagged.inputs.get(index))
        producer = None if source is None else trace.producers[source]
        name = "/".join(producer or ())
        why = None
        if producer is None:
            why = "its input does not come straight from a Conv or Dense layer"
        elif not norm.last:
            why = "its feature axis is not the producer's output axis (last)"
        elif producer_calls[producer] > 1:
            why = (
                f"{name} is called {producer_calls[producer]} times with the same weights; "
                "folding would change its other calls"
            )
        elif others := [use for use in uses[tagged.inputs[index]] if use != norm.tag]:
            others = [_use_name(trace, use) for use in others]
            folded_before = chained.get(tagged.inputs[index])
            what = name if folded_before is None else f"the batch norm at {folded_before}"
            why = (
                f"the output of {what} is also used elsewhere ({', '.join(others)}), "
                "e.g. a skip connection; folding would change that use"
            )
        elif any(
            traced.weight_uses.get(("params", *producer, leaf), 1) != 1
            for leaf in ("kernel", "bias")
        ):
            why = f"the weights of {name} are also read outside it"
        else:
            stats = _lookup(stats_tree, path)
            layer = get_path(params, producer)
            channels = stats["mean"].shape
            bn_params = _lookup(params, path) or {}
            if not (
                layer["kernel"].shape[-1:] == channels
                and ("bias" not in layer or layer["bias"].shape == channels)
                and all(
                    getattr(p, "shape", None) == channels
                    for k, p in bn_params.items()
                    if k in ("scale", "bias")
                )
            ):
                why = (
                    f"the weights of {name} do not have one output channel per batch norm "
                    "channel on their last axis"
                )
        if why is not None:
            plan.left[path] = why
            continue
        counter = stats.get("num_batches_tracked")
        if norm.kind != FROZEN and counter is not None and np.any(np.asarray(counter) == 0):
            raise ValueError(
                f"cannot fold the batch norm at {'/'.join(path)}: its statistics were never "
                "tracked (num_batches_tracked == 0); train it or run jaxbn.update_bn first"
            )
        plan.folded[path] = (producer, norm.eps)
        if "bias" not in layer and producer not in plan.biased:
            plan.biased.append(producer)
        if index in tagged.outputs:  # conv → bn → bn: the second folds into the same layer
            tagged.out[tagged.outputs[index]] = source
            chained[tagged.outputs[index]] = "/".join(path)

    # Every batch norm with running statistics ends in .folded or .left.
    for path in stored_layers(variables):
        if path not in plan.folded and path not in plan.left and path not in by_path:
            plan.left[path] = (
                "the sample call did not run it (another method, or a branch not taken); "
                "kept as it is"
            )
    return plan


def _use_name(trace: _Trace, use: str) -> str:
    """An operation that reads a value, in words (a tagged batch norm input by its path)."""
    if use.startswith(f"{_MARK}in"):
        return (
            f"the batch norm at {'/'.join(trace.norms[int(use.removeprefix(f'{_MARK}in'))].path)}"
        )
    return use


def _lookup(tree: Mapping[str, Any], path: Path) -> Any:
    try:
        found = get_path(tree, path)
    except (KeyError, TypeError):
        return None
    return found if isinstance(found, Mapping) else None


_MARK = "jaxbn.fold_batch_norm:"  # prefix of the checkpoint names that tag values in the trace


@dataclasses.dataclass
class _Traced:
    """What :func:`_trace` finds in the jaxpr."""

    calls: _Trace
    uses: dict[Any, list[str]]  # value → what uses it (the model's outputs count as a use)
    out: dict[Any, int]  # value → the Conv/Dense call that produced it
    inputs: dict[int, Any]  # batch norm call → its input value
    outputs: dict[int, Any]  # batch norm call → its output value
    nested: set[str]  # tags found inside loops and branches (not looked into)
    weight_uses: dict[Path, int]  # ("params", *path, leaf) → how many operations read it

    def ran(self, norm: _NormCall) -> bool:
        """Whether this traced call is in the jaxpr (a lifted transform may trace its body
        once more to find shapes; that trace is not the model's computation)."""
        index = int(norm.tag.removeprefix(f"{_MARK}in"))
        return index in self.inputs or norm.tag in self.nested


#: Primitives that call a sub-jaxpr once with their own inputs and outputs (jax.jit, nn.jit,
#: nn.remat / jax.checkpoint): folding looks into them as if they were inlined.
_INLINED = {"jit", "pjit", "remat", "remat2", "checkpoint", "closed_call", "core_call"}


def _trace(call: _Call, variables: Mapping[str, Any]) -> _Traced:
    """One eval-mode call of the model traced to a jaxpr, with every Conv/Dense output and every
    batch norm input and output tagged by a named identity (``checkpoint_name``); calls of
    ``jax.jit``/``nn.jit``/``nn.remat`` are looked into as if inlined."""
    trace = _Trace()
    plain = flax.core.unfreeze(variables)
    array_args = _all_arrays(call.args)

    def apply(v, *args):
        rewriter = _Rewriter((), call.folded, call.biased, call.frozen, trace)
        with nn.intercept_methods(rewriter):
            return call.model.apply(v, *args, method=call.method, **call.kwargs)

    if array_args:
        closed = jax.make_jaxpr(apply)(plain, *call.args)
    else:  # Python values among the inputs stay Python values
        closed = jax.make_jaxpr(lambda v: apply(v, *call.args))(plain)
    jaxpr = closed.jaxpr

    uses: dict[Any, list[str]] = defaultdict(list)
    traced = _Traced(trace, uses, {}, {}, {}, set(), {})
    nested = traced.nested
    alias: dict[Any, Any] = {}
    resolve = lambda var: var if isinstance(var, jax_core.Literal) else alias.get(var, var)

    def walk(eqns) -> None:
        for eqn in eqns:
            sub = _single_sub_jaxpr(eqn) if eqn.primitive.name in _INLINED else None
            if sub is not None:
                for inner, outer in zip(sub.invars, eqn.invars, strict=True):
                    alias[inner] = resolve(outer)
                walk(sub.eqns)
                for outer, inner in zip(eqn.outvars, sub.outvars, strict=True):
                    alias[outer] = resolve(inner)
                continue
            name = str(eqn.params.get("name", "")) if eqn.primitive.name == "name" else ""
            for var in map(resolve, eqn.invars):
                if not isinstance(var, jax_core.Literal):
                    uses[var].append(name or eqn.primitive.name)
            if name.startswith(f"{_MARK}out"):
                traced.out[eqn.outvars[0]] = int(name.removeprefix(f"{_MARK}out"))
            elif name.startswith(f"{_MARK}in"):
                traced.inputs[int(name.removeprefix(f"{_MARK}in"))] = resolve(eqn.invars[0])
            elif name.startswith(f"{_MARK}bn"):
                traced.outputs[int(name.removeprefix(f"{_MARK}bn"))] = eqn.outvars[0]
            for inner in _sub_jaxprs(eqn):
                nested.update(
                    str(e.params.get("name", ""))
                    for e in _all_eqns(inner)
                    if e.primitive.name == "name"
                )

    walk(jaxpr.eqns)
    for var in map(resolve, jaxpr.outvars):
        if not isinstance(var, jax_core.Literal):
            uses[var].append("the model's output")
    leaves, _ = jax.tree_util.tree_flatten_with_path((plain, call.args if array_args else ()))
    traced.weight_uses = {
        tuple(getattr(key, "key", None) for key in keys[1:]): len(uses[var])
        for (keys, _), var in zip(leaves, jaxpr.invars, strict=True)
        if keys[0] == jax.tree_util.SequenceKey(0)  # a variable, not a leaf of the inputs
    }
    return traced


def _all_arrays(args: tuple) -> bool:
    """Whether every leaf of the sample's positional inputs is an array (so they can be traced;
    Python values stay Python values)."""
    return all(isinstance(leaf, jax.Array | np.ndarray) for leaf in jax.tree.leaves(args))


def _single_sub_jaxpr(eqn: Any) -> Any:
    """The one jaxpr an inlinable call runs, when it maps inputs and outputs one to one."""
    subs = [
        value.jaxpr if isinstance(value, jax_core.ClosedJaxpr) else value
        for value in eqn.params.values()
        if isinstance(value, jax_core.ClosedJaxpr | jax_core.Jaxpr)
    ]
    if len(subs) != 1:
        return None
    sub = subs[0]
    if len(sub.invars) != len(eqn.invars) or len(sub.outvars) != len(eqn.outvars):
        return None
    return sub


def _sub_jaxprs(eqn: Any) -> Iterator[Any]:
    """The jaxprs nested in one equation's parameters."""
    stack = list(eqn.params.values())
    while stack:
        value = stack.pop()
        if isinstance(value, jax_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax_core.Jaxpr):
            yield value
        elif isinstance(value, tuple | list):
            stack.extend(value)


def _all_eqns(jaxpr: Any) -> Iterator[Any]:
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _sub_jaxprs(eqn):
            yield from _all_eqns(sub)


def _folded_variables(
    variables: Mapping[str, Any], folded: Mapping[Path, tuple[Path, float]]
) -> dict[str, Any]:
    """A copy of ``variables`` with each batch norm in ``folded`` folded into its producer and
    removed (``batch_stats`` is dropped when no batch norm is left in it)."""
    layers = {path: (stats, params) for path, stats, params in batch_norm_layers(variables)}
    result = {name: flax.core.unfreeze(tree) for name, tree in variables.items()}
    params = result["params"]
    for bn_path, (producer, eps) in folded.items():
        stats, bn_params = layers[bn_path]
        layer = get_path(params, producer)
        kernel, bias = fuse_conv_bn_weights(
            layer["kernel"],
            layer.get("bias"),
            stats["mean"],
            stats["var"],
            eps,
            bn_params.get("scale"),
            bn_params.get("bias"),
        )
        set_path(params, (*producer, "kernel"), kernel)
        set_path(params, (*producer, "bias"), bias)
        _remove(params, bn_path)
        _remove(result["batch_stats"], bn_path)
    if not result.get("batch_stats", True):
        del result["batch_stats"]
    return result


# Folding reorders the arithmetic; a few hundred units of rounding are expected, not more.
_RTOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _output_mismatch(got: Any, expected: Any) -> str | None:
    """None when ``got`` equals ``expected`` up to rounding, else the largest difference.

    Per output array: |got − expected| ≤ rtol · max(1, max |expected|), rtol by dtype
    (float32: 1e-4, float64: 1e-10); other dtypes must match exactly.
    """
    got_leaves, got_tree = jax.tree.flatten(got)
    expected_leaves, _ = jax.tree_util.tree_flatten_with_path(expected)
    if got_tree != jax.tree.structure(expected):
        return f"the outputs have a different structure ({got_tree} vs the original's)"
    worst: tuple[float, str] | None = None
    for (keys, e), g in zip(expected_leaves, got_leaves, strict=True):
        e, g = np.asarray(e), np.asarray(g)
        where = f"output{jax.tree_util.keystr(keys)}"
        if e.shape != g.shape or e.dtype != g.dtype:
            return f"{where} is {g.dtype}{list(g.shape)}, was {e.dtype}{list(e.shape)}"
        e64, g64 = e.astype(np.float64), g.astype(np.float64)
        diff = np.where(np.isnan(e64) & np.isnan(g64), 0.0, np.abs(g64 - e64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        if not diff.size:
            continue
        rtol = _RTOL.get(e.dtype.name, 0.0)
        finite = np.abs(e64[np.isfinite(e64)])
        tol = rtol * max(1.0, float(finite.max()) if finite.size else 1.0)
        at = np.unravel_index(int(np.argmax(diff)), diff.shape)
        if diff[at] > tol and (worst is None or diff[at] / max(tol, 1e-300) > worst[0]):
            worst = (
                diff[at] / max(tol, 1e-300),
                f"max |folded − original| = {diff[at]:.3g} at {where}[{', '.join(map(str, at))}] "
                f"(original {e64[at]:.7g}, folded {g64[at]:.7g}; tolerance {tol:.2g} "
                f"for {e.dtype.name})",
            )
    return None if worst is None else worst[1]


def _remove(tree: dict, path: Path) -> None:
    """Deletes the subtree at ``path`` if present, and parents left empty."""
    parent = get_path(tree, path[:-1]) if len(path) > 1 else tree
    if path[-1] not in parent:
        return
    del parent[path[-1]]
    if len(path) > 1 and not parent:
        _remove(tree, path[:-1])
