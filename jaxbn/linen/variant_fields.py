"""The fields the batch norm variants share — ``FrozenBatchNorm``, ``GhostBatchNorm``,
``BatchRenorm`` — declared and checked once, with :class:`jaxbn.BatchNorm`'s names and meanings.

A variant takes ``num_features`` (and ``GhostBatchNorm`` its ``virtual_batch_size``) by
position and every option by keyword: ``GhostBatchNorm(64, 4, momentum=0.2)``. The variants
have no PyTorch constructor whose argument order they would have to mirror, and a keyword
cannot land in the wrong option. ``jaxbn.BatchNorm`` keeps its own list: its positional order is
pinned (PyTorch's constructor, then Flax's fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxbn import _module_logic as logic
from jaxbn._module_logic import check_momentum
from jaxbn.linen.batch_norm import Initializer

__all__ = ["UpdatingVariantFields", "VariantFields"]


class VariantFields(nn.Module):
    """``num_features`` (C; inferred from the input when None), then keyword-only: ``eps``,
    ``affine``, ``axis``, ``dtype`` (output; default the input's), ``param_dtype`` (variables),
    ``scale_init`` and ``bias_init`` (Flax initializers ``(key, shape, dtype)``), ``bias``
    (PyTorch 2.13's: False learns ``scale`` only), ``use_scale``/``use_bias`` (Flax's, each
    parameter apart), ``scale_metadata``/``bias_metadata`` (the parameters' metadata) — the
    meanings of :class:`jaxbn.BatchNorm`'s."""

    num_features: int | None = None
    _: dataclasses.KW_ONLY
    eps: float = 1e-5
    affine: bool = True
    axis: int = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    bias: bool = True
    use_scale: bool = True
    use_bias: bool = True
    scale_metadata: Mapping[str, Any] = FrozenDict()
    bias_metadata: Mapping[str, Any] = FrozenDict()

    def __post_init__(self) -> None:
        # bad fields are refused when the module is built; a variant checks its own fields in
        # its __post_init__ and then calls this one (not a helper method: Flax wraps those,
        # and the momentum warning names the user's line by walking the __post_init__ frames)
        logic.check_variant_fields(
            self.num_features, self.eps, self.axis, self.scale_init, self.bias_init
        )
        logic.learned_params(self.affine, self.bias, self.use_scale, self.use_bias)
        super().__post_init__()


class UpdatingVariantFields(VariantFields):
    """:class:`VariantFields` and, keyword-only, the running averages' ``momentum`` (PyTorch's
    meaning; None = cumulative) and ``momentum_convention_checked`` (silences the warning a
    momentum above 0.5 gets)."""

    _: dataclasses.KW_ONLY
    momentum: float | None = 0.1
    momentum_convention_checked: bool = False

    #: the other convention's usual momentum, as this variant's users know it (the warning's).
    momentum_example: ClassVar[str] = "Flax's momentum=0.9 is jaxbn's 0.1"

    def __post_init__(self) -> None:
        check_momentum(self.momentum)
        super().__post_init__()  # every field is checked before a warning is given
        message = logic.momentum_convention_message(
            type(self).__name__,
            self.momentum,
            self.momentum_convention_checked,
            example=self.momentum_example,
            alternative="",
        )
        if message:
            logic.warn_momentum_convention(message)
