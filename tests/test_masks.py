"""Masked batch norm equals batch norm on the selected elements; masked slots never leak."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbn import functional as F


def normal(seed, shape):
    """float32 N(0, 1) data from numpy (JAX's generator compiles for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def masked_and_selected(x, keep_rows, momentum=0.1):
    """(masked run over all rows, plain run over the kept rows) with their gradients."""
    mask = jnp.asarray(keep_rows)[:, None]
    weight, bias = jnp.array([1.5, 0.5, 2.0]), jnp.array([0.1, -0.2, 0.3])
    g = normal(9, x.shape)

    def masked(x, w, b):
        y, m, v = F.batch_norm(x, jnp.zeros(3), jnp.ones(3), w, b, True, momentum, mask=mask)
        return jnp.sum(jnp.where(mask, y * g, 0)), (y, m, v)

    def selected(x, w, b):
        y, m, v = F.batch_norm(x, jnp.zeros(3), jnp.ones(3), w, b, True, momentum)
        return jnp.sum(y * g[np.asarray(keep_rows)]), (y, m, v)

    # jitted: one compile each instead of one per operation of the forward and backward pass
    full = jax.jit(jax.grad(masked, (0, 1, 2), has_aux=True))(x, weight, bias)
    sub = jax.jit(jax.grad(selected, (0, 1, 2), has_aux=True))(
        x[np.asarray(keep_rows)], weight, bias
    )
    return full, sub


def test_masked_rows_give_the_statistics_outputs_and_grads_of_the_selected_rows():
    x = normal(0, (10, 3)) * 2 + 1
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)
    ((dx, dw, db), (y, m, v)), ((sdx, sdw, sdb), (sy, sm, sv)) = masked_and_selected(x, keep)
    np.testing.assert_allclose(y[keep], sy, atol=1e-5)
    np.testing.assert_allclose(m, sm, atol=1e-6)
    np.testing.assert_allclose(v, sv, atol=1e-5)
    np.testing.assert_allclose(dx[keep], sdx, atol=1e-5)
    np.testing.assert_allclose(dw, sdw, atol=1e-5)
    np.testing.assert_allclose(db, sdb, atol=1e-5)


def test_masked_slots_holding_nan_do_not_leak():
    x = normal(0, (8, 3))
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    x = x.at[~keep].set(jnp.nan)
    ((dx, dw, db), (y, m, v)), _ = masked_and_selected(x, keep)
    for a in (y, m, v, dx, dw, db):
        assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(y[~keep], 0)
    np.testing.assert_array_equal(dx[~keep], 0)


def test_a_per_element_mask_counts_each_channel_separately():
    x = normal(1, (6, 2))
    mask = jnp.array([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 0]], bool)
    _, m, v = F.batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True, momentum=1.0, mask=mask)
    for c in range(2):
        sel = np.asarray(x)[np.asarray(mask)[:, c], c]
        np.testing.assert_allclose(m[c], sel.mean(), rtol=1e-5)
        np.testing.assert_allclose(v[c], sel.var(ddof=1), rtol=1e-5)


@pytest.mark.parametrize("kept", [0, 1])
def test_channels_with_fewer_than_two_selected_values_update_only_what_can_be_estimated(kept):
    # 0 values: nothing to average in. 1 value: a mean exists, an unbiased variance does not.
    x = jnp.arange(8.0).reshape(4, 2)
    mask = (jnp.arange(4) < kept)[:, None]
    y, m, v = F.batch_norm(x, jnp.full(2, 5.0), jnp.full(2, 7.0), training=True, mask=mask)
    assert bool(jnp.all(jnp.isfinite(y)))
    expected_mean = 0.9 * 5.0 + 0.1 * np.asarray(x[0]) if kept else np.full(2, 5.0)
    np.testing.assert_allclose(m, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(v, 7.0)
