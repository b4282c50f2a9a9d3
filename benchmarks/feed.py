"""How batches reach the device: host slicing per step, host slicing with prefetch, or the
dataset resident on the device and gathered there (``train.feed``).

Usage:
    python -m benchmarks.feed               # train.cnn --use-bn's step on digits, 4 epochs
    python -m benchmarks.feed --quick       # a smoke run

Prints the mean step time (epochs after the first, the same compiled step for all three) and
the ratio to host slicing. The loop is the training loop's: no host sync inside an epoch.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax

from benchmarks.timing import script_parser
from train import cnn
from train.batching import train_batches
from train.cli import parse_args
from train.datasets import load_dataset
from train.feed import DeviceFeed, HostFeed
from train.loop import create_state, make_optimizer
from train.parallel import DataParallel


class PlainHostFeed(HostFeed):
    """The loop before: slice and send each batch when the step needs it."""

    name = "host batches"

    def train(self, seed, epoch, start_step=0):
        d = self.data
        for i in train_batches(len(d.y_train), self.batch_size, seed, epoch)[start_step:]:
            yield self.parallel.shard(d.x_train[i], d.y_train[i])


def main(argv: list[str] | None = None) -> int:
    parser = script_parser("python -m benchmarks.feed", __doc__)
    parser.add_argument("--quick", action="store_true", help="2 epochs (smoke)")
    quick = parser.parse_args(argv).quick
    args = parse_args("bench", "", cnn.DEFAULTS, ["--use-bn"])
    data = load_dataset("digits")
    parallel = DataParallel(1)
    steps = len(data.y_train) // args.batch_size
    tx = make_optimizer(args, steps * 10)
    model = cnn.make_model(args, data)
    step = parallel.train_step(model, tx, args.batch_size)
    epochs = 2 if quick else 4
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; ConvNet, digits, batch 64")
    results = {}
    for cls in (PlainHostFeed, HostFeed, DeviceFeed):
        feed = cls(parallel, data, args.batch_size)
        state = create_state(model, tx, data, 0, parallel)
        times = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            for x, y in feed.train(0, epoch):
                state, metrics = step(state, x, y)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / steps)
        results[cls.name] = statistics.mean(times[1:])
    base = results[PlainHostFeed.name]
    for name, seconds in results.items():
        print(f"{name:<28} {seconds * 1e3:8.2f} ms/step  {seconds / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
