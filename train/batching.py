"""Which examples go into which batch: shuffled full training batches, padded eval batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def train_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index arrays of the epoch's full batches, shuffled by (seed, epoch).

    The last partial batch is dropped (a batch of one would make batch norm fail); the order
    depends only on seed and epoch, so a resumed run sees the same batches.
    """
    if batch_size > num_examples:
        raise ValueError(
            f"--batch-size {batch_size} is larger than the training set ({num_examples})"
        )
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    steps = num_examples // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, mask)`` per batch; every example exactly once, the last batch padded.

    Padding repeats example 0 and is masked out (mask False), so every batch has the same
    shape (one compilation) and divides across the devices.
    """
    for start in range(0, num_examples, batch_size):
        indices = np.arange(start, min(start + batch_size, num_examples))
        mask = np.ones(batch_size, bool)
        mask[len(indices) :] = False
        yield np.pad(indices, (0, batch_size - len(indices))), mask
