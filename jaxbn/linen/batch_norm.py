"""Flax modules ``BatchNorm`` and the rank-checked ``BatchNorm1d/2d/3d``.

The formula, per feature c::

    y = (x - mean_c) / sqrt(var_c + eps) * scale_c + bias_c

* ``train=True``: ``mean_c``/``var_c`` are the batch's mean and **biased** variance over every
  axis but the feature axis; the running statistics become
  ``mean ← (1-momentum)·mean + momentum·μ_B`` and ``var ← (1-momentum)·var + momentum·σ²_B·n/(n-1)``
  (the **unbiased** variance), and ``num_batches_tracked`` grows by one.
  ``momentum=None`` is the cumulative average (factor ``1/num_batches_tracked``).
* ``train=False``: the running statistics are used, nothing changes — unless
  ``track_running_stats=False``, in which case there are none and batch statistics are used.

Relation to PyTorch: the same fields with the same meaning as ``torch.nn.BatchNorm*`` (momentum
is the weight of the new batch) and the same numbers; variables are named the Flax way —
``params: scale, bias`` (PyTorch ``weight, bias``) and ``batch_stats: mean, var,
num_batches_tracked`` (``running_mean, running_var, num_batches_tracked``). Layout is channels
last by default (``axis=-1``); ``axis=1`` takes PyTorch's NCHW.

Relation to ``flax.linen.BatchNorm``: Flax's ``momentum`` is ``1 - momentum`` here, Flax stores
the biased running variance (jaxbn and PyTorch the unbiased one), Flax's ``use_running_average``
is ``not train`` here and ``train`` is required, so forgetting eval mode cannot happen silently.
Flax averages per-device means with equal weight; jaxbn merges counts, so uneven shards and
masks are exact. A momentum above 0.5 (likely Flax's convention) warns once per value with a
:class:`~jaxbn.linen.batch_norm.MomentumConventionWarning` unless
``momentum_convention_checked=True``;
``jaxbn.flax_compat.BatchNorm`` takes Flax's spelling, and ``jaxbn.from_flax_batch_norm``
converts Flax's variables (statistics without a counter are refused here, naming it).

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x, *, train: bool):
    ...         x = nn.Conv(16, (3, 3))(x)                   # x: [N, H, W, C]
    ...         return nn.relu(jaxbn.BatchNorm2d(16)(x, train=train))
    >>> x = jnp.ones((8, 6, 6, 3))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    >>> y_eval = Net().apply({**variables, **updates}, x, train=False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict
from flax.nnx.bridge import NNXMeta

from jaxbn import _module_logic as logic
from jaxbn._module_logic import (  # noqa: F401  (check_initializer: re-exported)
    MomentumConventionWarning,
    check_initializer,
    train_flag,
    warn_momentum_convention,
)

#: Flax's initializer signature: ``init(key, shape, dtype) -> array``.
Initializer = Callable[..., jax.Array]

#: The collection a training batch norm reports its batch statistics to (count, mean, biased
#: var per channel, one entry per batch it updates its statistics from) when the caller names
#: it in ``mutable`` — how ``jaxbn.update_bn`` learns them as data instead of switching the
#: modules' behaviour. The entries sit under the layer's kind (``batch_norm_kind``:
#: ``"trained"``, ``"ghost"``, ``"renorm"``); a frozen layer has no batch statistics and
#: reports nothing, so nothing can ever be re-estimated into it.
MOMENTS_COLLECTION = "batch_moments"

#: The name of the batch counter in ``batch_stats`` (PyTorch's ``num_batches_tracked``).
COUNTER = "num_batches_tracked"


def _names_moments(mutable: Any) -> bool:
    # A Flax filter names a collection as a string or in a list/tuple/set of strings; True,
    # a DenyList (or a callable, which Flax refuses anyway) only *include* it.
    if isinstance(mutable, str):
        return mutable == MOMENTS_COLLECTION
    if isinstance(mutable, list | tuple | set | frozenset):
        return MOMENTS_COLLECTION in mutable
    return False


def reports_moments(module: nn.Module) -> bool:
    """Whether ``module`` (a training batch norm) reports its batch moments: only when the
    caller of ``apply`` names :data:`MOMENTS_COLLECTION` explicitly in ``mutable`` (a string, or
    in a list/tuple of them — ``jaxbn.update_bn`` does) and the collection reaches the module
    (inside ``nn.scan``/``nn.vmap`` it must be in ``variable_axes``).

    ``mutable=True`` or ``flax.core.DenyList("params")`` (common training loops) include the
    collection without naming it: a report there would be merged back into the variables,
    grow at every step and make ``jit`` retrace. Inside a lifted transform Flax rewrites the
    filter into the set of the collections it lifts, so the apply's own filter is read from its
    outermost module (Flax's module stack: the filter this very call was given, not a global).
    """
    if not module.is_mutable_collection(MOMENTS_COLLECTION):
        return False
    try:
        from flax.linen.module import _context  # the modules running now, outermost first

        outermost = next(m for m in _context.module_stack if m is not None)
        mutable = outermost.scope.root.mutable
    except (ImportError, AttributeError, StopIteration):  # another Flax: the module's own
        mutable = module.scope.mutable
    return _names_moments(mutable)


def report_moments(module: nn.Module, moments: Sequence[Any]) -> None:
    """Reports ``moments`` (one :class:`BatchMoments` per statistics update, in order) to
    :data:`MOMENTS_COLLECTION` under the module's kind, if :func:`reports_moments`."""
    if moments and reports_moments(module):
        for entry in moments:
            module.sow(MOMENTS_COLLECTION, type(module).batch_norm_kind, dict(entry._asdict()))


#: the keys of an ``nnx.Variable``'s sharding metadata (``flax.nnx`` reads them as one).
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def with_metadata(init: Initializer, metadata: Mapping[str, Any], name: str) -> Initializer:
    """``init`` whose value is boxed with ``metadata``, the metadata of
    :class:`jaxbn.nnx.BatchNorm`'s ``scale_metadata``/``bias_metadata``; ``init`` itself when
    there is none.

    The box is Flax's translation of an ``nnx.Param``'s metadata into Linen: sharding
    (``{"out_sharding": ("model",)}``; Flax's older ``sharding_names`` and ``sharding`` too;
    with an optional ``"mesh"``) is ``nn.Partitioned(value, names, mesh)`` — Linen's own
    sharding box, what ``nn.with_partitioning`` gives and ``nn.get_partition_spec`` reads, as
    ``nn.Partitioned.from_nnx_metadata`` converts it; any other metadata is
    ``flax.nnx.bridge.NNXMeta(nnx.Param, value, metadata)`` (what ``nnx.bridge.ToLinen`` stores;
    ``nnx.bridge.ToNNX`` restores the ``nnx.Param``). Like any boxed parameter, the module reads
    it unboxed, and ``init``'s variables hold the box (``nn.unbox`` strips it).
    """
    if not metadata:
        return init
    metadata = dict(metadata)
    sharding = [key for key in _SHARDING_KEYS if key in metadata]
    partitioned = bool(sharding) and set(metadata) <= {*sharding, "mesh"}

    def init_with_metadata(*args: Any) -> nn.meta.AxisMetadata:
        value = init(*args)
        if isinstance(value, nn.meta.AxisMetadata):
            raise TypeError(
                f"{name}_metadata was given and {name}_init returns a boxed value "
                f"({type(value).__name__}): give the metadata one way"
            )
        if partitioned:
            return nn.Partitioned(value, tuple(metadata[sharding[0]]), metadata.get("mesh"))
        return NNXMeta(nnx.Param, value, metadata)

    return init_with_metadata


def affine_params(module: nn.Module, features: int) -> tuple[jax.Array | None, jax.Array | None]:
    """A Linen norm's ``(scale, bias)`` [C] from its ``scale_init``/``bias_init`` (boxed with its
    ``scale_metadata``/``bias_metadata``), each None when its switches leave it out
    (:func:`jaxbn._module_logic.learned_params`: ``affine``, ``bias``, ``use_scale``,
    ``use_bias``)."""
    learn_scale, learn_bias = logic.learned_params(
        module.affine, module.bias, module.use_scale, module.use_bias
    )
    shape = (features,)

    def param(name: str, learned: bool) -> jax.Array | None:
        if not learned:
            return None
        init = with_metadata(
            getattr(module, f"{name}_init"), getattr(module, f"{name}_metadata"), name
        )
        return module.param(name, init, shape, module.param_dtype)

    return param("scale", learn_scale), param("bias", learn_bias)


def has_params(module: nn.Module) -> bool:
    """Whether a Linen batch norm learns ``scale`` or ``bias`` (what
    :func:`jaxbn._module_logic.input_features` needs to know)."""
    learned = logic.learned_params(module.affine, module.bias, module.use_scale, module.use_bias)
    return any(learned)


def running_stats(
    module: nn.Module, features: int, *, counter: bool = True
) -> tuple[Any, Any, Any]:
    """A Linen norm's ``batch_stats`` variables ``(mean, var, num_batches_tracked)``, created
    as zeros / ones / 0 and, when loaded, checked (shape, dtype; the error names them).

    With ``counter=False`` (a frozen norm: constants, no counter is ever read) a loaded tree
    without ``num_batches_tracked`` — torchvision's ``FrozenBatchNorm2d`` buffers — is used as
    it is, and the third element is None; init still creates the counter.
    """
    mean = module.variable(
        "batch_stats", "mean", lambda: jnp.zeros((features,), module.param_dtype)
    )
    var = module.variable("batch_stats", "var", lambda: jnp.ones((features,), module.param_dtype))
    count = None
    if counter or module.is_initializing() or module.has_variable("batch_stats", COUNTER):
        count = module.variable("batch_stats", COUNTER, lambda: jnp.zeros((), jnp.int32))
    where = "/".join(("batch_stats", *module.path))
    checked = jnp.zeros((), jnp.int32) if count is None else count.value
    logic.check_running_stats(where, logic.RunningStats(mean.value, var.value, checked), features)
    return mean, var, count


class BatchNorm(nn.Module):
    """Batch normalization with PyTorch's semantics over any input rank (see module docstring).

    Attributes:
      num_features: C, the size of the feature axis; inferred from the input when None.
      eps: added to the variance.
      momentum: weight of the new batch in the running average; None = cumulative average.
      affine: learn ``scale`` (init 1) and ``bias`` (init 0); False: neither (whatever
        ``bias``/``use_scale``/``use_bias`` say).
      track_running_stats: keep ``batch_stats``; if False, eval uses batch statistics too.
      axis: the feature axis (-1 channels-last; 1 for PyTorch's NC... layout).
      axis_name: mapped axis (pmap / shard_map) to sync statistics over, count-weighted
        (training only; eval needs no collective). Unset: ``jaxbn.sync_batch_norm`` decides.
      axis_index_groups: device groups within ``axis_name`` (pmap only).
      dtype: output dtype (default: the input's).
      param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var`` (float32
        also for half-precision inputs; float64 for float64 work).
      scale_init: initializer of ``scale``, Flax's signature ``(key, shape, dtype)``; default
        ones. ``nn.initializers.zeros_init()`` zero-initialises the last norm of a residual
        block (torchvision's ``zero_init_residual``).
      bias_init: initializer of ``bias``; default zeros.
      momentum_convention_checked: silences the
        :class:`~jaxbn.linen.batch_norm.MomentumConventionWarning` that a
        momentum above 0.5 gets (Flax's ``momentum=0.9`` is ``momentum=0.1`` here). Changes
        no number.
      bias: with ``affine``, learn ``bias`` (PyTorch 2.13's ``BatchNorm2d(C, bias=False)``:
        ``scale`` only; without ``affine`` nothing is learned either way, as in torch).
      use_scale, use_bias: ``flax.linen.BatchNorm``'s switches, each parameter apart (with
        ``affine``; ``use_bias=False`` is ``bias=False``). An absent parameter is absent from
        ``params``, as with ``affine=False``.
      scale_metadata, bias_metadata: metadata of the parameter, as
        :class:`jaxbn.nnx.BatchNorm`'s (e.g. ``{"out_sharding": ("model",)}``), stored boxed:
        sharding as ``nn.Partitioned``, anything else as ``flax.nnx.bridge.NNXMeta`` (see
        ``jaxbn.linen.batch_norm.with_metadata``). Flax Linen's own way, a boxed initializer
        (``scale_init=nn.with_partitioning(nn.initializers.ones, ("model",))``), works as
        well; give one or the other.

    Example:
        >>> import jax, jax.numpy as jnp, jaxbn
        >>> bn = jaxbn.BatchNorm()
        >>> x = jnp.arange(8.0).reshape(4, 2)                        # [N, C]
        >>> variables = bn.init(jax.random.key(0), x, train=False)
        >>> y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> updates["batch_stats"]["mean"]                      # 0.9·0 + 0.1·[3, 4]
        Array([0.3, 0.4], dtype=float32)
    """

    num_features: int | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    axis: int = -1
    axis_name: str | Sequence[str] | None = None
    axis_index_groups: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    momentum_convention_checked: bool = False
    # torch 2.13 / Flax switches and metadata, after the pinned fields (keyword in practice)
    bias: bool = True
    use_scale: bool = True
    use_bias: bool = True
    scale_metadata: Mapping[str, Any] = FrozenDict()
    bias_metadata: Mapping[str, Any] = FrozenDict()

    #: what jaxbn's tools read (``jaxbn.tools.layers.kind_of``); also the key of its reports.
    batch_norm_kind: ClassVar[str] = "trained"
    #: input ranks accepted (None: any) and the message when not; set by the 1d/2d/3d classes.
    expected_ranks: ClassVar[tuple[int, ...] | None] = None
    rank_message: ClassVar[str] = ""

    def __post_init__(self) -> None:
        logic.check_batch_norm_fields(self.num_features, self.eps, self.momentum, self.axis)
        logic.check_initializers(self.scale_init, self.bias_init)
        logic.learned_params(self.affine, self.bias, self.use_scale, self.use_bias)
        message = logic.momentum_convention_message(
            type(self).__name__, self.momentum, self.momentum_convention_checked
        )
        if message:
            warn_momentum_convention(message)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``: batch statistics in training (and updates the running ones), the
        running statistics in eval.

        Args:
          x: [N, ..., C], the features at ``axis`` (1d/2d/3d classes: the rank of
            ``torch.nn.BatchNorm1d/2d/3d``'s input).
          train: keyword, required: True normalizes with the batch's statistics and updates
            ``batch_stats`` (pass ``mutable=["batch_stats"]`` to ``apply``); False uses the
            running statistics and changes nothing.
          mask: optional boolean, broadcastable to ``x``: False elements do not count in the
            statistics (they may hold anything, NaN included) and output 0.

        Returns:
          ``y``, shaped like ``x``, in ``dtype`` (default: ``x``'s dtype).

        Raises:
          ValueError: an input of the wrong rank for a 1d/2d/3d class ("expected 4D input (got
            2D input)"), or one value per channel in training ("Expected more than 1 value per
            channel when training, got input size ...").
          RuntimeError: statistics or parameters whose size is not the input's channel count
            ("running_mean should contain 5 elements not 3").
          TypeError: ``train`` not given (it is required and keyword-only).

        Example:
            >>> import jax, jax.numpy as jnp, jaxbn
            >>> bn = jaxbn.BatchNorm2d(3)
            >>> x = jnp.ones((2, 4, 4, 3))                           # [N, H, W, C]
            >>> variables = bn.init(jax.random.key(0), x, train=False)
            >>> bn.apply(variables, x, train=False).shape
            (2, 4, 4, 3)
        """
        train = train_flag(train)
        x, features = logic.input_features(self, x, affine=has_params(self))
        weight, bias = self._affine_params(features)

        stats = None
        if self.track_running_stats:
            self._refuse_stats_without_counter()
            mean_v, var_v, count_v = running_stats(self, features)
            stats = logic.RunningStats(mean_v.value, var_v.value, count_v.value)

        y, new, moments = logic.batch_norm_call(
            self,
            x,
            weight,
            bias,
            stats,
            train=train,
            initializing=self.is_initializing(),
            mask=mask,
        )
        if new is not None:
            mean_v.value, var_v.value, count_v.value = new
            report_moments(self, [moments])
        return y

    # Helpers are nn.nowrap: a wrapped method is a call of its own for nn.tabulate, which then
    # runs it alone (compute_flops) and fails on a parameter created outside @compact.
    @nn.nowrap
    def _affine_params(self, features: int) -> tuple[jax.Array | None, jax.Array | None]:
        """``(scale, bias)``, each None when absent (``jaxbn.flax_compat`` leaves one out)."""
        return affine_params(self, features)

    @nn.nowrap
    def _refuse_stats_without_counter(self) -> None:
        # Statistics without a counter come from flax.linen.BatchNorm (biased variance) or from
        # an old PyTorch checkpoint (unbiased): guessing either would change numbers, so the
        # message names both conversions; a fresh tree (none of the three) is created as usual.
        names = ("mean", "var", COUNTER)
        present = [n for n in names if self.has_variable("batch_stats", n)]
        if present and len(present) < len(names):
            where = "/".join(("batch_stats", *self.path))
            missing = ", ".join(f"{where}/{n}" for n in names if n not in present)
            raise ValueError(
                f"{missing} missing next to {', '.join(present)}: statistics without a counter "
                "come from flax.linen.BatchNorm (biased running variance: convert them with "
                "jaxbn.from_flax_batch_norm(...), which states what it assumes) or from PyTorch "
                "(a state_dict older than 0.4.1, torchvision's FrozenBatchNorm2d: load it with "
                "jaxbn.interop.torch_to_flax, which adds the counter as torch does)"
            )


#: ``BatchNorm`` with ``torch.nn.BatchNorm1d/2d/3d``'s input-rank check.
BatchNorm1d, BatchNorm2d, BatchNorm3d = logic.rank_variants(BatchNorm)
