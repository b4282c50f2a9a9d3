"""Flax NNX module ``GhostBatchNorm``: batch norm over virtual batches (Hoffer et al. 2017), the
twin of :class:`jaxbn.GhostBatchNorm` (same fields, same numbers bit for bit).

In training the batch is split into ``N / virtual_batch_size`` virtual batches along axis 0;
each is normalized with its own statistics and updates the running statistics in turn, as
PyTorch would after ``x.split(virtual_batch_size)`` through one ``BatchNorm`` (the counter grows
by the number of splits). Eval is :class:`jaxbn.nnx.BatchNorm`'s eval.

Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> bn = jaxbn.nnx.GhostBatchNorm(8, 4)                        # C=8, 4 examples a split
    >>> bn.train(); y = bn(jnp.arange(128.0).reshape(16, 8))       # 4 virtual batches
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import _module_logic as logic
from jaxbn.nnx.batch_norm import Initializer, call_inputs, init_variables, set_mode_view

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(nnx.Module):
    """Batch norm with statistics over virtual batches in training (see module docstring).

    Args:
      num_features: C; virtual_batch_size: examples per virtual batch (must divide the batch
        size in training); both by position, every other argument by keyword.
      eps: added to the variance.
      momentum: weight of each virtual batch in the running average; None = cumulative.
      affine: learn ``scale`` and ``bias``.
      track_running_stats: keep the running statistics; if False, eval splits and uses batch
        statistics too.
      axis: the feature axis (not 0, the batch axis).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of the parameters and running statistics.
      scale_init, bias_init: initializers ``(key, shape, dtype)``.
      bias, use_scale, use_bias, scale_metadata, bias_metadata: as
        :class:`jaxbn.nnx.BatchNorm`'s (``bias=False``: ``scale`` only).
      use_running_average: the mode (None: none yet; ``.train()`` / ``.eval()`` set it).
      momentum_convention_checked: silences the warning a momentum above 0.5 gets.
      rngs: ``nnx.Rngs``, needed only by a random initializer.

    Call:
      ``bn(x, use_running_average=None, *, train=None, mask=None)``: ``x`` [N, ..., C].
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = -1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Initializer = nn.initializers.ones,
        bias_init: Initializer = nn.initializers.zeros,
        bias: bool = True,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        use_running_average: bool | None = None,
        momentum_convention_checked: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        logic.check_feature_count(num_features, "num_features", allow_none=False)
        logic.check_virtual_batch_size(virtual_batch_size)
        logic.check_momentum(momentum)
        logic.check_variant_fields(num_features, eps, axis, scale_init, bias_init)
        logic.learned_params(affine, bias, use_scale, use_bias)
        if use_running_average is not None:
            logic.train_flag(use_running_average, "use_running_average")
        message = logic.momentum_convention_message(
            f"nnx.{type(self).__name__}", momentum, momentum_convention_checked, alternative=""
        )
        if message:
            logic.warn_momentum_convention(message)
        self.num_features = int(num_features)
        self.virtual_batch_size = int(virtual_batch_size)
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_running_average = use_running_average
        init_variables(
            self,
            affine=bool(affine),
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            bias=bias,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            track_running_stats=self.track_running_stats,
        )

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        train: bool | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Batch norm of each run of ``virtual_batch_size`` examples in training (statistics
        updated in place, once per virtual batch); the running statistics in eval.

        Args:
          x: [N, ..., C], the batch on axis 0, the features at ``axis``.
          use_running_average: ``flax.nnx.BatchNorm``'s per-call mode (True: eval).
          train: keyword: this call's mode, overriding the module's; None uses the module's.
          mask: optional boolean, broadcastable to ``x``, as :class:`jaxbn.nnx.BatchNorm`'s.

        Returns:
          ``y``, shaped like ``x``.

        Raises:
          TypeError: no mode (neither an argument nor ``.train()`` / ``.eval()``).
          ValueError: a batch size that ``virtual_batch_size`` does not divide in training.

        Example:
            >>> import jax.numpy as jnp, jaxbn.nnx
            >>> bn = jaxbn.nnx.GhostBatchNorm(3, virtual_batch_size=2)
            >>> bn(jnp.arange(12.0).reshape(4, 3), train=True).shape
            (4, 3)
        """
        training, x, weight, bias, stats = call_inputs(self, x, train, use_running_average)
        if training and stats is not None:
            logic.check_vmapped_update(f"jaxbn.nnx.{type(self).__name__}", x, stats)
        y, new = logic.ghost_batch_norm_call(
            self, x, weight, bias, stats, train=training, mask=mask
        )
        if new is not None:
            self.mean[...], self.var[...], self.num_batches_tracked[...] = new
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)`` (and ``nnx.view_info``).

        Args:
          use_running_average: True: eval (running statistics); False: training (virtual
            batch statistics, running statistics updated); None: unchanged.
        """
        set_mode_view(self, use_running_average)
