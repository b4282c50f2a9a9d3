"""Datasets for the training scripts, as float32 NHWC arrays standardized on the training split.

* ``digits`` — scikit-learn's 8×8 handwritten digits (1,797 images, shipped inside the package:
  no network). A fixed stratified 80/20 split: 1,437 train, 360 test.
* ``mnist``, ``fashion_mnist`` — 28×28 grey, read from ``DATA_DIR/MNIST/raw`` and
  ``DATA_DIR/FashionMNIST/raw`` (the IDX ``.gz`` files, torchvision's layout).
* ``cifar10`` — 32×32 RGB, read from ``DATA_DIR/cifar-10-batches-py`` (torchvision's layout);
  the archive ``cifar-10-python.tar.gz`` is extracted there when only it is present.

Every file is checked against its published MD5 before it is read — CIFAR-10's pickles are
never unpickled unverified (and then only with an unpickler that admits numpy arrays alone).
Missing files are downloaded with a progress bar, unless downloads are off or there is no
network, in which case the error says where to put which files.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import pickle
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from train.download import fetch, verify


@dataclass
class Dataset:
    """Images [N, H, W, C] float32 (standardized), integer labels [N]."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


IDX_FILES = {
    "mnist": (
        "MNIST",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def load_dataset(
    name: str,
    data_dir: str | pathlib.Path = "data",
    *,
    download: bool = True,
    checksums: Mapping[str, str] | None = None,
    base_url: str | None = None,
) -> Dataset:
    """Loads ``name`` (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``).

    ``checksums`` and ``base_url`` replace the published ones (for tests and mirrors).
    """
    data_dir = pathlib.Path(data_dir)
    if name == "digits":
        return _standardized("digits", *_digits(), 10)
    if name in IDX_FILES:
        return _standardized(name, *_idx_dataset(name, data_dir, download, checksums, base_url), 10)
    if name == "cifar10":
        return _standardized("cifar10", *_cifar10(data_dir, download, checksums, base_url), 10)
    raise ValueError(f"unknown dataset {name!r}")


def _standardized(name, x_train, y_train, x_test, y_test, num_classes) -> Dataset:
    # Per-channel statistics of the training split only: nothing leaks from the test set.
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True)
    scale = lambda x: ((x - mean) / std).astype(np.float32)
    return Dataset(
        name,
        scale(x_train),
        y_train.astype(np.int32),
        scale(x_test),
        y_test.astype(np.int32),
        num_classes,
    )


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def _how_to(folder: pathlib.Path, files, url: str) -> str:
    return (
        f"Put {', '.join(files)} into {folder} (downloaded from {url}; torchvision's "
        "download=True writes the same layout), or run with network access."
    )


def _idx_dataset(name, data_dir, download, checksums, base_url):
    folder_name, url, published = IDX_FILES[name]
    checksums = {**published, **(checksums or {})}
    url = base_url or url
    folder = data_dir / folder_name / "raw"
    arrays = {}
    for filename in published:
        path = folder / filename
        fetch(
            url + filename,
            path,
            checksums[filename],
            download=download,
            how_to=_how_to(folder, published, url),
        )
        arrays[filename] = read_idx(gzip.decompress(path.read_bytes()))
    x_train = arrays["train-images-idx3-ubyte.gz"][..., None] / np.float32(255)
    x_test = arrays["t10k-images-idx3-ubyte.gz"][..., None] / np.float32(255)
    return (
        x_train,
        arrays["train-labels-idx1-ubyte.gz"],
        x_test,
        arrays["t10k-labels-idx1-ubyte.gz"],
    )


def read_idx(data: bytes) -> np.ndarray:
    """Parses an IDX file (big-endian header: 0, 0, type 0x08 = uint8, ndim; then the dims)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"IDX body has {body.size} bytes, header says {dims}")
    return body.reshape(dims)


def _cifar10(data_dir, download, checksums, base_url):
    checksums = {**CIFAR10_FILES, **(checksums or {})}
    folder = data_dir / "cifar-10-batches-py"
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / b).exists() for b in batches):
        archive = data_dir / "cifar-10-python.tar.gz"
        url = base_url + "cifar-10-python.tar.gz" if base_url else CIFAR10_URL
        fetch(
            url,
            archive,
            checksums["cifar-10-python.tar.gz"],
            download=download,
            how_to=_how_to(data_dir, ["cifar-10-python.tar.gz"], url),
        )
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")  # no absolute paths, links or devices
    parts = []
    for batch in batches:
        path = folder / batch
        verify(path, checksums[batch])  # before unpickling: a pickle can run code
        entry = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        images = np.asarray(entry[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        parts.append((images / np.float32(255), np.asarray(entry[b"labels"])))
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return x_train, y_train, parts[5][0], parts[5][1]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the classes a CIFAR-10 batch needs (numpy arrays) and nothing else."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)
