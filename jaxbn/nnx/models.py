"""The tutorial's networks as Flax NNX modules: ``MLP``, ``ConvNet``, ``ResidualBlock``,
``ResNet``, with a norm choice and the layer names of :mod:`jaxbn.models` (the Linen ones).

The attribute names are the Linen variables' module names (``layers_0``, ``features_1``,
``layer1_0/bn1``…), so :func:`jaxbn.nnx.to_linen_variables` of an NNX model is the variables
tree of its Linen twin (``model.linen_twin()``) and one PyTorch ``state_dict`` loads into
either (:func:`jaxbn.nnx.torch_to_nnx`). NNX builds its parameters eagerly, so the input size
is a constructor argument (``in_features``; ``in_channels`` and ``image_size``).

``norm``: ``"batch"`` (``BatchNorm1d`` on [N, C], ``BatchNorm2d`` on [N, H, W, C]),
``"group"`` (the largest group count ≤ 32 dividing C), ``"layer"`` (over all of an example's
features), ``"none"`` (the slot is empty, the other names are kept); or a factory called as
``factory(num_features, rngs=rngs)`` whose module is called as ``module(x, train=train)``.

Call: ``model(x, *, train=None)``: ``train`` True/False overrides the mode of every norm for
this call; None uses the modes set by ``model.train()`` / ``model.eval()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import models as linen_models
from jaxbn.nnx.batch_norm import BatchNorm1d, BatchNorm2d
from jaxbn.nnx.group_norm import GroupNorm
from jaxbn.nnx.layer_norm import LayerNorm

__all__ = ["MLP", "ConvNet", "ResNet", "ResidualBlock"]

NORM_KINDS = ("batch", "group", "layer", "none")
_DEFAULT_BN_MOMENTUM = 0.1
# The models' keyword options and their defaults (as in :class:`jaxbn.models.NormalizedModel`).
_NORM_OPTIONS = {
    "norm": "batch",
    "bn_momentum": _DEFAULT_BN_MOMENTUM,
    "dtype": None,
    "param_dtype": jnp.float32,
}


class _Normalized(nnx.Module):
    """Holds the norm choice and dtypes; builds and applies the norm slots."""

    def _setup(self, **norm_options: Any) -> None:
        """Checks and keeps the keyword options every model takes (its ``**norm_options``):
        ``norm`` (default ``"batch"``), ``bn_momentum`` (0.1), ``dtype`` (computation, None:
        Flax's promotion) and ``param_dtype`` (parameters, float32)."""
        unknown = sorted(set(norm_options) - set(_NORM_OPTIONS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}"
            )
        self._keep_options(**{**_NORM_OPTIONS, **norm_options})

    def _keep_options(self, norm: Any, bn_momentum: Any, dtype: Any, param_dtype: Any) -> None:
        if isinstance(norm, str):
            if norm not in NORM_KINDS:
                raise ValueError(
                    f"norm must be one of {NORM_KINDS} or a factory called as "
                    f"factory(num_features, rngs=rngs), got {norm!r}"
                )
        elif isinstance(norm, nnx.Module) or not callable(norm):
            raise TypeError(
                f"norm must be one of {NORM_KINDS} or a factory called as "
                f"factory(num_features, rngs=rngs), got {type(norm).__name__} ({norm!r})"
            )
        if not isinstance(norm, str) and bn_momentum != _DEFAULT_BN_MOMENTUM:
            raise ValueError(
                f"bn_momentum={bn_momentum} applies to norm='batch' only; with a norm "
                "factory set the momentum in the factory"
            )
        self._norm_kind = norm if isinstance(norm, str) else "factory"
        self._norm_factory = None if isinstance(norm, str) else norm
        self.bn_momentum = bn_momentum
        self.dtype = dtype
        self.param_dtype = param_dtype

    @property
    def _options(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def _add_norm(self, name: str, shape: tuple[int, ...], rngs: nnx.Rngs) -> None:
        """The slot ``name`` for inputs [N, *shape] (shape (C,) or (H, W, C))."""
        channels = shape[-1]
        kind = self._norm_kind
        if kind == "none":
            return
        if kind == "batch":
            cls = BatchNorm1d if len(shape) == 1 else BatchNorm2d
            module: Any = cls(channels, momentum=self.bn_momentum, **self._options, rngs=rngs)
        elif kind == "group":
            groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
            module = GroupNorm(groups, channels, param_dtype=self.param_dtype, rngs=rngs)
        elif kind == "layer":
            module = LayerNorm(shape, param_dtype=self.param_dtype, rngs=rngs)
        else:
            module = self._norm_factory(channels, rngs=rngs)
        setattr(self, name, module)

    def _normalize(self, name: str, x: jax.Array, train: bool | None) -> jax.Array:
        module = getattr(self, name, None)
        if module is None:
            return x
        y = module(x, train=train)
        if self.dtype is not None and y.dtype != self.dtype:
            y = y.astype(self.dtype)
        return y

    def _twin_options(self) -> dict[str, Any]:
        if self._norm_kind == "factory":
            raise TypeError(
                "linen_twin: a model built with a norm factory has no Linen twin here; build "
                "the Linen model yourself with the matching Linen factory"
            )
        return {
            "norm": self._norm_kind,
            "bn_momentum": self.bn_momentum,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }


class MLP(_Normalized):
    """The tutorial's MLP: Linear → norm → ReLU blocks, then a Linear classifier.

    Names: ``layers_0`` (Linear), ``layers_1`` (norm), ``layers_3``, ``layers_4``, …, as in
    :class:`jaxbn.models.MLP` and the PyTorch ``nn.Sequential``.

    Call: ``x`` [N, ...] (flattened to [N, in_features]) → logits [N, num_classes].

    Args:
      in_features: the flattened input size (784).
      hidden: the widths of the Linear → norm → ReLU blocks ((256, 128)).
      num_classes: the number of logits (10).
      rngs: the ``nnx.Rngs`` that initialize the parameters.
      **norm_options: ``norm`` (``"batch"`` (default), ``"group"``, ``"layer"``, ``"none"``,
        or a factory called as ``factory(num_features, rngs=rngs)``), ``bn_momentum`` (0.1,
        ``norm="batch"`` only), ``dtype`` (computation; None: Flax's promotion) and
        ``param_dtype`` (parameters; float32).
      train: at the call: True uses (and updates) the batch statistics, False the running
        ones; None (default): the mode set by ``model.train()`` / ``model.eval()``.

    Raises:
      TypeError: an unknown keyword, e.g. ``MLP() got an unexpected keyword argument
        'foo'``; a ``norm`` that is neither a name nor a factory (``norm must be one of
        ('batch', 'group', 'layer', 'none') or a factory called as factory(num_features,
        rngs=rngs), got int (3)``); or, at the call, a batch norm with no mode
        (``jaxbn.nnx.BatchNorm1d was called without a mode (train): call model.train() or
        model.eval() first ...``).
      ValueError: an unknown ``norm`` name (``norm must be one of ('batch', 'group', 'layer',
        'none') or a factory ..., got 'batchy'``), or ``bn_momentum`` with a norm factory
        (``bn_momentum=0.5 applies to norm='batch' only; with a norm factory set the
        momentum in the factory``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> model = jaxbn.nnx.MLP(4, (8,), 3, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((2, 4)), train=True).shape
      (2, 3)
      >>> type(model.layers_1).__name__
      'BatchNorm1d'
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 128),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
        **norm_options: Any,
    ) -> None:
        self._setup(**norm_options)
        self.hidden = tuple(hidden)
        self.num_classes = num_classes
        width, index = in_features, 0
        for out in self.hidden:
            setattr(self, f"layers_{index}", nnx.Linear(width, out, **self._options, rngs=rngs))
            self._add_norm(f"layers_{index + 1}", (out,), rngs)
            width, index = out, index + 3
        self._last = f"layers_{index}"
        setattr(self, self._last, nnx.Linear(width, num_classes, **self._options, rngs=rngs))

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        for block in range(len(self.hidden)):
            x = getattr(self, f"layers_{3 * block}")(x)
            x = nnx.relu(self._normalize(f"layers_{3 * block + 1}", x, train))
        return getattr(self, self._last)(x)

    def linen_twin(self) -> linen_models.MLP:
        """The :class:`jaxbn.models.MLP` whose variables tree this model's state matches."""
        return linen_models.MLP(self.hidden, self.num_classes, **self._twin_options())


class ConvNet(_Normalized):
    """The tutorial's ``ConvNetWithBN``: three conv3x3 → norm → ReLU blocks (max-pool after
    the first two), then Linear → norm → ReLU → Linear. Names as :class:`jaxbn.models.ConvNet`
    (``features_0`` conv, ``features_1`` norm, …, ``classifier_0/1/3``).

    Call: ``x`` [N, image_size, image_size, in_channels] (side divisible by 4) → logits
    [N, num_classes].

    Args:
      in_channels: the input's channels (3).
      image_size: the input's side H (= W) (32).
      widths: the three conv blocks' channels ((64, 128, 256)).
      hidden: the width of ``classifier_0`` (512).
      num_classes: the number of logits (10).
      rngs: the ``nnx.Rngs`` that initialize the parameters.
      **norm_options: ``norm`` (``"batch"`` (default), ``"group"``, ``"layer"``, ``"none"``,
        or a factory called as ``factory(num_features, rngs=rngs)``), ``bn_momentum`` (0.1,
        ``norm="batch"`` only), ``dtype`` (computation; None: Flax's promotion) and
        ``param_dtype`` (parameters; float32).
      train: at the call: True uses (and updates) the batch statistics, False the running
        ones; None (default): the mode set by ``model.train()`` / ``model.eval()``.

    Raises:
      TypeError: an unknown keyword, e.g. ``ConvNet() got an unexpected keyword argument
        'foo'``; a ``norm`` that is neither a name nor a factory (``norm must be one of
        ('batch', 'group', 'layer', 'none') or a factory called as factory(num_features,
        rngs=rngs), got int (3)``); or, at the call, a batch norm with no mode
        (``jaxbn.nnx.BatchNorm2d was called without a mode (train): call model.train() or
        model.eval() first ...``).
      ValueError: an unknown ``norm`` name (``norm must be one of ('batch', 'group', 'layer',
        'none') or a factory ..., got 'batchy'``), or ``bn_momentum`` with a norm factory
        (``bn_momentum=0.5 applies to norm='batch' only; with a norm factory set the
        momentum in the factory``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> model = jaxbn.nnx.ConvNet(1, 8, (4, 8, 8), 16, 3, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((2, 8, 8, 1)), train=True).shape
      (2, 3)
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        hidden: int = 512,
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
        **norm_options: Any,
    ) -> None:
        self._setup(**norm_options)
        self.widths, self.hidden, self.num_classes = tuple(widths), hidden, num_classes
        channels, side, index = in_channels, image_size, 0
        for block, width in enumerate(self.widths):
            conv = nnx.Conv(channels, width, (3, 3), padding=1, **self._options, rngs=rngs)
            setattr(self, f"features_{index}", conv)
            self._add_norm(f"features_{index + 1}", (side, side, width), rngs)
            channels, index = width, index + 3
            if block < len(self.widths) - 1:
                side, index = side // 2, index + 1
        self.classifier_0 = nnx.Linear(side * side * channels, hidden, **self._options, rngs=rngs)
        self._add_norm("classifier_1", (hidden,), rngs)
        self.classifier_3 = nnx.Linear(hidden, num_classes, **self._options, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        index = 0
        for block in range(len(self.widths)):
            x = getattr(self, f"features_{index}")(x)
            x = nnx.relu(self._normalize(f"features_{index + 1}", x, train))
            index += 3
            if block < len(self.widths) - 1:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nnx.relu(self._normalize("classifier_1", self.classifier_0(x), train))
        return self.classifier_3(x)

    def torch_flatten_shapes(self, height: int, width: int) -> dict[str, tuple[int, int, int]]:
        """The (C, H, W) feature map PyTorch flattens into ``classifier_0`` (for interop)."""
        pools = 2 ** (len(self.widths) - 1)
        return {"classifier_0": (self.widths[-1], height // pools, width // pools)}

    def linen_twin(self) -> linen_models.ConvNet:
        """The :class:`jaxbn.models.ConvNet` whose variables tree this model's state matches."""
        return linen_models.ConvNet(
            self.widths, self.hidden, self.num_classes, **self._twin_options()
        )


class ResidualBlock(_Normalized):
    """``x`` [N, H, W, in_channels] → [N, H/stride, W/stride, out_channels]: conv3x3(stride) →
    norm → ReLU → conv3x3 → norm, plus a shortcut (identity, or conv1x1(stride) → norm), ReLU.
    Names ``conv1, bn1, conv2, bn2, shortcut_0, shortcut_1``.

    Args:
      in_channels: the input's channels.
      out_channels: the output's channels.
      stride: the stride of ``conv1`` and of the shortcut (1).
      image_size: the input's H (= W), needed by ``norm="layer"`` (32).
      rngs: the ``nnx.Rngs`` that initialize the parameters.
      **norm_options: ``norm`` (``"batch"`` (default), ``"group"``, ``"layer"``, ``"none"``,
        or a factory called as ``factory(num_features, rngs=rngs)``), ``bn_momentum`` (0.1,
        ``norm="batch"`` only), ``dtype`` (computation; None: Flax's promotion) and
        ``param_dtype`` (parameters; float32).
      train: at the call: True uses (and updates) the batch statistics, False the running
        ones; None (default): the mode set by ``model.train()`` / ``model.eval()``.

    Raises:
      TypeError: an unknown keyword, e.g. ``ResidualBlock() got an unexpected keyword argument
        'foo'``; a ``norm`` that is neither a name nor a factory (``norm must be one of
        ('batch', 'group', 'layer', 'none') or a factory called as factory(num_features,
        rngs=rngs), got int (3)``); or, at the call, a batch norm with no mode
        (``jaxbn.nnx.BatchNorm2d was called without a mode (train): call model.train() or
        model.eval() first ...``).
      ValueError: an unknown ``norm`` name (``norm must be one of ('batch', 'group', 'layer',
        'none') or a factory ..., got 'batchy'``), or ``bn_momentum`` with a norm factory
        (``bn_momentum=0.5 applies to norm='batch' only; with a norm factory set the
        momentum in the factory``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> block = jaxbn.nnx.ResidualBlock(4, 8, 2, image_size=8, rngs=nnx.Rngs(0))
      >>> block(jnp.ones((2, 8, 8, 4)), train=True).shape
      (2, 4, 4, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        image_size: int = 32,
        rngs: nnx.Rngs,
        **norm_options: Any,
    ) -> None:
        self._setup(**norm_options)
        self.stride = stride
        side = -(-image_size // stride)
        conv = dict(**self._options, rngs=rngs)
        self.has_shortcut = stride != 1 or in_channels != out_channels
        if self.has_shortcut:
            self.shortcut_0 = nnx.Conv(
                in_channels, out_channels, (1, 1), strides=stride, padding=0, **conv
            )
            self._add_norm("shortcut_1", (side, side, out_channels), rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, padding=1, **conv)
        self._add_norm("bn1", (side, side, out_channels), rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), padding=1, **conv)
        self._add_norm("bn2", (side, side, out_channels), rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        identity = x
        if self.has_shortcut:
            identity = self._normalize("shortcut_1", self.shortcut_0(x), train)
        out = nnx.relu(self._normalize("bn1", self.conv1(x), train))
        out = self._normalize("bn2", self.conv2(out), train)
        return nnx.relu(out + identity)


class ResNet(_Normalized):
    """CIFAR-style ResNet: conv3x3 stem → norm → ReLU, stages of :class:`ResidualBlock`
    (``layer{stage}_{block}``), global average pool, ``fc``; names as
    :class:`jaxbn.models.ResNet`.

    Call: ``x`` [N, image_size, image_size, in_channels] → logits [N, num_classes].

    Args:
      in_channels: the input's channels (3).
      image_size: the input's side H (= W) (32).
      stage_sizes: the number of blocks in each stage ((2, 2, 2, 2)).
      widths: each stage's channels ((64, 128, 256, 512)); stages after the first halve H
        and W.
      num_classes: the number of logits (10).
      rngs: the ``nnx.Rngs`` that initialize the parameters.
      **norm_options: ``norm`` (``"batch"`` (default), ``"group"``, ``"layer"``, ``"none"``,
        or a factory called as ``factory(num_features, rngs=rngs)``), ``bn_momentum`` (0.1,
        ``norm="batch"`` only), ``dtype`` (computation; None: Flax's promotion) and
        ``param_dtype`` (parameters; float32).
      train: at the call: True uses (and updates) the batch statistics, False the running
        ones; None (default): the mode set by ``model.train()`` / ``model.eval()``.

    Raises:
      TypeError: an unknown keyword, e.g. ``ResNet() got an unexpected keyword argument
        'foo'``; a ``norm`` that is neither a name nor a factory (``norm must be one of
        ('batch', 'group', 'layer', 'none') or a factory called as factory(num_features,
        rngs=rngs), got int (3)``); or, at the call, a batch norm with no mode
        (``jaxbn.nnx.BatchNorm2d was called without a mode (train): call model.train() or
        model.eval() first ...``).
      ValueError: an unknown ``norm`` name (``norm must be one of ('batch', 'group', 'layer',
        'none') or a factory ..., got 'batchy'``), or ``bn_momentum`` with a norm factory
        (``bn_momentum=0.5 applies to norm='batch' only; with a norm factory set the
        momentum in the factory``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> model = jaxbn.nnx.ResNet(3, 8, (1, 1), (4, 8), 5, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((2, 8, 8, 3)), train=True).shape
      (2, 5)
      >>> model.eval()
      >>> model(jnp.ones((2, 8, 8, 3))).shape
      (2, 5)
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
        **norm_options: Any,
    ) -> None:
        self._setup(**norm_options)
        self.stage_sizes, self.widths = tuple(stage_sizes), tuple(widths)
        self.num_classes = num_classes
        self.conv1 = nnx.Conv(in_channels, widths[0], (3, 3), padding=1, **self._options, rngs=rngs)
        self._add_norm("bn1", (image_size, image_size, widths[0]), rngs)
        channels, side = widths[0], image_size
        self._blocks = []
        for stage, (blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                name = f"layer{stage + 1}_{block}"
                setattr(
                    self,
                    name,
                    ResidualBlock(
                        channels,
                        width,
                        stride,
                        image_size=side,
                        **norm_options,
                        rngs=rngs,
                    ),
                )
                self._blocks.append(name)
                channels, side = width, -(-side // stride)
        self._blocks = tuple(self._blocks)
        self.fc = nnx.Linear(channels, num_classes, **self._options, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        x = nnx.relu(self._normalize("bn1", self.conv1(x), train))
        for name in self._blocks:
            x = getattr(self, name)(x, train=train)
        return self.fc(jnp.mean(x, axis=(1, 2)))

    def linen_twin(self) -> linen_models.ResNet:
        """The :class:`jaxbn.models.ResNet` whose variables tree this model's state matches."""
        return linen_models.ResNet(
            self.stage_sizes, self.widths, self.num_classes, **self._twin_options()
        )
