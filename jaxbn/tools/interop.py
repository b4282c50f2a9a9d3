"""Lossless weight conversion between a PyTorch ``state_dict`` and jaxbn/Flax variables, and a
check that a port computes what the PyTorch model computes.

Names: a Flax module path maps to a PyTorch module path by turning the trailing ``_<digits>`` of
each segment into ``.<digits>`` (``layer1_0/conv1`` ↔ ``layer1.0.conv1``, ``features_0`` ↔
``features.0``, and a Flax list of lists ``features_0_1`` ↔ ``features.0.1``) — the jaxbn
models are named that way. Where a model is named otherwise, pass ``rename``: Flax module path
(or a parent's path) → PyTorch module path, e.g. ``{"layers_3": "layers.2"}`` or, for a torch
name that really ends in ``_<digits>``, ``{"Mixed_5b/branch5x5_1": "Mixed_5b.branch5x5_1"}``;
or a function of the Flax path (``lambda path: path.replace("/", ".")`` when the Flax names
are PyTorch's names). Leaves:

===============================  ==================================  =============================
Flax (channels-last)             PyTorch                             conversion
===============================  ==================================  =============================
conv ``kernel`` ``[*k, I, O]``   ``weight`` ``[O, I, *k]``           transpose
dense ``kernel`` ``[I, O]``      ``weight`` ``[O, I]``               transpose (+ flatten permute)
``bias``                         ``bias``                            as is
norm ``scale``                   ``weight``                          as is (see ``norm_layouts``)
``batch_stats/mean``, ``var``    ``running_mean``, ``running_var``   as is
``num_batches_tracked``          ``num_batches_tracked``             int32 ↔ int64, value kept
===============================  ==================================  =============================

A state_dict without ``num_batches_tracked`` (torch < 0.4.1; torchvision's
``FrozenBatchNorm2d`` buffers) loads as torch's ``load_state_dict(strict=True)`` loads it: the
receiving model keeps its own counter. Statistics with extra leading axes (``nn.scan``
members, pmap replicas) are refused: one torch module holds one member.

A dense layer fed by a flattened conv feature map needs its input rows permuted, because
PyTorch flattens (C, H, W) and channels-last code flattens (H, W, C); pass the (C, H, W) shape
per such layer in ``flatten_shapes`` (``ConvNet.torch_flatten_shapes`` gives it). A state_dict
does not say which layers follow a flatten, so a forgotten entry cannot be seen from the
weights alone: :func:`verify_port` (or :func:`torch_module_to_flax`, which calls it) runs both
models and names the first layer that differs. A norm weight with more than one dim (PyTorch
``nn.LayerNorm([C, H, W])`` on NCHW images is ``[H, W, C]`` on NHWC) is moved only when
``norm_layouts`` says so or when only one layout fits the template's shape. Everything is a
transpose or reshape of the same numbers, so torch → jaxbn → torch is bit-identical.

The template that names the variables needs no weights: ``jax.eval_shape(model.init, key, x,
train=False)`` builds it without computing anything (under a second where an unjitted init of
MobileNetV2 takes 18 s on 2 cores) and :func:`torch_to_flax` accepts its ``ShapeDtypeStruct``
leaves.

Example:
    >>> import torch, jaxbn
    >>> class Net(torch.nn.Module):                              # the PyTorch model
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = torch.nn.Sequential(
    ...             torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
    ...             torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
    ...             torch.nn.Linear(4, 3))
    ...     def forward(self, x):
    ...         return self.layers(x)
    >>> model = jaxbn.models.MLP(hidden=(8, 4), num_classes=3)  # layers_0, layers_1, ...
    >>> variables = jaxbn.interop.torch_module_to_flax(
    ...     Net(), model, torch.randn(16, 5))                   # raises if any layer differs
    >>> sorted(variables["batch_stats"])
    ['layers_1', 'layers_4']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.tools._tree import Path, module_leaves, set_path
from jaxbn.tools.layers import eval_kwargs

__all__ = [
    "flax_to_torch",
    "torch_module_path",
    "torch_module_to_flax",
    "torch_to_flax",
    "verify_port",
]

FlattenShapes = Mapping[str, tuple[int, int, int]]
#: Flax module path (``"a/b_0"``) or a parent's path → PyTorch module path (``"a.b.0"``); or a
#: function of the Flax module path returning the PyTorch path (None: the default rule).
Rename = Mapping[str, str] | Callable[[str], str | None]
#: ``"channels_first"``: PyTorch's norm weight is [C, *rest] and Flax's [*rest, C] (a layer on
#: image data, NCHW in PyTorch and NHWC in Flax); ``"same"``: both are laid out alike.
NormLayout = Literal["channels_first", "same"]
NormLayouts = Mapping[str, NormLayout] | NormLayout
#: ``"channels_first"``: the PyTorch input is [N, C, *spatial] and Flax gets [N, *spatial, C];
#: ``"same"``: both get the same array (e.g. sequences [N, L, D]).
InputLayout = Literal["channels_first", "same"]

_LAYOUTS = ("channels_first", "same")

# (collection, flax leaf) -> torch leaf
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}

_LEAF_ORDER = {"kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3, "num_batches_tracked": 4}


def torch_module_path(path: Path) -> str:
    """The default rule: every trailing ``_<digits>`` of a segment is a ``.<digits>`` index.

    ``("layer1_0", "conv1")`` → ``"layer1.0.conv1"``; ``("features_0_1",)`` →
    ``"features.0.1"`` (Flax names a list of lists ``features_0_1``, PyTorch a Sequential of
    Sequentials ``features.0.1``). Torch names that really end in ``_<digits>`` (Inception's
    ``Mixed_5b.branch5x5_1``) need ``rename``.
    """
    return ".".join(_TRAILING_INDICES.sub(_dotted, part) for part in path)


_TRAILING_INDICES = re.compile(r"(?:_\d+)+$")


def _dotted(match: re.Match) -> str:
    return match.group(0).replace("_", ".")


def torch_to_flax(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    flatten_shapes: FlattenShapes | None = None,
    rename: Rename | None = None,
    norm_layouts: NormLayouts | None = None,
) -> dict[str, Any]:
    """Variables shaped like ``variables`` (e.g. from ``model.init``) holding the torch weights.

    Args:
      state_dict: ``torch_module.state_dict()`` (tensors, bfloat16 included, or numpy arrays);
        a bare layer's (``torch.nn.BatchNorm2d(8).state_dict()``) when ``variables`` is one
        layer's.
      variables: a template tree (``params``/``batch_stats``) giving names, shapes, dtypes:
        arrays, or the ``jax.ShapeDtypeStruct`` leaves of
        ``jax.eval_shape(model.init, key, x, train=False)``, which costs no computation.
      flatten_shapes: Flax dense layer path (``"classifier_0"``) → torch (C, H, W) it flattens.
        A forgotten entry cannot be seen in the weights: :func:`torch_module_to_flax` finds it.
      rename: Flax module path (or a parent's) → torch module path where the default rule
        (``name_<digits>`` ↔ ``name.<digits>``) does not hold, or a function of the Flax path
        returning the torch path (None: the default rule). A parent's entry renames the
        parent only: the segments below it follow the default rule.
      norm_layouts: for norm weights with more than one dim: Flax module path →
        ``"channels_first"`` (torch [C, H, W] → Flax [H, W, C]) or ``"same"``; one string for
        all. Without an entry the template's shape decides when only one layout fits it.

    Raises:
      KeyError: naming how many keys are missing and unexpected, a few of each, and how to
        pass ``rename``.
      ValueError: naming the key whose shape, layout or value does not fit, a ``flatten_shapes``
        or ``rename`` key that matches no layer, or two layers given one torch name.
      TypeError: naming the key whose tensor cannot be converted.

    ``num_batches_tracked``: torch's int64 becomes jaxbn's int32 counter with its value (one
    above 2**31 - 1 is refused, also under ``jax_enable_x64``). Where the state_dict has none,
    it is loaded as torch's ``load_state_dict(strict=True)`` loads it: a BatchNorm saved before
    the counter existed (torch < 0.4.1), or buffers without one (torchvision's
    ``FrozenBatchNorm2d``: weight, bias, running_mean, running_var), keep the template's
    counter (0 for a ``jax.eval_shape`` template); it is read only by ``momentum=None``
    training, and a ``FrozenBatchNorm`` never reads it. A state_dict whose ``_metadata`` marks
    the BatchNorm as saved with a counter (torch >= 0.4.1) and lacks it is refused, as torch
    refuses it. The statistics are PyTorch's (unbiased running variance) and load as they are.
    """
    leaves = list(_template_leaves(variables))
    _refuse_stacked(leaves, to_torch=False)
    keys = _torch_keys(leaves, rename)
    _check_flatten_keys(flatten_shapes, leaves)
    flatten_shapes = flatten_shapes or {}
    # torch's own record of each module's class version (``state_dict()._metadata``): a
    # BatchNorm saved by torch >= 0.4.1 is version 2 and always has its counter
    metadata = getattr(state_dict, "_metadata", None)
    arrays = dict(state_dict)
    given = set(arrays)
    out: dict[str, Any] = {}
    missing = []
    for (collection, path, leaf, template), key in zip(leaves, keys, strict=True):
        statistics = key[: -len("num_batches_tracked")] + "running_mean"
        if key not in arrays and leaf == "num_batches_tracked" and statistics in given:
            _refuse_removed_counter(key, metadata)
            # As torch's _BatchNorm._load_from_state_dict does for a checkpoint saved before
            # the counter existed (torch < 0.4.1), or buffers without one (torchvision's
            # FrozenBatchNorm2d): keep the receiving model's own counter (0 for a new one;
            # torch uses 0 too when the module has no values, on the meta device).
            value = 0 if isinstance(template, jax.ShapeDtypeStruct) else np.asarray(template)
            set_path(out.setdefault(collection, {}), (*path, leaf), _counter(key, value))
            continue
        if key not in arrays:
            missing.append(key)
            continue
        raw = _to_numpy(key, arrays.pop(key))
        value = _from_torch(key, raw, template, path, leaf, flatten_shapes, norm_layouts)
        if value.shape != template.shape:
            raise ValueError(
                f"{key}: torch shape {tuple(raw.shape)} does not fit "
                f"{collection}/{'/'.join((*path, leaf))} of shape {tuple(template.shape)}"
            )
        if leaf == "num_batches_tracked":
            converted = _counter(key, value)
        else:
            converted = jnp.asarray(value, template.dtype)
        set_path(out.setdefault(collection, {}), (*path, leaf), converted)
    if not missing and arrays and all(k.endswith("num_batches_tracked") for k in arrays):
        raise KeyError(
            f"the model keeps no num_batches_tracked, the state_dict has "
            f"{_few(sorted(arrays))}: its batch norms are not jaxbn's (flax.linen.BatchNorm "
            f"keeps mean and var only). Use jaxbn.BatchNorm to keep torch's counters, or leave "
            f"them out of the state_dict (with the same eps, eval gives torch's outputs; Flax's "
            f"training then averages biased variances)"
        )
    if missing or arrays:
        raise KeyError(_mismatch_message(sorted(missing), sorted(arrays), leaves, keys))
    return out


def flax_to_torch(
    variables: Mapping[str, Any],
    *,
    flatten_shapes: FlattenShapes | None = None,
    rename: Rename | None = None,
    norm_layouts: NormLayouts | None = None,
) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` (of numpy arrays) from jaxbn variables.

    Load it with ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
    The arguments mean what they mean for :func:`torch_to_flax`; here ``norm_layouts`` is
    needed for every norm weight with more than one dim (there is no torch shape to decide).
    bfloat16 arrays come back as float32 (numpy's torch bridge has no bfloat16); loading them
    into a bfloat16 model gives the same numbers.
    """
    leaves = list(_template_leaves(variables))
    _refuse_stacked(leaves, to_torch=True)
    keys = _torch_keys(leaves, rename)
    _check_flatten_keys(flatten_shapes, leaves)
    flatten_shapes = flatten_shapes or {}
    for (collection, path, leaf, value), key in zip(leaves, keys, strict=True):
        if isinstance(value, jax.ShapeDtypeStruct):
            raise TypeError(
                f"{key}: {collection}/{'/'.join((*path, leaf))} is a shape without values "
                "(a jax.eval_shape template): convert variables that hold weights"
            )
    out = {}
    for (_, path, leaf, value), key in zip(leaves, keys, strict=True):
        array = np.asarray(value)
        if array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)
        # a writable C-contiguous copy: torch.from_numpy accepts it without a warning
        array = _to_torch(key, array, path, leaf, flatten_shapes, norm_layouts)
        out[key] = np.array(array, order="C")
    return out


def verify_port(
    torch_module: Any,
    model: Any,
    variables: Mapping[str, Any],
    sample_input: Any,
    *,
    input_layout: InputLayout | None = None,
    rename: Rename | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    method: str | Callable | None = None,
) -> float:
    """Runs both models on ``sample_input`` and raises, naming the first layer that differs.

    PyTorch runs in eval mode under ``no_grad`` (its mode is restored after); Flax runs
    ``model.apply(variables, x, method=method, **apply_kwargs)``, by default in eval mode as
    its signature names it (:func:`jaxbn.tools.layers.eval_kwargs`: ``train=False``,
    ``training=False``, ``use_running_average=True``, ``deterministic=True``, or nothing for
    an ``nn.Sequential``). Every PyTorch leaf module's output is recorded in call order and
    compared with the output of the Flax module of the same name (``rename`` as in
    :func:`torch_to_flax`); activations of rank ≥ 3 are compared channels-last when
    ``input_layout="channels_first"``; an ``nn.Sequential`` checked against a
    ``torch.nn.Sequential`` maps ``layers_<i>`` to ``<i>`` unless ``rename`` is given. A port in
    which no PyTorch layer matched a Flax module by name is refused: agreeing final outputs
    alone do not verify it layer by layer.

    The tolerance, unless ``atol``/``rtol`` are given, scales with the precision and the
    depth (this module's private ``_tolerance``): a correct float32 ResNet-50 passes, a
    float64 port is held to float64's rounding, and a wrong weight, layout or ``eps`` still
    shows. To measure PyTorch's own rounding at each layer it also runs a float64 copy of a
    lower-precision torch model (memory: one more copy of the model and its activations).

    Args:
      torch_module: the PyTorch model (``torch.nn.Module``).
      model: the Flax module; ``variables``: its variables (e.g. from :func:`torch_to_flax`).
      sample_input: a PyTorch-layout batch (tensor or numpy array), e.g. [N, C, H, W].
      input_layout: how the Flax model gets ``sample_input``: ``"channels_first"`` moves the
        channel axis last ([N, C, H, W] → [N, H, W, C]); ``"same"`` passes it as is. Required
        when the input has more than two dims.
      atol, rtol: a fixed tolerance instead: an output agrees where
        ``|flax - torch| <= atol + rtol * |torch|`` (one given: the other is 0).
      apply_kwargs: the keyword arguments of the Flax call (default: its eval flag).
      method: the Flax method to call (default ``__call__``).

    Returns:
      The largest absolute difference of the final outputs.

    Raises:
      ValueError: naming the first layer (PyTorch and Flax names) whose output differs, its
        largest difference and tolerance and, where one is likely, the cause (a missing
        ``flatten_shapes`` entry, a norm layout); no layer matched by name; or the final
        output's difference when all matched layers agree.
    """
    import torch  # only this function needs it; torch is not a dependency of jaxbn

    apply_kwargs = eval_kwargs(model, method) if apply_kwargs is None else dict(apply_kwargs)
    rename = _sequential_rename(torch_module, model) if rename is None else rename
    fixed = None if atol is None and rtol is None else (atol or 0.0, rtol or 0.0)
    x_torch = sample_input if torch.is_tensor(sample_input) else torch.as_tensor(sample_input)
    x_flax = _flax_input(_to_numpy("sample_input", x_torch), input_layout)
    layout = input_layout or "same"

    records, torch_out = _torch_activations(torch_module, x_torch)
    # The same model in float64 gives the rounding noise PyTorch's own float32 forward has at
    # each layer (None where torch already runs in float64, or the model cannot be cast).
    reference = None if fixed else _float64_activations(torch_module, x_torch, records)

    flax_out, state = model.apply(
        variables,
        x_flax,
        method=method,
        capture_intermediates=True,
        mutable=["intermediates"],
        **apply_kwargs,
    )
    namer = _namer(rename, [path for _, path, _, _ in _template_leaves(variables)])
    flax_outputs: dict[str, tuple[Path, tuple]] = {}
    for path, leaves in module_leaves(state.get("intermediates", {})):
        if path and "__call__" in leaves:
            flax_outputs[namer(path)] = (path, tuple(leaves["__call__"]))

    calls: dict[str, int] = {}
    last_agreeing, matched = None, 0
    for depth, (name, torch_value) in enumerate(records, start=1):
        index = calls[name] = calls.get(name, -1) + 1
        if name not in flax_outputs or index >= len(flax_outputs[name][1]):
            continue
        matched += 1
        path, outputs = flax_outputs[name]
        flax_value = np.asarray(outputs[index], np.float64)
        where = f"layer {name!r} (Flax {'/'.join(path)!r})"
        exact = None if reference is None else reference[depth - 1]
        diff, agree, tol = _difference(
            where, torch_value, flax_value, layout, fixed, exact, depth, outputs[index]
        )
        if not agree:
            before = (
                f" (the layers before it agree, the last being {last_agreeing!r}: the cause is "
                f"this layer or the code between them)"
                if last_agreeing
                else ""
            )
            hint = _hint(name, path, variables, records, torch_value)
            raise ValueError(
                f"{where} differs from PyTorch by up to {diff:.3g} (tolerance {tol:.3g})"
                f"{before}{hint}"
            )
        last_agreeing = name
    if records and not matched:
        torch_names = list(dict.fromkeys(name for name, _ in records))
        raise ValueError(
            f"no PyTorch layer matched a Flax module by name, so the port is not verified "
            f"layer by layer (final outputs alone can agree by chance): PyTorch's "
            f"{len(torch_names)} layers are e.g. {_few(torch_names, 3)}, the Flax modules "
            f"e.g. {_few(['/'.join(p) for p, _ in flax_outputs.values()], 3)} (as torch names "
            f"{_few(list(flax_outputs), 3)}); pass rename={{'<Flax path>': '<torch module>'}} "
            f"or rename=lambda flax_path: torch_module_path"
        )

    torch_leaves = list(torch_out) if isinstance(torch_out, list | tuple) else [torch_out]
    flax_leaves = list(flax_out) if isinstance(flax_out, list | tuple) else [flax_out]
    if len(torch_leaves) != len(flax_leaves):
        raise ValueError(
            f"PyTorch returns {len(torch_leaves)} outputs, the Flax model {len(flax_leaves)}"
        )
    exact_outs = None if reference is None else reference[len(records) :]
    largest = 0.0
    for i, (t, f) in enumerate(zip(torch_leaves, flax_leaves, strict=True)):
        where = "the output" if len(torch_leaves) == 1 else f"output {i}"
        t = _activation(where, t)
        exact = None if exact_outs is None else exact_outs[i]
        diff, agree, tol = _difference(
            where, t, np.asarray(f, np.float64), layout, fixed, exact, len(records) + 1, f
        )
        if not agree:
            raise ValueError(
                f"{where} differs from PyTorch by up to {diff:.3g} (tolerance {tol:.3g}) "
                f"although every layer matched by name agrees: the difference is in code "
                f"between layers (after the last matching layer {last_agreeing!r}), or in "
                f"the input layout (input_layout={input_layout!r})"
            )
        largest = max(largest, diff)
    return largest


def torch_module_to_flax(
    torch_module: Any,
    model: Any,
    sample_input: Any,
    *,
    input_layout: InputLayout | None = None,
    flatten_shapes: FlattenShapes | None = None,
    rename: Rename | None = None,
    norm_layouts: NormLayouts | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    method: str | Callable | None = None,
) -> dict[str, Any]:
    """Ports ``torch_module``'s weights to ``model`` and checks the port: the safe recipe.

    Builds the template with ``jax.eval_shape(model.init, ...)`` on ``sample_input`` (laid out
    by ``input_layout``, called with ``method`` and ``apply_kwargs`` — default: the model's
    eval flag, :func:`jaxbn.tools.layers.eval_kwargs`; no weights are computed), converts
    ``torch_module.state_dict()`` with :func:`torch_to_flax`, then runs :func:`verify_port`.
    Arguments are theirs (an ``nn.Sequential`` from a ``torch.nn.Sequential`` needs no
    ``rename``: ``layers_<i>`` is ``<i>``).

    Returns:
      The Flax variables (``params``/``batch_stats``), only if both models agree on
      ``sample_input`` layer by layer.

    Example:
        >>> import torch, jaxbn
        >>> net = torch.nn.Sequential(                            # 0 / 2 / 4
        ...     torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
        ...     torch.nn.ReLU(), torch.nn.Linear(16, 10))
        >>> model = jaxbn.models.MLP(hidden=(32, 16), norm="none")  # layers_0 / _3 / _6
        >>> variables = jaxbn.interop.torch_module_to_flax(
        ...     net, model, torch.randn(16, 64),
        ...     rename={"layers_0": "0", "layers_3": "2", "layers_6": "4"})
        >>> variables["params"]["layers_3"]["kernel"].shape       # torch's [16, 32], transposed
        (32, 16)
    """
    import torch

    apply_kwargs = eval_kwargs(model, method) if apply_kwargs is None else dict(apply_kwargs)
    rename = _sequential_rename(torch_module, model) if rename is None else rename
    x_torch = sample_input if torch.is_tensor(sample_input) else torch.as_tensor(sample_input)
    x_flax = _flax_input(_to_numpy("sample_input", x_torch), input_layout)
    template = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, method=method, **apply_kwargs),
        jnp.asarray(x_flax),
    )
    variables = torch_to_flax(
        torch_module.state_dict(),
        template,
        flatten_shapes=flatten_shapes,
        rename=rename,
        norm_layouts=norm_layouts,
    )
    verify_port(
        torch_module,
        model,
        variables,
        x_torch,
        input_layout=input_layout,
        rename=rename,
        atol=atol,
        rtol=rtol,
        apply_kwargs=apply_kwargs,
        method=method,
    )
    return variables


def _sequential_rename(torch_module: Any, model: Any) -> Rename | None:
    """For an ``nn.Sequential`` ported from a ``torch.nn.Sequential``: Flax names the i-th
    layer ``layers_<i>``, torch ``<i>``; the layers below follow the default rule."""
    import flax.linen as nn
    import torch

    if not (isinstance(model, nn.Sequential) and isinstance(torch_module, torch.nn.Sequential)):
        return None

    def by_index(path: str) -> str | None:
        head, _, rest = path.partition("/")
        index = re.fullmatch(r"layers_(\d+)", head)
        if index is None:
            return None
        below = torch_module_path(tuple(rest.split("/"))) if rest else ""
        return ".".join(part for part in (index.group(1), below) if part)

    return by_index


# --- names -------------------------------------------------------------------------------------


def _template_leaves(variables: Mapping[str, Any]):
    """``(collection, module path, leaf, value)``; a module's leaves in PyTorch's order (weight,
    bias, ...), whatever order the tree has (JAX sorts keys: ``jax.eval_shape`` templates)."""
    for collection in ("params", "batch_stats"):
        for path, leaves in module_leaves(variables.get(collection, {})):
            for leaf, value in sorted(leaves.items(), key=lambda item: _LEAF_ORDER.get(item[0], 0)):
                if (collection, leaf) not in _LEAF_NAMES:
                    raise ValueError(f"no PyTorch counterpart for {collection}/{path}/{leaf}")
                yield collection, path, leaf, value


def _namer(rename: Rename | None, module_paths: list[Path]) -> Callable[[Path], str]:
    """Flax module path → torch module path, checking a mapping's keys against the model."""
    if rename is None:
        return torch_module_path
    if callable(rename):

        def by_function(path: Path) -> str:
            name = rename("/".join(path))
            return torch_module_path(path) if name is None else name

        return by_function
    prefixes = {path[:i] for path in module_paths for i in range(1, len(path) + 1)}
    table = {tuple(key.split("/")): value for key, value in rename.items()}
    unknown = sorted("/".join(key) for key in table if key not in prefixes)
    if unknown:
        modules = sorted({"/".join(path) for path in module_paths})
        raise ValueError(f"rename keys {unknown} match no Flax module; the modules are {modules}")

    def by_table(path: Path) -> str:
        for i in range(len(path), 0, -1):  # the longest renamed prefix wins
            if path[:i] in table:
                return ".".join(p for p in (table[path[:i]], torch_module_path(path[i:])) if p)
        return torch_module_path(path)

    return by_table


def _torch_keys(leaves, rename: Rename | None) -> list[str]:
    namer = _namer(rename, [path for _, path, _, _ in leaves])
    keys, owner = [], {}
    for collection, path, leaf, _ in leaves:
        module, torch_leaf = namer(path), _LEAF_NAMES[(collection, leaf)]
        key = f"{module}.{torch_leaf}" if module else torch_leaf  # a bare layer has no module
        flax_name = f"{collection}/{'/'.join((*path, leaf))}"
        if key in owner:
            raise ValueError(f"{owner[key]} and {flax_name} both map to the torch key {key!r}")
        owner[key] = flax_name
        keys.append(key)
    return keys


def _few(names: list[str], shown: int = 5) -> str:
    """``['a', 'b', ...]`` with at most ``shown`` names and how many more there are."""
    head = ", ".join(repr(n) for n in names[:shown])
    return f"[{head}, … {len(names) - shown} more]" if len(names) > shown else f"[{head}]"


def _mismatch_message(missing: list[str], unexpected: list[str], leaves, keys) -> str:
    """Which keys did not match, a few of each (a whole model's list runs to tens of thousands
    of characters), and, when whole layers went unmatched, how to name them."""
    message = (
        f"state_dict does not match the model: {len(missing)} missing keys {_few(missing)}, "
        f"{len(unexpected)} unexpected keys {_few(unexpected)}"
    )
    owner = {key: path for (_, path, _, _), key in zip(leaves, keys, strict=True)}
    layers = list(dict.fromkeys(path for _, path, _, _ in leaves))
    absent = set(missing)
    found = {owner[key] for key in keys if key not in absent}
    unmatched = ["/".join(path) for path in layers if path not in found]
    if not unmatched:
        return message
    modules = list(dict.fromkeys(key.rpartition(".")[0] for key in unexpected))
    first = next(path for path in layers if path not in found)
    looked = next(key for key in keys if owner[key] == first).rpartition(".")[0]
    return (
        f"{message}. {len(unmatched)} of the model's {len(layers)} layers found no torch key, "
        f"e.g. {_few(unmatched, 3)} (Flax {'/'.join(first)!r} looked for "
        f"{looked or '(the root)'!r}); {len(modules)} torch modules were not "
        f"used, e.g. {_few(modules, 3)}. Flax paths map to torch names by turning each "
        f"trailing _<digits> into .<digits>; for names that do not follow it pass "
        f"rename={{'<Flax path>': '<torch module>'}} (a parent's path renames its children too) "
        f"or rename=lambda flax_path: torch_module_path"
    )


def _check_flatten_keys(flatten_shapes: FlattenShapes | None, leaves) -> None:
    dense = sorted(
        "/".join(path) for _, path, leaf, value in leaves if leaf == "kernel" and value.ndim == 2
    )
    unknown = sorted(set(flatten_shapes or {}) - set(dense))
    if unknown:
        raise ValueError(
            f"flatten_shapes keys {unknown} match no dense layer; the dense layers are {dense}"
        )


# --- leaves ------------------------------------------------------------------------------------


def _to_numpy(key: str, value: Any) -> np.ndarray:
    try:
        if hasattr(value, "detach"):  # a torch tensor; torch is not a dependency of the library
            value = value.detach().cpu()
            if value.is_floating_point() and value.dtype.itemsize < 4:
                value = value.float()  # bfloat16 has no numpy type; float32 holds it exactly
            value = value.numpy()
        # Copy: .numpy() shares the tensor's memory and jnp.asarray may alias it on CPU, so a
        # later in-place torch update (optimizer.step) would silently change the imported arrays.
        return np.array(value, copy=True)
    except (TypeError, RuntimeError, ValueError) as error:
        raise TypeError(f"{key}: cannot convert {type(value).__name__}: {error}") from error


#: jaxbn's ``num_batches_tracked`` is int32 always (also under ``jax_enable_x64``).
_COUNTER = np.dtype(np.int32)


def _counter(key: str, value: np.ndarray) -> jax.Array:
    """torch's int64 ``num_batches_tracked`` as jaxbn's int32 counter, with its value."""
    count = int(value)
    top = np.iinfo(_COUNTER).max
    if not 0 <= count <= top:
        raise ValueError(
            f"{key}: num_batches_tracked = {count} does not fit jaxbn's int32 counter "
            f"(0 to {top}, where jaxbn's counter stops); it is read only by momentum=None "
            f"(the cumulative average, factor 1/(count+1)): to load it, set it to {top} in "
            f"the state_dict, which changes that factor from 1/{count + 1} to 1/{top + 1}"
        )
    return jnp.asarray(count, _COUNTER)


def _refuse_removed_counter(key: str, metadata: Any) -> None:
    """torch refuses a missing counter where ``_metadata`` says the BatchNorm was saved with
    one (version 2, torch >= 0.4.1): it was removed after saving, not absent from the start."""
    module = key[: -len("num_batches_tracked")].rstrip(".")
    version = (metadata or {}).get(module, {}).get("version")
    if version is None or version < 2:
        return
    raise KeyError(
        f"{key} is missing, but the state_dict's _metadata marks {module or 'the layer'!r} as "
        f"a BatchNorm saved by torch >= 0.4.1, which always saves it: torch's "
        f"load_state_dict(strict=True) refuses it too. If the checkpoint really predates the "
        f"counter, pass dict(state_dict) (no _metadata): torch and jaxbn then load it as an "
        f"old checkpoint, with the model's counter (0 for a new model), read only by "
        f"momentum=None"
    )


def _refuse_stacked(leaves, *, to_torch: bool) -> None:
    """A layer whose statistics are stacked along leading axes (``nn.scan``/``nn.vmap``
    members, pmap replicas: its counter is not a scalar) is many torch modules, not one."""
    for collection, path, leaf, value in leaves:
        if collection == "batch_stats" and leaf == "num_batches_tracked" and np.ndim(value):
            fix = (
                "convert one member at a time (jax.tree.map(lambda a: a[i], variables)), or "
                "replica 0 of pmap state (flax.jax_utils.unreplicate)"
                if to_torch
                else "convert each member with a one-member template, then stack them "
                "(jax.tree.map(lambda *a: jnp.stack(a), *members))"
            )
            raise ValueError(
                f"{'/'.join(('batch_stats', *path))}: a stacked batch norm (counter of shape "
                f"{tuple(np.shape(value))}: the members of nn.scan/nn.vmap, or pmap replicas) "
                f"is one torch module per member, not one: {fix}"
            )


def _norm_layout(key: str, path: Path, norm_layouts: NormLayouts | None) -> str | None:
    layout = (
        norm_layouts if isinstance(norm_layouts, str) else (norm_layouts or {}).get("/".join(path))
    )
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"{key}: norm layout must be one of {_LAYOUTS}, got {layout!r}")
    return layout


def _norm_layout_error(key: str, path: Path, shape, reason: str) -> ValueError:
    module = "/".join(path)
    return ValueError(
        f"{key}: a {len(shape)}-D norm weight of shape {tuple(shape)}: {reason}; pass "
        f"norm_layouts={{{module!r}: 'channels_first'}} if the layer sees image data "
        f"(torch [C, ...] ↔ Flax [..., C]) or norm_layouts={{{module!r}: 'same'}}"
    )


def _from_torch(key, w: np.ndarray, template, path: Path, leaf: str, flatten, norm_layouts):
    if leaf == "kernel" and w.ndim == 2:
        module = "/".join(path)
        if module in flatten:
            c, h, wd = _flatten_shape(key, flatten, module, w.shape[1])
            return w.reshape(w.shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, -1)
        return w.T
    if leaf == "kernel":  # conv [O, I, *k] -> [*k, I, O]
        return w.transpose(*range(2, w.ndim), 1, 0)
    if leaf in ("scale", "bias") and w.ndim >= 2:
        layout = _norm_layout(key, path, norm_layouts)
        if layout is None:
            fits = [
                name
                for name, shape in (("same", w.shape), ("channels_first", _moved_shape(w.shape)))
                if tuple(shape) == tuple(template.shape)
            ]
            if not fits:
                return w  # the caller reports the shape mismatch
            if len(fits) == 2:
                raise _norm_layout_error(key, path, w.shape, "both layouts fit the model")
            layout = fits[0]
        return np.moveaxis(w, 0, -1) if layout == "channels_first" else w
    return w


def _flatten_shape(key: str, flatten, module: str, inputs: int) -> tuple[int, int, int]:
    """The (C, H, W) that ``flatten_shapes`` gives ``module``, checked against its inputs."""
    c, h, wd = flatten[module]
    if c * h * wd != inputs:
        raise ValueError(
            f"{key}: flatten_shapes[{module!r}] = {(c, h, wd)} holds {c * h * wd} "
            f"values, the layer takes {inputs}"
        )
    return c, h, wd


def _moved_shape(shape) -> tuple[int, ...]:
    return (*shape[1:], shape[0])


def _to_torch(key, k: np.ndarray, path: Path, leaf: str, flatten, norm_layouts) -> np.ndarray:
    if leaf == "kernel" and k.ndim == 2:
        module = "/".join(path)
        if module in flatten:
            c, h, wd = _flatten_shape(key, flatten, module, k.shape[0])
            return k.reshape(h, wd, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * wd)
        return k.T
    if leaf == "kernel":  # conv [*k, I, O] -> [O, I, *k]
        return k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))
    if leaf == "num_batches_tracked":
        return k.astype(np.int64)
    if leaf in ("scale", "bias") and k.ndim >= 2:
        layout = _norm_layout(key, path, norm_layouts)
        if layout is None:
            raise _norm_layout_error(key, path, k.shape, "its torch layout is not known")
        return np.moveaxis(k, -1, 0) if layout == "channels_first" else k
    return k


# --- verification ------------------------------------------------------------------------------


def _flax_input(x: np.ndarray, layout: InputLayout | None) -> np.ndarray:
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"input_layout must be one of {_LAYOUTS}, got {layout!r}")
    if layout is None and x.ndim > 2:
        raise ValueError(
            f"sample_input has {x.ndim} dims: pass input_layout='channels_first' (torch "
            f"[N, C, ...] → Flax [N, ..., C], images) or input_layout='same' (the same array, "
            f"e.g. sequences [N, L, D])"
        )
    return np.moveaxis(x, 1, -1) if layout == "channels_first" and x.ndim > 2 else x


def _aligned(where: str, t: np.ndarray, f: np.ndarray, layout: str):
    """The torch activation in the Flax layout: the declared one, else the only one that fits."""
    t = t.astype(np.float64)
    if t.ndim < 3:
        candidates = [t]
    else:
        moved = np.moveaxis(t, 1, -1)
        candidates = [moved, t] if layout == "channels_first" else [t, moved]
    for candidate in candidates:
        if candidate.shape == f.shape:
            return candidate, f
    raise ValueError(f"{where}: PyTorch output shape {t.shape}, Flax output shape {f.shape}")


#: How far above the expected rounding noise a correct port may be (see :func:`_tolerance`).
_ROUNDING_MARGIN = 16.0


def _rounding(torch_dtype: Any, flax_dtype: Any) -> float:
    """The unit roundoff the two computations carry: the coarser of the two dtypes and of the
    precision XLA's float32 convolutions and matmuls use by default on GPU (TF32) and TPU
    (one bfloat16 pass) unless ``jax_default_matmul_precision`` asks for full float32."""
    eps = [float(jnp.finfo(d).eps) for d in (torch_dtype, flax_dtype) if _inexact(d)]
    if not eps:
        return 0.0  # integer outputs (argmax, indices) must agree exactly
    rounding = max(eps)
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if rounding < 2**-10 and precision not in ("highest", "float32", "tensorfloat32"):
        backend = jax.default_backend()
        if backend in ("gpu", "cuda", "rocm"):
            rounding = 2.0**-10
        elif backend == "tpu":
            rounding = 2.0**-7
    return rounding


def _inexact(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _tolerance(t: np.ndarray, exact: np.ndarray | None, depth: int, rounding: float) -> float:
    """The largest difference a correct port may show at a layer ``depth`` layers deep.

    Why this rule: two correct implementations of a layer differ by rounding — the order of a
    sum, fused or not — which is ``rounding`` (float32: 1.2e-7) relative to the size of the
    numbers summed, of the order of the layer's largest output value, not of each element's
    (a fixed ``atol=1e-4, rtol=1e-4`` refused a correct float32 ResNet-50 at layer3: 1.9e-4
    where activations are large, while float64 agreed to 1.7e-13). Each layer adds its own
    rounding to the difference it received; independent roundings add like a random walk, so
    the difference grows as ``sqrt(depth)``. The margin (16) is 7.7× what was measured between
    PyTorch and Flax on a float32 ResNet-50 at 224×224 (at most 2.1·rounding·sqrt(depth)·max|t|).

    Where a layer amplifies the noise beyond its output's size (a batch norm whose tiny running
    variance divides a difference of close numbers), PyTorch's own float32 forward against
    the same model in float64 (``exact``) measures the noise at that layer, and a correct port
    is within the margin of it too.

    A porting bug (a transposed or flipped kernel, a wrong variance, another ``eps``, a missing
    flatten permutation) moves a layer by 1e-4 to 1 of its size at the first layer it touches,
    while the bound stays below ``16·rounding·sqrt(depth)`` (float32, 150 layers deep: 2.3e-5).
    """
    finite = np.abs(t[np.isfinite(t)])
    scale = float(np.max(finite, initial=0.0))
    bound = _ROUNDING_MARGIN * rounding * float(np.sqrt(depth)) * scale
    if exact is not None and exact.shape == t.shape:
        noise = np.abs(t - exact.astype(np.float64))
        noise = float(np.max(noise[np.isfinite(noise)], initial=0.0))
        bound = max(bound, _ROUNDING_MARGIN * noise)
    return bound


def _difference(where, t, f, layout, fixed, exact, depth, flax_raw) -> tuple[float, bool, float]:
    """The largest |difference| of two outputs, whether they agree, and the tolerance.

    ``fixed``: the caller's ``(atol, rtol)``; else :func:`_tolerance` with the precision of
    ``t`` (torch's dtype, recorded before conversion) and of the Flax output ``flax_raw``."""
    torch_dtype = t.dtype
    t, f = _aligned(where, t, f, layout)  # both float64 now
    both_nan = np.isnan(f) & np.isnan(t)
    diff = float(np.max(np.where(both_nan, 0.0, np.abs(f - t)), initial=0.0))
    if fixed is not None:
        atol, rtol = fixed
        agree = bool(np.allclose(f, t, atol=atol, rtol=rtol, equal_nan=True))
        return diff, agree, atol + rtol * float(np.max(np.abs(t), initial=0.0))
    if exact is not None:
        exact, _ = _aligned(where, exact, f, layout)
    tol = _tolerance(t, exact, depth, _rounding(torch_dtype, jnp.result_type(flax_raw)))
    same_nan = bool(np.array_equal(np.isnan(f), np.isnan(t)))
    return diff, same_nan and not diff > tol, tol


def _torch_activations(torch_module: Any, x: Any) -> tuple[list[tuple[str, np.ndarray]], Any]:
    """Every leaf module's output in call order (as numpy, torch's dtype kept where numpy has
    it) and the model's output, in eval mode under ``no_grad``; the mode is restored."""
    import torch

    records: list[tuple[str, np.ndarray]] = []

    def hook(name):
        def record(module, inputs, output):
            if torch.is_tensor(output):
                # a copy: in-place ops after the layer (ReLU(inplace=True), out += x) change it
                records.append((name, _activation(name, output)))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in torch_module.named_modules()
        if name and not any(True for _ in module.children())
    ]
    was_training = torch_module.training
    torch_module.eval()
    try:
        with torch.no_grad():
            out = torch_module(x)
    finally:
        for handle in handles:
            handle.remove()
        torch_module.train(was_training)
    return records, out


def _activation(name: str, output: Any) -> np.ndarray:
    """A copy of a torch activation as numpy, in its own half-precision dtype (its rounding
    sets the tolerance; numpy's torch bridge goes through float32, exactly)."""
    value = _to_numpy(name, output.detach().clone())
    half = {"torch.bfloat16": jnp.bfloat16, "torch.float16": np.float16}.get(str(output.dtype))
    return value.astype(half) if half is not None else value


def _float64_activations(torch_module: Any, x: Any, records) -> list[np.ndarray] | None:
    """The same activations (then the outputs) from a float64 copy of the model, or None when
    the model already computes in float64 or cannot run in float64 (then the rule alone)."""
    import copy

    import torch

    floating = [v for _, v in records if jnp.issubdtype(v.dtype, jnp.floating)]
    if floating and all(v.dtype == np.float64 for v in floating):
        return None
    try:
        double = copy.deepcopy(torch_module).double()
        x64 = x.double() if x.is_floating_point() else x
        exact, out = _torch_activations(double, x64)
    except Exception:  # any model that does not run in float64: no reference, the rule alone
        return None
    if [name for name, _ in exact] != [name for name, _ in records]:
        return None
    outs = list(out) if isinstance(out, list | tuple) else [out]
    if not all(torch.is_tensor(o) for o in outs):
        return None
    return [v for _, v in exact] + [_to_numpy("output", o.detach()) for o in outs]


def _hint(name, path, variables, records, torch_value) -> str:
    """A likely cause for a layer that differs, from its weights and PyTorch's activations."""
    params: Any = variables.get("params", {})
    for part in path:
        params = params.get(part, {}) if isinstance(params, Mapping) else {}
    if not isinstance(params, Mapping):
        return ""
    kernel, scale = params.get("kernel"), params.get("scale")
    if kernel is not None and np.ndim(kernel) == 2:
        position = next(i for i, (n, v) in enumerate(records) if n == name and v is torch_value)
        maps = [v for _, v in records[:position] if v.ndim >= 3]
        if maps and int(np.prod(maps[-1].shape[1:])) == np.shape(kernel)[0]:
            shape = tuple(int(s) for s in maps[-1].shape[1:])
            return (
                f"; it is a dense layer after a {shape} feature map in PyTorch: if the model "
                f"flattens that map, pass flatten_shapes={{{'/'.join(path)!r}: {shape}}}"
            )
    if scale is not None and np.ndim(scale) >= 2:
        return "; its scale has more than one dim: check norm_layouts ('channels_first' or 'same')"
    return ""
