"""Equinox layers ``BatchNorm``, ``BatchNorm1d/2d/3d`` and ``FrozenBatchNorm``.

The formula, per feature c::

    y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

* training (``inference=False``): ``mean_c``/``var_c`` are the batch's mean and **biased**
  variance — over every axis of ``x`` but ``axis`` and over the members of ``axis_name`` (the
  examples of a named ``jax.vmap``, the devices of ``pmap``/``shard_map``, count-weighted) —
  and the running statistics in the state become ``mean ← (1-momentum)·mean + momentum·μ_B``,
  ``var ← (1-momentum)·var + momentum·σ²_B·n/(n-1)`` (the **unbiased** variance),
  ``num_batches_tracked += 1``. ``momentum=None`` is the cumulative average.
* inference (``inference=True``): the running statistics, nothing changes — unless
  ``track_running_stats=False``: then there are none and batch statistics are used.

Two ways to call it, as Equinox code is written:

* **per example** inside ``jax.vmap(..., axis_name="batch")``: ``x`` is one example, channels
  first (``[C]``, ``[C, L]``, ``[C, H, W]``; ``axis=0``, the default) and ``axis_name="batch"``
  names the vmap axis whose members are the batch. Several names (``("a", "b")``) take the
  statistics over nested vmaps; a per-example boolean ``mask`` leaves padded examples out.
  Map the state with ``in_axes=None, out_axes=None``: the new state is the same for every
  example.
* **whole batch**: ``x`` is ``[N, C, ...]`` with ``axis=1`` (PyTorch's layout) or
  ``[N, ..., C]`` with ``axis=-1``; ``axis_name`` then names a ``pmap``/``shard_map`` axis
  (or is None).

Both combine: per example on several devices, ``axis_name=("devices", "batch")`` syncs over
the devices and each one's vmap members (inside ``jax.shard_map`` pass ``check_vma=False``:
JAX 0.10 refuses any collective over a vmap axis in a checked shard_map, ``eqx.nn.BatchNorm``'s
too). ``eqx.filter_checkpoint`` goes around the layer (or a block of layers) inside the vmap;
around the named vmap itself it fails today (a NameError in the core's derivative).
Unset, ``axis_name`` follows :func:`jaxbn.sync_batch_norm` as the Flax modules do.

The mode follows Equinox: the ``inference`` field (set it, or use
``eqx.nn.inference_mode(model, value)``), overridden by the call's ``inference=`` keyword. It
has no default: a model whose mode was never chosen raises instead of silently training.

Relation to PyTorch: ``torch.nn.BatchNorm*d``'s fields, meanings and numbers; ``weight`` and
``bias`` are the parameters, the state holds ``mean, var, num_batches_tracked`` (PyTorch's
``running_mean, running_var, num_batches_tracked``). Relation to ``eqx.nn.BatchNorm``: its
``input_size`` is ``num_features``, ``channelwise_affine`` is ``affine``, its ``momentum``
(default 0.99, the weight of the old value) is ``1 - momentum`` here; it keeps the biased
batch variance in its running average (``mode="batch"``: debiased EMAs, no counter;
``mode="ema"``: training batches are normalized with the running averages) — jaxbn keeps
PyTorch's unbiased running variance and normalizes training batches with the batch's own.

Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> from jaxbn.equinox import BatchNorm2d
    >>> bn, state = eqx.nn.make_with_state(BatchNorm2d)(8, axis_name="batch")
    >>> x = jnp.ones((4, 8, 5, 5))                                  # [N, C, H, W]
    >>> per_example = jax.vmap(eqx.nn.inference_mode(bn, False), axis_name="batch",
    ...                        in_axes=(0, None), out_axes=(0, None))
    >>> y, state = per_example(x, state)                            # training step
    >>> y_eval, _ = eqx.nn.inference_mode(bn)(x[0], state)          # one example, eval
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import _module_logic as logic
from jaxbn import functional
from jaxbn._core.shapes import feature_axis

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm"]

NO_MODE = (
    "{cls} has no mode: set inference=False to train or inference=True to evaluate (a field "
    "of the layer, or eqx.nn.inference_mode(model, value) on the whole model), or pass "
    "inference= to the call"
)


def default_dtype() -> Any:
    """Equinox's default parameter dtype: float64 under ``jax_enable_x64``, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def static_axis_name(axis_name: Any) -> Hashable | tuple[Hashable, ...] | None:
    """A static field's value must hash: a list of names becomes a tuple."""
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


_INTERNAL_DIRS = tuple(os.path.dirname(module.__file__) + os.sep for module in (eqx, jax, logic))


def warn_from_user_code(message: str) -> None:
    """A :class:`jaxbn.linen.batch_norm.MomentumConventionWarning` attributed to the first frame
    outside jaxbn, Equinox and JAX (the user's line that built the layer); Python shows it once
    per line."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of this function
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, logic.MomentumConventionWarning, stacklevel=level)


class _Unset:
    """The mode of a layer built without one: a pytree leaf (``eqx.nn.inference_mode`` replaces
    leaves; it cannot replace a None in several layers at once), refused when called."""

    def __repr__(self) -> str:
        return "unset"


#: ``inference`` of a layer whose mode was never chosen.
UNSET = _Unset()


def resolve_mode(layer: Any, inference: Any) -> bool:
    """The call's ``inference=`` or else the layer's field, as a Python bool (None: error)."""
    mode = layer.inference if inference is None else inference
    if mode is UNSET or mode is None:
        raise ValueError(NO_MODE.format(cls=type(layer).__name__))
    if isinstance(mode, jax.core.Tracer):
        raise TypeError(
            f"{type(layer).__name__}'s inference is a traced value: the model went through "
            "jax.jit / pmap as a whole, which turns its bool fields into arrays. Use "
            "eqx.filter_jit, or pass eqx.partition(model, eqx.is_array)'s arrays and close "
            "over the rest"
        )
    return logic.train_flag(mode, "inference")


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization with PyTorch's semantics as an Equinox stateful layer (see module
    docstring).

    Attributes:
      weight, bias: [C] parameters (γ ones, β zeros), None without ``affine``.
      state_index: where the running statistics ``RunningStats(mean, var,
        num_batches_tracked)`` live in the ``eqx.nn.State``; None without tracking.
      inference: the mode (True: running statistics; False: train); ``UNSET`` until chosen
        (the constructor's ``inference=None``).
      num_features: C.
      eps: added to the variance.
      momentum: weight of the new batch in the running average; None = cumulative average.
      affine, track_running_stats: as PyTorch.
      axis: the channel axis of the input the layer receives (0: one Equinox example
        ``[C, ...]``; 1: a PyTorch batch ``[N, C, ...]``; -1: channels last).
      axis_name: the named vmap axis (or pmap / shard_map axis, or a tuple of names) whose
        members make up the batch; static, so the model moves through ``device_put`` / ``pmap``.
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      dtype: output dtype (default: the input's).

    Call:
      ``layer(x, state, *, key=None, inference=None, mask=None) -> (y, state)``; ``x`` one
      example or a batch (see module docstring); ``mask`` boolean, broadcastable to ``x``
      (per example: a scalar), False elements do not count and output 0.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool | _Unset
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    affine: bool = eqx.field(static=True)
    track_running_stats: bool = eqx.field(static=True)
    axis: int = eqx.field(static=True)
    axis_name: Any = eqx.field(static=True)
    axis_index_groups: Any = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    #: PyTorch's input ranks (a batch) and their message; None: any rank. One example, the
    #: batch being a named vmap axis, has one dimension less (set by the 1d/2d/3d classes).
    torch_ranks: ClassVar[tuple[int, ...] | None] = None
    rank_message: ClassVar[str] = ""
    #: read by :func:`jaxbn._module_logic.input_features` (the ranks are checked here instead)
    expected_ranks: ClassVar[None] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 0,
        axis_name: Hashable | Sequence[Hashable] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        inference: bool | None = None,
        dtype: Any = None,
        param_dtype: Any = None,
        momentum_convention_checked: bool = False,
    ) -> None:
        """Args: the attributes above; ``param_dtype`` is the dtype of the parameters and
        running mean/var (default float32, float64 under ``jax_enable_x64``);
        ``momentum_convention_checked`` silences the warning a momentum above 0.5 gets
        (``eqx.nn.BatchNorm``'s ``momentum=0.99`` is ``momentum=0.01`` here)."""
        logic.check_feature_count(num_features, "num_features", allow_none=False)
        logic.check_batch_norm_fields(num_features, eps, momentum, axis)
        if inference is not None:
            logic.train_flag(inference, "inference")
        message = logic.momentum_convention_message(
            type(self).__name__,
            momentum,
            momentum_convention_checked,
            example="eqx.nn.BatchNorm's momentum=0.99 is jaxbn's 0.01",
            alternative="",
        )
        if message:
            warn_from_user_code(message)
        param_dtype = default_dtype() if param_dtype is None else param_dtype
        self.weight = jnp.ones((num_features,), param_dtype) if affine else None
        self.bias = jnp.zeros((num_features,), param_dtype) if affine else None
        self.state_index = None
        if track_running_stats:
            self.state_index = eqx.nn.StateIndex(
                logic.RunningStats(
                    jnp.zeros((num_features,), param_dtype),
                    jnp.ones((num_features,), param_dtype),
                    jnp.zeros((), jnp.int32),
                )
            )
        self.inference = UNSET if inference is None else inference
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.axis_name = static_axis_name(axis_name)
        self.axis_index_groups = (
            None if axis_index_groups is None else tuple(tuple(g) for g in axis_index_groups)
        )
        self.dtype = dtype

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """``x``: one example ``[C, ...]`` inside a named vmap, or a batch → ``(y, state)``.

        ``key`` is ignored (Equinox's signature); ``inference`` overrides the field.
        """
        del key
        train = not resolve_mode(self, inference)
        x = jnp.asarray(x)
        self._check_rank(x.ndim, train)
        x, _ = logic.input_features(self, x)
        stats = None
        if self.state_index is not None:
            stats = state.get(self.state_index)
            where = f"state[{self.state_index.marker}]"
            logic.check_running_stats(where, logic.RunningStats(*stats), self.num_features)
        y, new, _ = logic.batch_norm_call(
            self, x, self.weight, self.bias, stats, train=train, mask=mask
        )
        if new is not None:
            state = state.set(self.state_index, new)
        return y, state

    def _check_rank(self, ndim: int, train: bool) -> None:
        if self.torch_ranks is None or ndim in self.torch_ranks:
            return
        if ndim + 1 in self.torch_ranks:
            if self.axis_name is not None or not train:
                return  # one example; its batch is the named vmap axis (or none is needed)
            raise ValueError(
                f"{type(self).__name__} got a {ndim}D input, one example, in training without "
                "axis_name: its statistics need the batch. Call it inside "
                "jax.vmap(..., axis_name='batch') with axis_name='batch', or on the whole "
                f"batch ({' or '.join(f'{r}D' for r in self.torch_ranks)}, axis=1)"
            )
        raise ValueError(self.rank_message.format(ndim=ndim))


class BatchNorm1d(BatchNorm):
    """``torch.nn.BatchNorm1d``: a batch [N, C] or [N, C, L] (``axis=1``), or one example
    [C] or [C, L] (``axis=0``) inside a named vmap."""

    torch_ranks: ClassVar[tuple[int, ...]] = logic.Ranks1d.expected_ranks
    rank_message: ClassVar[str] = logic.Ranks1d.rank_message


class BatchNorm2d(BatchNorm):
    """``torch.nn.BatchNorm2d``: a batch [N, C, H, W] (``axis=1``), or one example
    [C, H, W] (``axis=0``) inside a named vmap."""

    torch_ranks: ClassVar[tuple[int, ...]] = logic.Ranks2d.expected_ranks
    rank_message: ClassVar[str] = logic.Ranks2d.rank_message


class BatchNorm3d(BatchNorm):
    """``torch.nn.BatchNorm3d``: a batch [N, C, D, H, W] (``axis=1``), or one example
    [C, D, H, W] (``axis=0``) inside a named vmap."""

    torch_ranks: ClassVar[tuple[int, ...]] = logic.Ranks3d.expected_ranks
    rank_message: ClassVar[str] = logic.Ranks3d.rank_message


class FrozenBatchNorm(eqx.nn.StatefulLayer):
    """Batch norm with constant statistics and parameters (torchvision's
    ``FrozenBatchNorm2d``): ``y = (x − mean)·rsqrt(var + eps)·weight + bias`` in training and
    inference alike; ``stop_gradient`` makes every field a constant.

    It takes :class:`BatchNorm`'s call signature, ``(x, state, ...) -> (y, state)``, and
    returns the state untouched, so it drops into a BatchNorm's slot; build one from a trained
    layer with :meth:`from_batch_norm`.

    Attributes:
      weight, bias: [C] or None (``affine=False``). running_mean, running_var: [C].
      num_features, eps, axis, dtype: as :class:`BatchNorm`.

    Example:
        >>> bn, state = eqx.nn.make_with_state(BatchNorm2d)(8, axis=1, inference=False)
        >>> _, state = bn(jnp.ones((4, 8, 5, 5)), state)               # [N, C, H, W]
        >>> frozen = FrozenBatchNorm.from_batch_norm(bn, state)
        >>> y, state = frozen(jnp.ones((2, 8, 5, 5)), state)           # the layer's axis=1
    """

    weight: jax.Array | None
    bias: jax.Array | None
    running_mean: jax.Array
    running_var: jax.Array
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    axis: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        axis: int = 0,
        dtype: Any = None,
        param_dtype: Any = None,
    ) -> None:
        """Zeros/ones statistics and ones/zeros parameters (load real ones, or use
        :meth:`from_batch_norm`)."""
        logic.check_feature_count(num_features, "num_features", allow_none=False)
        logic.check_eps(eps)
        logic.check_axis(axis)
        param_dtype = default_dtype() if param_dtype is None else param_dtype
        self.weight = jnp.ones((num_features,), param_dtype) if affine else None
        self.bias = jnp.zeros((num_features,), param_dtype) if affine else None
        self.running_mean = jnp.zeros((num_features,), param_dtype)
        self.running_var = jnp.ones((num_features,), param_dtype)
        self.num_features = num_features
        self.eps = eps
        self.axis = axis
        self.dtype = dtype

    @classmethod
    def from_batch_norm(cls, bn: BatchNorm, state: eqx.nn.State) -> FrozenBatchNorm:
        """The frozen twin of ``bn`` with the running statistics ``state`` holds for it."""
        if bn.state_index is None:
            raise ValueError(
                f"{type(bn).__name__} with track_running_stats=False has no running statistics "
                "to freeze"
            )
        stats = state.get(bn.state_index)
        frozen = cls(bn.num_features, bn.eps, affine=bn.affine, axis=bn.axis, dtype=bn.dtype)
        return eqx.tree_at(
            lambda f: (f.weight, f.bias, f.running_mean, f.running_var),
            frozen,
            (bn.weight, bn.bias, stats.mean, stats.var),
            is_leaf=lambda leaf: leaf is None,
        )

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """``x``: one example ``[C, ...]`` or a batch → ``(y, state)`` (state unchanged)."""
        del key, inference  # the same in training and inference
        x = jnp.asarray(x)
        ax = feature_axis(self.axis, x.ndim)
        if x.shape[ax] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features on axis {self.axis}, "
                f"got input of shape {tuple(x.shape)}"
            )
        constant = lambda a: None if a is None else jax.lax.stop_gradient(a)
        y, _, _ = functional.batch_norm(
            x,
            constant(self.running_mean),
            constant(self.running_var),
            constant(self.weight),
            constant(self.bias),
            False,
            0.0,
            self.eps,
            axis=self.axis,
            mask=mask,
        )
        return (y if self.dtype is None else y.astype(self.dtype)), state
