"""PyTorch's running-statistics update, from a batch's :class:`BatchMoments`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BatchMoments(NamedTuple):
    """A training batch's statistics per channel, merged over devices when synced.

    What :func:`jaxbn.functional.batch_norm_with_moments` returns in training (None in eval),
    and what ``jaxbn.update_bn`` averages.

    Args:
      count: [C] the elements that counted (a mask's False elements do not).
      mean: [C] the batch mean.
      var: [C] the **biased** batch variance.

    Each is in the compute dtype (float32, or float64 for float64 input).

    Raises:
      TypeError: a field missing, as any ``NamedTuple`` (``BatchMoments.__new__() missing 1
        required positional argument: 'var'``).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxbn import functional as F
        >>> x = jnp.arange(8.0).reshape(4, 2)                           # [N, C]
        >>> moments = F.batch_norm_with_moments(x, None, None, None, None, True, 0.1, 1e-5)[3]
        >>> print(moments.count, moments.mean, moments.var)
        [4. 4.] [3. 4.] [5. 5.]
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array


def update_running(
    running_mean: jax.Array, running_var: jax.Array, moments: BatchMoments, momentum
) -> tuple[jax.Array, jax.Array]:
    """``(1 - momentum)·old + momentum·new`` with the unbiased variance ``var·n/(n-1)``.

    Args:
      running_mean, running_var: [C] floats.
      moments: the batch's :class:`BatchMoments` ([C] each).
      momentum: the new batch's weight (float or traced scalar).

    Returns:
      ``(new_mean, new_var)`` in the running statistics' dtypes. A channel with no element
      keeps both; one with a single element keeps its variance (no unbiased variance exists).
    """
    count, mean, var = (jax.lax.stop_gradient(a) for a in moments)
    unbiased = var * count / jnp.maximum(count - 1, 1)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * unbiased
    new_mean = jnp.where(count > 0, new_mean, running_mean).astype(running_mean.dtype)
    new_var = jnp.where(count > 1, new_var, running_var).astype(running_var.dtype)
    return new_mean, new_var
