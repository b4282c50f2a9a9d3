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

Example:
    >>> folded_model, folded_vars = jaxbn.fold_batch_norm(model, variables, x[:1])
    >>> folded_model.apply(folded_vars, x, train=False)        # == model.apply(..., train=False)
    >>> jaxbn.fold_batch_norm(model, variables, x[:1]).left    # {bn path: why it was kept}
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import flax.core
import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxbn.linen.batch_norm import BatchNorm
from jaxbn.tools._tree import Path, batch_norm_layers, get_path, set_path

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
    """Conv kernel [*window, I, O] and bias [O] with a following batch norm folded in.

    Args:
      kernel: [*window, C_in, C_out] (Flax ``nn.Conv`` layout).
      bias: [C_out] or None (zeros).
      mean, var: the batch norm's running statistics [C_out].
      eps: the batch norm's eps.
      scale, bn_bias: the batch norm's affine parameters [C_out], or None (ones / zeros).

    Returns:
      ``(kernel', bias')`` in the dtypes of ``kernel`` and ``bias`` (or ``kernel``).
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
      model: the folded model, run as ``model.apply(variables, x, train=False)``.
      variables: its variables.
      folded: ``{batch norm path: Conv/Dense path}`` for each batch norm folded away
        (paths ``/``-joined, as in the variables tree).
      left: ``{batch norm path: why}`` for each batch norm that was kept as it is.
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


class FoldedModel(nn.Module):
    """``model`` with the batch norms named in ``folded`` replaced by the identity.

    What :func:`fold_batch_norm` returns for any Flax model (unless every batch norm was folded
    and the model has a ``norm="none"`` switch that reproduces it): the same module code and
    variable names, the folded batch norms skipped (their scale and shift live in the Conv/Dense
    weights), the others run as before. A Conv/Dense layer built with ``use_bias=False`` that a
    batch norm was folded into gets a ``bias`` in its variables; the layers named in ``biased``
    add it to their output (what the layer would compute with ``use_bias=True``).

    Attributes:
      model: the original model.
      folded: ``/``-joined paths (relative to ``model``) of the batch norms to skip.
      biased: ``/``-joined paths of the ``use_bias=False`` layers that add the ``bias`` found in
        their ``params``.
    """

    model: nn.Module
    folded: tuple[str, ...] = ()
    biased: tuple[str, ...] = ()

    def setup(self) -> None:
        nn.share_scope(self, self.model)  # the model's variable names, not nested under "model"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        base = tuple(self.scope.path)
        skipped = {tuple(path.split("/")) for path in self.folded}
        biased = {tuple(path.split("/")) for path in self.biased}

        def skip_folded(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = tuple(module.scope.path)
            relative = path[len(base) :] if path[: len(base)] == base else None
            if isinstance(module, BatchNorm) and relative in skipped:
                x = args[0] if args else kwargs["x"]
                return x if module.dtype is None else jnp.asarray(x).astype(module.dtype)
            out = next_fun(*args, **kwargs)
            if relative in biased:
                # nn.Conv/nn.Dense add their bias last, in the output's (promoted) dtype
                bias = module.get_variable("params", "bias")
                out = out + jnp.asarray(bias).astype(out.dtype)
            return out

        with nn.intercept_methods(skip_folded):
            return self.model(*args, **kwargs)


@dataclasses.dataclass
class _Plan:
    folded: dict[Path, tuple[Path, float]]  # batch norm path → (producer path, eps), call order
    left: dict[Path, str]  # batch norm path → why it stays
    biased: list[Path]  # use_bias=False producers that get a bias


def fold_batch_norm_variables(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> dict[str, Any]:
    """Variables with every batch norm folded into its producer and removed.

    Run them with a copy of the model that has no batch norm layers and the same names for
    everything else (for the jaxbn models: ``norm="none"``). :func:`fold_batch_norm` does that,
    keeps the batch norms that cannot be folded, and checks the outputs.

    Args:
      model: a Flax model using jaxbn batch norms, called as ``model.apply(v, x, train=...)``.
      variables: its variables, with tracked statistics.
      x: an example input (only shapes matter; one example is enough).

    A layer built with ``use_bias=False`` gets a ``bias``: the copy of the model must build it
    with ``use_bias=True``.

    Raises:
      ValueError: a batch norm whose statistics were never tracked, or one that cannot be folded:
        its input does not come straight from a Conv/Dense layer, that layer's output is also
        used elsewhere (a skip connection), the layer runs more than once (shared weights), or
        the batch norm has no running statistics.
    """
    plan = _plan(model, variables, x)
    for path, reason in plan.left.items():
        raise ValueError(f"cannot fold the batch norm at {'/'.join(path)}: {reason}")
    return _folded_variables(variables, plan.folded)


def fold_batch_norm(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> FoldResult:
    """The model with every foldable batch norm folded into the Conv/Dense layer feeding it.

    Works on any Flax linen model: a batch norm is folded when it is the only consumer of a
    Conv/Dense output (or of a batch norm folded that way) and that layer runs once per call
    (found by tracing ``model.apply(variables, x, train=False)``); a layer with
    ``use_bias=False`` gets a bias. The others stay as they are, in eval mode with their
    statistics: a layer whose output also feeds a skip connection (``bn(h) + h``) or a second
    batch norm, a layer called twice with the same weights, a batch norm after an activation, a
    concatenation or an addition, or without running statistics. The folded model is
    ``model.clone(norm="none")`` when every batch norm was folded and the model has a ``norm``
    field (the jaxbn models) whose ``"none"`` reproduces the outputs; otherwise a
    :class:`FoldedModel`, which runs ``model`` with the folded batch norms skipped (and the
    biases added). Either is checked against the original on ``x`` before it is returned.

    Args:
      model: a Flax linen model using jaxbn batch norms, called as
        ``model.apply(v, x, train=...)``; no ``norm`` field or other change is needed.
      variables: its variables, with tracked statistics.
      x: an example input; the folded model is checked against the original on it.

    Returns:
      A :class:`FoldResult`: unpacks as ``(folded_model, folded_variables)``; ``.folded`` and
      ``.left`` say which batch norms were folded and why the others were kept.

    Raises:
      ValueError: statistics that were never tracked, or folded outputs that differ from the
        original's on ``x`` beyond rounding (the message names the largest difference).

    Example:
        >>> result = jaxbn.fold_batch_norm(model, variables, x[:1])
        >>> folded_model, folded_vars = result
        >>> result.folded, result.left           # {"bn1": "conv1", ...}, {"bn2": "why", ...}
    """
    plan = _plan(model, variables, x)
    folded_variables = _folded_variables(variables, plan.folded)
    expected = model.apply(variables, x, train=False)
    candidates: list[nn.Module] = []
    if not plan.left and hasattr(model, "norm"):
        candidates.append(model.clone(norm="none"))
    candidates.append(
        FoldedModel(
            model,
            tuple("/".join(path) for path in plan.folded),
            tuple("/".join(path) for path in plan.biased),
        )
    )
    mismatch = None
    for candidate in candidates:
        if isinstance(candidate, FoldedModel):
            got = candidate.apply(folded_variables, x, train=False)
        else:
            try:  # a model whose norm="none" is not "the same network without batch norm"
                got = candidate.apply(folded_variables, x, train=False)
            except Exception:  # the FoldedModel below is the fallback
                continue
        mismatch = _output_mismatch(got, expected)
        if mismatch is None:
            return FoldResult(
                candidate,
                folded_variables,
                {"/".join(bn): "/".join(producer) for bn, (producer, _) in plan.folded.items()},
                {"/".join(bn): reason for bn, reason in plan.left.items()},
            )
    raise ValueError(
        f"folding changed the model's eval outputs on the sample input: {mismatch}; "
        "not returning a model that computes something else"
    )


def _plan(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> _Plan:
    layers = {path: (stats, params) for path, stats, params in batch_norm_layers(variables)}
    for path, (stats, _) in layers.items():
        if int(stats["num_batches_tracked"]) == 0:
            raise ValueError(
                f"cannot fold the batch norm at {'/'.join(path)}: its statistics were never "
                "tracked (num_batches_tracked == 0); train it or run jaxbn.update_bn first"
            )
    params = variables.get("params", {})
    plan = _Plan({}, {}, [])
    for bn_path, (producer, eps_or_why) in _find_producers(model, variables, x).items():
        if producer is None:
            plan.left[bn_path] = eps_or_why
            continue
        stats, bn_params = layers.get(bn_path, (None, None))
        layer = get_path(params, producer)
        channels = None if stats is None else stats["mean"].shape
        if stats is None:
            plan.left[bn_path] = "it has no running statistics (track_running_stats=False)"
        elif not (
            layer["kernel"].shape[-1:] == channels
            and ("bias" not in layer or layer["bias"].shape == channels)
            and all(p.shape == channels for p in bn_params.values())
        ):
            plan.left[bn_path] = (
                f"the weights of {'/'.join(producer)} do not have one output channel per "
                "batch norm channel on their last axis"
            )
        else:
            plan.folded[bn_path] = (producer, eps_or_why)
            if "bias" not in layer and producer not in plan.biased:
                plan.biased.append(producer)
    return plan


_MARK = "jaxbn.fold_batch_norm:"  # prefix of the checkpoint names that tag values in the trace


def _find_producers(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array
) -> dict[Path, tuple[Path, float] | tuple[None, str]]:
    """Batch norm path → (the Conv/Dense path it alone consumes, eps), or (None, why not).

    One eval-mode call is traced to a jaxpr, with every Conv/Dense output and every batch norm
    input and output tagged by a named identity (``checkpoint_name``). A batch norm input that
    is a Conv/Dense output used by nothing else (no other operation, not the model's output),
    from a layer called once whose kernel and bias are read by nothing else, can be folded; so
    can a batch norm fed in the same way by a batch norm that is folded (conv → bn → bn, as
    ``torch.fx.experimental.optimization.fuse`` does).
    """
    producers: list[Path] = []  # Conv/Dense call index → path
    norms: list[tuple[Path, float, bool]] = []  # batch norm call → (path, eps, feature axis last)

    def tag(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(module.scope.path)
        if isinstance(module, BatchNorm):
            name = f"{_MARK}in{len(norms)}"
            if args and isinstance(args[0], jax.Array):
                args = (checkpoint_name(args[0], name), *args[1:])
                last = module.axis % args[0].ndim == args[0].ndim - 1
            elif isinstance(kwargs.get("x"), jax.Array):
                kwargs = {**kwargs, "x": checkpoint_name(kwargs["x"], name)}
                last = module.axis % kwargs["x"].ndim == kwargs["x"].ndim - 1
            else:
                last = False
            norms.append((path, module.eps, last))
            out = next_fun(*args, **kwargs)
            if isinstance(out, jax.Array):  # a batch norm folded away may feed the next one
                out = checkpoint_name(out, f"{_MARK}bn{len(norms) - 1}")
            return out
        out = next_fun(*args, **kwargs)
        if isinstance(module, nn.Conv | nn.Dense) and isinstance(out, jax.Array):
            out = checkpoint_name(out, f"{_MARK}out{len(producers)}")
            producers.append(path)
        return out

    plain = flax.core.unfreeze(variables)
    with nn.intercept_methods(tag):
        closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(plain, x)
    jaxpr = closed.jaxpr

    # Every use of every value at the top level; the model's outputs count as a use.
    uses: dict[Any, list[str]] = defaultdict(list)
    tagged_out: dict[Any, int] = {}  # value → Conv/Dense call that produced it
    tagged_in: dict[int, Any] = {}  # batch norm call → its input value
    tagged_bn: dict[int, Any] = {}  # batch norm call → its output value
    for eqn in jaxpr.eqns:
        name = str(eqn.params.get("name", "")) if eqn.primitive.name == "name" else ""
        for var in eqn.invars:
            if not isinstance(var, jax_core.Literal):
                uses[var].append(name or eqn.primitive.name)
        if name.startswith(f"{_MARK}out"):
            tagged_out[eqn.outvars[0]] = int(name.removeprefix(f"{_MARK}out"))
        elif name.startswith(f"{_MARK}in"):
            tagged_in[int(name.removeprefix(f"{_MARK}in"))] = eqn.invars[0]
        elif name.startswith(f"{_MARK}bn"):
            tagged_bn[int(name.removeprefix(f"{_MARK}bn"))] = eqn.outvars[0]
    for var in jaxpr.outvars:
        if not isinstance(var, jax_core.Literal):
            uses[var].append("the model's output")
    nested = {
        str(eqn.params.get("name", ""))
        for sub in _sub_jaxprs(jaxpr)
        for eqn in _all_eqns(sub)
        if eqn.primitive.name == "name"
    }
    leaves, _ = jax.tree_util.tree_flatten_with_path((plain, x))
    weight_uses = {
        tuple(getattr(key, "key", None) for key in keys[1:]): len(uses[var])
        for (keys, _), var in zip(leaves, jaxpr.invars, strict=True)
        if keys[0] == jax.tree_util.SequenceKey(0)  # a variable, not a leaf of x
    }

    producer_calls = Counter(producers)
    norm_calls = Counter(path for path, _, _ in norms)
    found: dict[Path, tuple[Path, float] | tuple[None, str]] = {}
    chained: dict[Any, str] = {}  # output of a folded batch norm → its path
    for index, (path, eps, last) in enumerate(norms):
        source = tagged_out.get(tagged_in.get(index))
        producer = None if source is None else producers[source]
        name = "/".join(producer or ())
        if norm_calls[path] > 1:
            why = f"it is called {norm_calls[path]} times"
        elif f"{_MARK}in{index}" in nested:
            why = (
                "it runs inside a transformation (jax.jit, nn.remat, nn.scan, ...) that "
                "folding does not look into"
            )
        elif producer is None:
            why = "its input does not come straight from a Conv or Dense layer"
        elif not last:
            why = "its feature axis is not the producer's output axis (last)"
        elif producer_calls[producer] > 1:
            why = (
                f"{name} is called {producer_calls[producer]} times with the same weights; "
                "folding would change its other calls"
            )
        elif others := [use for use in uses[tagged_in[index]] if use != f"{_MARK}in{index}"]:
            others = [
                f"the batch norm at {'/'.join(norms[int(use.removeprefix(f'{_MARK}in'))][0])}"
                if use.startswith(f"{_MARK}in")
                else use
                for use in others
            ]
            folded_before = chained.get(tagged_in[index])
            what = name if folded_before is None else f"the batch norm at {folded_before}"
            why = (
                f"the output of {what} is also used elsewhere ({', '.join(others)}), "
                "e.g. a skip connection; folding would change that use"
            )
        elif any(
            weight_uses.get(("params", *producer, leaf), 1) != 1 for leaf in ("kernel", "bias")
        ):
            why = f"the weights of {name} are also read outside it"
        else:
            found[path] = (producer, eps)
            if index in tagged_bn:  # conv → bn → bn: the second folds into the same layer
                tagged_out[tagged_bn[index]] = source
                chained[tagged_bn[index]] = "/".join(path)
            continue
        found[path] = (None, why)
    return found


def _sub_jaxprs(jaxpr: Any) -> Iterator[Any]:
    """The jaxprs nested in ``jaxpr``'s equations (one level)."""
    for eqn in jaxpr.eqns:
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
    yield from jaxpr.eqns
    for sub in _sub_jaxprs(jaxpr):
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
