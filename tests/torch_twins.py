"""Layout helpers shared by the tests that use PyTorch as the oracle.

PyTorch is channels-first (N, C, ...); jaxbn defaults to channels-last (N, ..., C).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch


def to_jax(t: torch.Tensor, channels_last: bool) -> jnp.ndarray:
    """A torch (N, C, ...) tensor as a jax array, moved to (N, ..., C) when channels_last."""
    t = t.detach().cpu()
    bf16 = t.dtype == torch.bfloat16  # numpy has no bfloat16: go through float32 (exact)
    a = (t.float() if bf16 else t).numpy()
    a = jnp.asarray(np.moveaxis(a, 1, -1) if channels_last else a)
    return a.astype(jnp.bfloat16) if bf16 else a


def to_numpy(a, channels_last: bool) -> np.ndarray:
    """A jax (N, ..., C) (or (N, C, ...)) array as numpy in torch's (N, C, ...) layout."""
    a = np.asarray(a)
    return np.moveaxis(a, -1, 1) if channels_last else a


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))
