"""Train a CIFAR-style ResNet-18 built from the tutorial's ResidualBlock.

Usage:
    python -m train.resnet --use-bn                          # bundled digits
    python -m train.resnet --use-bn --dataset cifar10        # CIFAR-10 from --data-dir

Prints one line per epoch (train/test loss and accuracy). On digits with the defaults
(5 epochs, batch 64, lr 0.05) the BN model reaches about 97-99% test accuracy.
"""

from __future__ import annotations

import sys

from train.cli import Defaults, run_cli

DEFAULTS = Defaults(epochs=5, batch_size=64, lr=0.05)


def make_model(config, data):
    """The model for ``config`` (a ``train.config.RunConfig``) and ``data``."""
    from jaxbn.models import ResNet
    from train.loop import dtype_of

    return ResNet(
        (2, 2, 2, 2),
        (64, 128, 256, 512),
        num_classes=data.num_classes,
        norm=config.norm,
        bn_momentum=config.bn_momentum,
        dtype=dtype_of(config),
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m train.resnet", __doc__, DEFAULTS, make_model, argv)


if __name__ == "__main__":
    sys.exit(main())
