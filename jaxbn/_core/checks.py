"""Checks of user-given arguments: module fields, the ``train`` flag, inputs and variables.

Everything here runs at construction or trace time and raises with PyTorch's wording where
PyTorch has the case, so that nothing the math does not support is silently reinterpreted
(a complex input, ``train="no"``, a running mean of the wrong shape or an integer dtype).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_axis",
    "check_clipping",
    "check_eps",
    "check_feature_count",
    "check_floating_input",
    "check_momentum",
    "check_norm_eps",
    "check_running_stat",
    "check_shape",
    "is_real",
    "train_flag",
]

STATIC_TRAIN_HINT = (
    "make it static: jax.jit(f, static_argnames='train'), or under nn.remat pass train "
    "positionally to the block that holds the norm and mark it static: "
    "nn.remat(Block, static_argnums=(2,))(...)(x, train)"
)


def train_flag(value: Any, name: str = "train") -> bool:
    """``value`` as a Python bool; a traced, None or non-bool value is a TypeError."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if _concrete_scalar(value, jnp.bool_):
        return bool(value)
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python bool, but got a traced value; {STATIC_TRAIN_HINT}"
        )
    raise TypeError(f"{name} must be a Python bool (True or False), got {value!r}")


def check_feature_count(value: Any, name: str, *, allow_none: bool = True) -> None:
    """A size field: a non-negative int (PyTorch's message for a negative one)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    if value < 0:
        raise RuntimeError(f"Trying to create tensor with negative dimension {value}: [{value}]")


def check_shape(shape: Sequence[Any], name: str) -> None:
    for d in shape:
        check_feature_count(d, name, allow_none=False)


def _concrete_scalar(value: Any, kind) -> bool:
    """A concrete (untraced) 0-d numpy or JAX array of ``kind``'s dtype family."""
    if isinstance(value, jax.core.Tracer) or not isinstance(value, np.ndarray | jax.Array):
        return False
    return np.ndim(value) == 0 and jnp.issubdtype(value.dtype, kind)


def is_real(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    return isinstance(value, numbers.Real) or _concrete_scalar(value, jnp.number)


def check_momentum(momentum: Any) -> None:
    if momentum is None:
        return
    if not is_real(momentum):
        raise TypeError(
            f"momentum must be float or None, not {type(momentum).__name__} ({momentum!r})"
        )


def check_eps(eps: Any) -> None:
    """A batch norm's ``eps`` field: a real number. Its value is checked where PyTorch checks
    it, when the layer runs (at trace time, in :func:`jaxbn.functional.batch_norm`): ``eps <= 0``
    in training is "batch_norm eps must be positive during training, but got …", ``eps < 0``
    in eval "batch_norm eps must be non-negative, but got …"; ``torch.nn.BatchNorm1d(10,
    eps=-1.0)`` itself is built."""
    if not is_real(eps):
        raise TypeError(f"eps must be float, not {type(eps).__name__} ({eps!r})")


def check_norm_eps(eps: Any) -> None:
    """GroupNorm's and LayerNorm's ``eps``: a real number, not negative. PyTorch has no check
    there and returns NaN; refused when the module is built instead."""
    check_eps(eps)
    if eps < 0:
        raise ValueError(f"eps must be non-negative, but got {eps}")


def check_axis(axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, not {type(axis).__name__} ({axis!r})")


def check_floating_input(x: jax.Array, op: str) -> None:
    """Complex input is refused (PyTorch: not implemented), never reduced to its real part."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f'"{op}" not implemented for complex input (dtype {x.dtype})')


def check_running_stat(value: Any, name: str, channels: int) -> None:
    """A running statistic: shape ``(channels,)`` and a floating dtype."""
    if value is None:
        return
    shape = tuple(jnp.shape(value))
    if shape != (channels,):
        raise ValueError(f"{name} should have shape ({channels},), got {shape}")
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {dtype}")


def check_clipping(r_max: Any, d_max: Any) -> None:
    """Batch Renormalization's clipping: ``r_max ≥ 1``, ``d_max ≥ 0`` (traced values pass)."""
    for name, value, low in (("r_max", r_max, 1), ("d_max", d_max, 0)):
        if isinstance(value, jax.core.Tracer):
            continue  # a schedule's traced value cannot be checked at trace time
        if not is_real(value):
            raise TypeError(f"{name} must be a float, not {type(value).__name__} ({value!r})")
        if not float(value) >= low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
