"""Train the tutorial's ConvNet (conv 64/128/256 + BatchNorm2d, classifier 512 + BatchNorm1d).

Usage:
    python -m train.cnn --use-bn                    # bundled digits (scikit-learn), no download
    python -m train.cnn --use-bn --devices 4        # data-parallel, BN synced across devices
    python -m train.cnn --norm group                # GroupNorm instead (small batches)

Prints one line per epoch (train/test loss and accuracy). On digits with the defaults
(10 epochs, batch 64, lr 0.05) the BN model reaches about 98-99% test accuracy.
"""

from __future__ import annotations

import sys

from train.cli import Defaults, run_cli

DEFAULTS = Defaults(epochs=10, batch_size=64, lr=0.05)


def make_model(config, data):
    """The model for ``config`` (a ``train.config.RunConfig``) and ``data``."""
    from jaxbn.models import ConvNet
    from train.loop import dtype_of

    return ConvNet(
        num_classes=data.num_classes,
        norm=config.norm,
        bn_momentum=config.bn_momentum,
        dtype=dtype_of(config),
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m train.cnn", __doc__, DEFAULTS, make_model, argv)


if __name__ == "__main__":
    sys.exit(main())
