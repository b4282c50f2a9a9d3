"""The models' shared switches: the normalization slot (a string or a module factory) and dtypes.

:class:`NormalizedModel` is the base of every jaxbn model: it holds ``norm``, ``bn_momentum``,
``dtype`` and ``param_dtype`` (keyword-only) and builds the normalization layer of each slot
(:meth:`NormalizedModel.normalize`).

``norm`` is a string shorthand (``"batch"``, ``"group"``, ``"layer"``, ``"none"``) or, as in
Flax's own examples, a factory: any callable called as ``factory(num_features, name=...)``
whose result is called as ``module(x, train=train)``, e.g.
``functools.partial(jaxbn.BatchNorm, momentum=0.2)``, ``functools.partial(jaxbn.GroupNorm, 8)``
or a module class of one's own with a ``num_features`` field.

With ``"none"`` the slot is empty and every other layer keeps its name, so a model whose batch
norms were all folded (:func:`jaxbn.fold_batch_norm`) runs as ``model.clone(norm="none")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import Scope

from jaxbn.linen.batch_norm import BatchNorm, BatchNorm1d, BatchNorm2d
from jaxbn.linen.group_norm import GroupNorm
from jaxbn.linen.layer_norm import LayerNorm

NormKind = Literal["batch", "group", "layer", "none"]
NORM_KINDS: tuple[str, ...] = ("batch", "group", "layer", "none")

#: ``factory(num_features, name=...)`` → a module called as ``module(x, train=train)``.
NormFactory = Callable[..., Any]

_DEFAULT_BN_MOMENTUM = 0.1


def check_norm(norm: Any) -> None:
    """Raises unless ``norm`` is one of :data:`NORM_KINDS` or a norm factory."""
    if isinstance(norm, str):
        if norm not in NORM_KINDS:
            raise ValueError(
                f"norm must be one of {NORM_KINDS} or a factory called as "
                f"factory(num_features, name=...), got {norm!r}"
            )
    elif isinstance(norm, nn.Module):
        raise TypeError(
            f"norm must be a string or a factory called as factory(num_features, name=...), "
            f"got a module instance ({type(norm).__name__}); pass its class or a "
            f"functools.partial of it, e.g. functools.partial({type(norm).__name__}, ...)"
        )
    elif not callable(norm):
        raise TypeError(
            f"norm must be one of {NORM_KINDS} or a factory called as "
            f"factory(num_features, name=...), got {type(norm).__name__} ({norm!r})"
        )


class NormalizedModel(nn.Module):
    """Base of the jaxbn models: the normalization choice and the dtypes, keyword-only.

    Attributes:
      norm: ``"batch"`` (``BatchNorm1d``/``BatchNorm2d`` by rank), ``"group"`` (the largest group
        count ≤ 32 dividing C), ``"layer"`` (over all of an example's features), ``"none"``; or a
        factory, called as ``factory(num_features, name=...)``, whose result is called as
        ``module(x, train=train)``. A factory gets nothing else: put its settings (momentum,
        eps, its ``dtype``/``param_dtype``) in it, e.g.
        ``functools.partial(jaxbn.BatchNorm, momentum=0.2, param_dtype=jnp.float64)``.
      bn_momentum: momentum of ``norm="batch"`` (PyTorch meaning: weight of the new batch).
        With a factory it must stay at its default: the factory carries its own.
      dtype: computation dtype of every layer (Dense/Conv, the norms' outputs); None: Flax's
        promotion of input and parameter dtypes. ``jnp.bfloat16`` for mixed precision.
      param_dtype: dtype of the parameters and of batch norm's running statistics of the
        string norms (float32 also under a bfloat16 ``dtype``; ``jnp.float64`` for exact ports,
        with ``jax_enable_x64`` on). Torch weights converted into a template
        (:func:`jaxbn.interop.torch_to_flax`) keep the template's dtypes.
    """

    _: dataclasses.KW_ONLY
    norm: NormKind | NormFactory = "batch"
    bn_momentum: float | None = _DEFAULT_BN_MOMENTUM
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        parent = self.parent
        if isinstance(parent, str | float | int) or (
            callable(parent) and not isinstance(parent, nn.Module | Scope)
        ):
            # An older positional call, e.g. ResNet(stages, widths, 10, "group"): the value
            # lands in Flax's `parent` field, whose own error would not say why.
            raise TypeError(
                f"{type(self).__name__}: norm, bn_momentum, dtype and param_dtype are "
                f"keyword-only; got {parent!r} as an extra positional argument (write norm=...)"
            )
        check_norm(self.norm)
        if not isinstance(self.norm, str) and self.bn_momentum != _DEFAULT_BN_MOMENTUM:
            raise ValueError(
                f"bn_momentum={self.bn_momentum} applies to norm='batch' only; with a norm "
                "factory set the momentum in the factory, e.g. "
                "functools.partial(jaxbn.BatchNorm, momentum=...)"
            )
        super().__post_init__()

    @property
    def layer_dtypes(self) -> dict[str, Any]:
        """``dtype`` and ``param_dtype``, as keywords for a Dense/Conv layer."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def normalize(self, x: jax.Array, *, train: bool, name: str) -> jax.Array:
        """The slot ``name`` applied to ``x`` ([N, C] or [N, H, W, C]); call from a compact method.

        Batch norm is ``BatchNorm1d`` for [N, C] and ``BatchNorm2d`` for [N, H, W, C]; group norm
        uses the largest group count ≤ 32 that divides C; layer norm normalizes each example over
        all of its features (the tutorial's ``nn.LayerNorm([C, H, W])``). A factory is called as
        ``factory(C, name=name)`` and its module as ``module(x, train=train)``. The output is
        cast to ``dtype`` when one is set.
        """
        channels = x.shape[-1]
        if self.norm == "none":
            return x
        if self.norm == "batch":
            cls: type[BatchNorm] = BatchNorm1d if x.ndim == 2 else BatchNorm2d
            module: Any = cls(channels, momentum=self.bn_momentum, name=name, **self.layer_dtypes)
        elif self.norm == "group":
            groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
            module = GroupNorm(groups, channels, param_dtype=self.param_dtype, name=name)
        elif self.norm == "layer":
            module = LayerNorm(x.shape[1:], param_dtype=self.param_dtype, name=name)
        else:
            module = self.norm(channels, name=name)
            if not callable(module):
                raise TypeError(
                    f"the norm factory {self.norm!r} returned {type(module).__name__}, which "
                    "cannot be called as module(x, train=...)"
                )
        y = module(x, train=train)
        if self.dtype is not None and y.dtype != self.dtype:
            y = y.astype(self.dtype)  # GroupNorm/LayerNorm (no dtype field) or a user's norm
        return y
