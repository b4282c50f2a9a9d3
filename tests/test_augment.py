"""train.augment: random crop of the zero-padded image and horizontal flip, per example,
against a numpy reference that uses the same draws."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.augment import augment_batch, augment_draws


def reference(images, offsets, flips, padding):
    """numpy: pad with zeros, crop at the drawn corner, mirror along W where drawn."""
    images, offsets, flips = np.asarray(images), np.asarray(offsets), np.asarray(flips)
    _, h, w, _ = images.shape
    p = padding
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    out = []
    for image, (i, j), flip in zip(padded, offsets, flips, strict=True):
        crop = image[i : i + h, j : j + w]
        out.append(crop[:, ::-1] if flip else crop)
    return np.stack(out)


def distinct_images(n=32, h=6, w=5, c=3, dtype=np.float32):
    """Every pixel different and none zero, so that any wrong offset or flip shows."""
    return (np.arange(n * h * w * c).reshape(n, h, w, c) + 1).astype(dtype)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_the_batch_equals_the_numpy_reference_on_the_same_draws(padding):
    key = jax.random.key(3)
    images = distinct_images()
    offsets, flips = augment_draws(key, len(images), padding=padding)
    out = augment_batch(key, jnp.asarray(images), padding=padding)
    np.testing.assert_array_equal(np.asarray(out), reference(images, offsets, flips, padding))


def test_a_padding_larger_than_the_image_crops_mostly_zeros_exactly():
    key = jax.random.key(4)
    images = distinct_images(n=16, h=2, w=3)
    offsets, flips = augment_draws(key, 16, padding=5)
    out = augment_batch(key, jnp.asarray(images), padding=5)
    np.testing.assert_array_equal(np.asarray(out), reference(images, offsets, flips, 5))


def test_the_same_draws_under_jit_and_with_a_legacy_key():
    key = jax.random.PRNGKey(7)
    images = distinct_images()
    jitted = jax.jit(functools.partial(augment_batch, padding=2))
    offsets, flips = augment_draws(key, len(images), padding=2)
    np.testing.assert_array_equal(
        np.asarray(jitted(key, jnp.asarray(images))), reference(images, offsets, flips, 2)
    )


def test_under_jit_of_vmap_each_group_is_augmented_with_its_own_key():
    keys = jax.random.split(jax.random.key(5), 3)
    groups = distinct_images(n=3 * 8).reshape(3, 8, 6, 5, 3)
    out = jax.jit(jax.vmap(augment_batch))(keys, jnp.asarray(groups))
    for key, images, got in zip(keys, groups, out, strict=True):
        offsets, flips = augment_draws(key, 8)
        np.testing.assert_array_equal(np.asarray(got), reference(images, offsets, flips, 4))


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.bfloat16, jnp.float16])
def test_the_dtype_and_shape_are_kept(dtype):
    images = jnp.asarray(distinct_images(n=4) % 200).astype(dtype)
    out = augment_batch(jax.random.key(0), images)
    assert out.dtype == images.dtype and out.shape == images.shape


def test_offsets_cover_every_position_evenly_and_about_half_are_flipped():
    padding, n = 3, 7000  # 7 positions per axis: about 1000 each, standard deviation about 30
    offsets, flips = augment_draws(jax.random.key(11), n, padding=padding)
    offsets = np.asarray(offsets)
    assert offsets.dtype == np.int32 and offsets.shape == (n, 2)
    for axis in (0, 1):
        counts = np.bincount(offsets[:, axis], minlength=2 * padding + 1)
        assert len(counts) == 2 * padding + 1  # nothing outside 0 .. 2 * padding
        assert counts.min() > 0.8 * n / len(counts) and counts.max() < 1.2 * n / len(counts)
    # rows and columns are drawn independently: not the same number twice
    assert np.mean(offsets[:, 0] == offsets[:, 1]) < 0.25
    assert abs(np.asarray(flips).mean() - 0.5) < 0.03


def test_the_same_key_gives_the_same_batch():
    images = jnp.asarray(distinct_images())
    first = augment_batch(jax.random.key(9), images)
    second = augment_batch(jax.random.key(9), images)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_different_keys_give_different_batches():
    images = jnp.asarray(distinct_images())
    first = augment_batch(jax.random.key(1), images)
    second = augment_batch(jax.random.key(2), images)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


def test_padding_zero_only_flips():
    images = distinct_images()
    out = np.asarray(augment_batch(jax.random.key(6), jnp.asarray(images), padding=0))
    flipped = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(out == images, axis=(1, 2, 3))
    assert np.all(flipped ^ kept) and flipped.any() and kept.any()


@pytest.mark.parametrize("shape", [(6, 5, 3), (2, 1, 6, 5, 3)])
def test_input_that_is_not_4d_is_refused(shape):
    with pytest.raises(ValueError) as caught:
        augment_batch(jax.random.key(0), jnp.zeros(shape))
    assert str(caught.value) == f"augment_batch expects images [N, H, W, C], got shape {shape}"


@pytest.mark.parametrize("padding", [-1, 1.5, True])
def test_a_padding_that_is_not_a_nonnegative_int_is_refused(padding):
    with pytest.raises(ValueError) as caught:
        augment_batch(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), padding=padding)
    assert str(caught.value) == f"padding must be an int >= 0, got {padding!r}"
