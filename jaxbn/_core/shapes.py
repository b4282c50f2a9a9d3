"""Shapes, counts and dtypes of the per-channel statistics, and shard_map's axis types."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._core.checks import check_axis

Axes = tuple[int, ...]


def kept_shape(shape: tuple[int, ...], reduce_axes: Axes) -> tuple[int, ...]:
    """``shape`` with ``reduce_axes`` set to 1: the shape of a per-channel statistic."""
    return tuple(1 if i in reduce_axes else d for i, d in enumerate(shape))


def reduced_count(shape: tuple[int, ...], reduce_axes: Axes) -> int:
    """How many elements each statistic is taken over."""
    return int(np.prod([shape[a] for a in reduce_axes], dtype=np.int64))


def compute_dtype(*dtypes_or_arrays) -> jnp.dtype:
    # Half precision is normalized in float32 (as PyTorch does); float64 stays float64.
    return jnp.result_type(jnp.float32, *dtypes_or_arrays)


def varying_axes(array) -> frozenset:
    """The mesh axes ``array`` varies over inside shard_map (empty elsewhere)."""
    aval = jax.typeof(array)
    manual = getattr(aval, "mat", None)  # jax >= 0.10; older versions call it `vma`
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def feature_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative index into a ``ndim``-D input (checked: an int, in range)."""
    check_axis(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}D input")
    return axis % ndim


def as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """An int or a sequence of ints as a shape tuple."""
    if isinstance(shape, numbers.Integral):
        return (int(shape),)
    return tuple(int(d) for d in shape)
