"""How the batches reach the devices: the whole dataset kept on the devices and indexed there,
or host batches sent ahead of the step that needs them.

Which one a run uses is chosen by :func:`make_feed`:

* :class:`DeviceFeed` — when the dataset fits (digits, MNIST, Fashion-MNIST and CIFAR-10 all
  do: CIFAR-10's training set is 600 MB in float32), the arrays are put on every device once, each
  epoch's shuffled order goes over as one ``[steps, batch]`` index array, and a step's batch is
  gathered on the device by a jitted call that returns it already split over the mesh. Per step
  nothing is sliced or copied on the host and nothing waits for the host, so JAX can queue step
  ``i + 1`` while step ``i`` runs. This is what a JAX practitioner does with data that fits.
* :class:`HostFeed` — otherwise: batches sliced from the host arrays, with the next
  ``PREFETCH`` batches' transfers issued before the current batch is handed out (``device_put``
  is asynchronous on accelerators, so the copies overlap the running step).

Measured on the CPU with ``python -m benchmarks.feed`` (``train.cnn --use-bn``'s step on digits,
batch 64, mean step time of epochs 2-4; 2 cores shared with other jobs, load average ~5): two
runs gave host slicing / prefetched / device-resident 125 / 67 / 125 and 208 / 224 / 124 ms per
step — no difference above this machine's noise, as expected: on the CPU the "device" is host
memory and a batch of digits is 16 KB. The choice is made for accelerators: there the host path
costs a host-side gather and a PCIe copy per step (prefetch only hides them), the
device-resident path neither, its only per-step host work being a scalar (the step index).
Hence device-resident data whenever it fits in a quarter of a device's memory, prefetched host
batches otherwise.

Both give the batches bit for bit (a gather copies values); the batch order is
``train.batching``'s, so a resumed run sees the same batches either way.

With ``augment`` (``--augment``, on by default for CIFAR-10) every training batch goes through
``train.augment.augment_batch`` (random crops of the 4-pixel zero-padded images, horizontal
flips) on the device, inside the same jitted call that gathers it (``DeviceFeed``) or right
after the transfer (``HostFeed``). Its key is ``--seed``'s augmentation key folded with the
epoch and the step, so the augmented batches depend only on (seed, epoch, step): a resumed run,
mid-epoch included, sees the same ones, and no host sync is added (the step and epoch go in as
scalars). Evaluation batches are never augmented.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np

from train.augment import augment_batch
from train.batching import eval_batches, train_batches
from train.config import RunConfig
from train.datasets import Dataset

PREFETCH = 2  # batches in flight ahead of the step (HostFeed)
DEVICE_SHARE = 0.25  # DeviceFeed if the data takes at most this share of a device's memory
UNKNOWN_MEMORY_BUDGET = 2 * 2**30  # bytes, when the device does not report its memory
AUGMENT_STREAM = 0x617567  # folded into jax.random.key(seed): augmentation's own stream


def make_feed(parallel, data: Dataset, config: RunConfig, *, place: str = "auto"):
    """A :class:`DeviceFeed` if ``data`` fits on the devices (``place="auto"``), else a
    :class:`HostFeed`; ``place="device"`` or ``"host"`` forces the choice. ``config`` gives the
    batch size and whether to augment."""
    if place == "auto":
        place = "device" if fits_on_device(data) else "host"
    cls = DeviceFeed if place == "device" else HostFeed
    return cls(parallel, data, config.batch_size, augment=config.augment)


def augment_key(seed: int) -> np.ndarray:
    """The raw key data (uint32) of ``seed``'s augmentation stream; per step it is folded with
    the epoch and the step on the device (:func:`augmented`)."""
    key = jax.random.fold_in(jax.random.key(seed), AUGMENT_STREAM)
    return np.asarray(jax.device_get(jax.random.key_data(key)))


def augmented(x: jax.Array, key_data: jax.Array, epoch, step) -> jax.Array:
    """``x`` (a training batch) augmented with the key of (seed, epoch, step); traceable."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), epoch), step)
    return augment_batch(key, x)


def fits_on_device(data: Dataset) -> bool:
    """Whether the dataset takes at most :data:`DEVICE_SHARE` of the first device's memory
    (host memory on the CPU backend: always yes there)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return True
    size = sum(a.nbytes for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends do not implement memory_stats
        limit = None
    budget = DEVICE_SHARE * limit if limit else UNKNOWN_MEMORY_BUDGET
    return size <= budget


class HostFeed:
    """Batches sliced on the host and sent to the devices :data:`PREFETCH` steps ahead."""

    name = "host batches, prefetched"

    def __init__(self, parallel, data: Dataset, batch_size: int, *, augment: bool = False):
        self.parallel, self.data, self.batch_size = parallel, data, batch_size
        self.augment = _Augmenter(parallel) if augment else None

    def train(self, seed: int, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        """``(x, y)`` of the epoch's batches from ``start_step`` on, split over the mesh."""
        d = self.data
        batches = train_batches(len(d.y_train), self.batch_size, seed, epoch)
        sent = (
            (step, self.parallel.shard(d.x_train[batches[step]], d.y_train[batches[step]]))
            for step in range(start_step, len(batches))
        )
        if self.augment is None:
            return _ahead(batch for _, batch in sent)
        return _ahead((self.augment(x, seed, epoch, step), y) for step, (x, y) in sent)

    def test(self) -> Iterator[tuple]:
        """``(x, y, mask)`` of the padded test batches (see ``train.batching.eval_batches``)."""
        d = self.data
        return _ahead(
            self.parallel.shard(d.x_test[i], d.y_test[i], mask)
            for i, mask in eval_batches(len(d.y_test), self.batch_size)
        )


class DeviceFeed:
    """The dataset on every device of the mesh (replicated), batches gathered there."""

    name = "device-resident data"

    def __init__(self, parallel, data: Dataset, batch_size: int, *, augment: bool = False):
        self.parallel, self.data, self.batch_size = parallel, data, batch_size
        self.augment = _Augmenter(parallel) if augment else None
        self.train_arrays = parallel.replicate((data.x_train, data.y_train))
        self.test_arrays = parallel.replicate((data.x_test, data.y_test))
        split = parallel.split
        self._gather = jax.jit(_gather, out_shardings=(split, split))
        self._gather_augmented = jax.jit(_gather_augmented, out_shardings=(split, split))
        self._gather_masked = jax.jit(_gather_masked, out_shardings=(split, split, split))
        test = list(eval_batches(len(data.y_test), batch_size))
        self._test_order = parallel.replicate(
            (np.stack([i for i, _ in test]).astype(np.int32), np.stack([m for _, m in test]))
        )

    def train(self, seed: int, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        batches = train_batches(len(self.data.y_train), self.batch_size, seed, epoch)
        order = self.parallel.replicate(np.stack(batches).astype(np.int32))
        x, y = self.train_arrays
        if self.augment is None:
            for step in range(start_step, len(batches)):
                yield self._gather(x, y, order, step)
            return
        key_data = self.augment.key_data(seed)
        for step in range(start_step, len(batches)):
            yield self._gather_augmented(x, y, order, step, key_data, epoch)

    def test(self) -> Iterator[tuple]:
        x, y = self.test_arrays
        order, masks = self._test_order
        for step in range(order.shape[0]):
            yield self._gather_masked(x, y, order, masks, step)


def _gather(x, y, order, step):
    rows = order[step]
    return x[rows], y[rows]


def _gather_augmented(x, y, order, step, key_data, epoch):
    rows = order[step]
    return augmented(x[rows], key_data, epoch, step), y[rows]


class _Augmenter:
    """The jitted augmentation of a batch already split over the mesh (``HostFeed``), and
    each seed's key data, replicated (computed once per seed)."""

    def __init__(self, parallel):
        self.parallel, self.keys = parallel, {}
        self._augment = jax.jit(augmented, out_shardings=parallel.split)

    def key_data(self, seed: int) -> jax.Array:
        if seed not in self.keys:
            self.keys[seed] = self.parallel.replicate(augment_key(seed))
        return self.keys[seed]

    def __call__(self, x: jax.Array, seed: int, epoch: int, step: int) -> jax.Array:
        return self._augment(x, self.key_data(seed), epoch, step)


def _gather_masked(x, y, order, masks, step):
    rows = order[step]
    return x[rows], y[rows], masks[step]


def _ahead(batches: Iterator[tuple]) -> Iterator[tuple]:
    """Yields ``batches`` while keeping the next :data:`PREFETCH` already requested."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(batch)
        if len(queue) > PREFETCH:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
