"""The bundled digits cut down for quick training runs: the first ``n_train`` training and
``n_test`` test examples (96 and 37 by default; 37 is prime, so a last batch is partial)."""

from __future__ import annotations

from train.datasets import Dataset, load_dataset

DIGITS = load_dataset("digits")


def tiny(n_train: int = 96, n_test: int = 37) -> Dataset:
    return Dataset(
        "digits-tiny",
        DIGITS.x_train[:n_train].copy(),
        DIGITS.y_train[:n_train].copy(),
        DIGITS.x_test[:n_test].copy(),
        DIGITS.y_test[:n_test].copy(),
        10,
    )
