"""Data augmentation for image batches: random crop of the zero-padded image and horizontal flip.

The standard CIFAR-10 recipe (pad 4, crop back to the original size, flip half of the images),
drawn independently per example, in pure JAX: jittable, and usable under ``vmap`` (for example
one key per device or per group). torchvision's ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()`` does the same per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment_draws(
    key: jax.Array, batch_size: int, *, padding: int = 4
) -> tuple[jax.Array, jax.Array]:
    """The random choices :func:`augment_batch` makes for ``key``.

    Args:
      key: a JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      batch_size: N, the number of examples.
      padding: pixels of zeros added on each side before cropping; a Python int >= 0.

    Returns:
      ``(offsets, flips)``: ``offsets: [N, 2]`` int32, the (row, column) of each crop's top-left
      corner in the padded image, each uniform in ``0 .. 2 * padding``; ``flips: [N]`` bool, True
      (probability 1/2) where the crop is mirrored left to right.
    """
    _check_padding(padding)
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (batch_size, 2), 0, 2 * padding + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    return offsets, flips


def augment_batch(key: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Per example: zero-pad by ``padding`` pixels on each side, crop a random window of the
    original size, and mirror it left to right with probability 1/2.

    Args:
      key: a JAX PRNG key; the same key gives the same result (see :func:`augment_draws`).
      images: ``[N, H, W, C]``, any dtype.
      padding: a Python int >= 0 (static under ``jit``); 0 leaves only the flips.

    Returns:
      ``[N, H, W, C]`` in the dtype of ``images``: for example ``n`` with offsets ``(i, j)``,
      ``pad(images[n])[i:i + H, j:j + W]``, then reversed along W where flipped.

    Raises:
      ValueError: ``images`` is not 4-D, or ``padding`` is not an int >= 0.

    Example:
      >>> x = jnp.ones((8, 32, 32, 3))
      >>> augment_batch(jax.random.key(0), x).shape
      (8, 32, 32, 3)
    """
    if images.ndim != 4:
        raise ValueError(
            f"augment_batch expects images [N, H, W, C], got shape {tuple(images.shape)}"
        )
    n, h, w, c = images.shape
    offsets, flips = augment_draws(key, n, padding=padding)
    p = padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1, :], crop)

    return jax.vmap(one)(padded, offsets, flips)


def _check_padding(padding: int) -> None:
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
