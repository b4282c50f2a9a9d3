"""Dataset loaders on small files written here in the exact on-disk formats (torchvision
layout): parsing, checksums verified before use, downloads with a local server, offline errors."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest

from train import datasets
from train.datasets import load_dataset
from train.download import ChecksumError, DatasetUnavailableError

RNG = np.random.default_rng(0)


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder, n_train=20, n_test=7):
    """MNIST-format .gz files; returns (their checksums, the arrays)."""
    arrays = {
        "train-images-idx3-ubyte.gz": RNG.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": RNG.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": RNG.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": RNG.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, array in arrays.items():
        data = gzip.compress(idx_bytes(array))
        (folder / name).write_bytes(data)
        checksums[name] = md5(data)
    return checksums, arrays


def cifar_batch(n: int) -> bytes:
    entry = {
        b"batch_label": b"synthetic",
        b"labels": RNG.integers(0, 10, n).tolist(),
        b"data": RNG.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [b"x.png"] * n,
    }
    return pickle.dumps(entry, protocol=2)  # as the original (Python 2 cPickle) files


def write_cifar_archive(root, per_batch=4, test=5):
    """cifar-10-python.tar.gz holding cifar-10-batches-py/; returns checksums and raw batches."""
    batches = {f"data_batch_{i}": cifar_batch(per_batch) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(test)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    root.mkdir(parents=True, exist_ok=True)
    (root / "cifar-10-python.tar.gz").write_bytes(archive)
    checksums = {name: md5(data) for name, data in batches.items()}
    checksums["cifar-10-python.tar.gz"] = md5(archive)
    return checksums, batches


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_files_in_torchvision_layout_are_read_exactly(tmp_path, name, folder):
    checksums, arrays = write_idx_dataset(tmp_path / folder / "raw")
    data = load_dataset(name, tmp_path, download=False, checksums=checksums)
    assert data.x_train.shape == (20, 28, 28, 1) and data.x_test.shape == (7, 28, 28, 1)
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte.gz"])
    raw = arrays["train-images-idx3-ubyte.gz"] / 255.0
    expected = (raw - raw.mean()) / raw.std()  # standardized on the training split
    np.testing.assert_allclose(data.x_train[..., 0], expected, atol=1e-5)


def test_a_file_with_the_wrong_checksum_is_refused(tmp_path):
    write_idx_dataset(tmp_path / "MNIST" / "raw")  # real checksums are the published ones
    with pytest.raises(ChecksumError, match="does not match the published"):
        load_dataset("mnist", tmp_path, download=False)


def test_cifar10_archive_is_extracted_verified_and_read(tmp_path):
    checksums, batches = write_cifar_archive(tmp_path)
    data = load_dataset("cifar10", tmp_path, download=False, checksums=checksums)
    assert data.x_train.shape == (20, 32, 32, 3) and data.x_test.shape == (5, 32, 32, 3)
    first = pickle.loads(batches["data_batch_1"], encoding="bytes")
    np.testing.assert_array_equal(data.y_train[:4], first[b"labels"])
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").exists()


def test_a_cifar_pickle_with_the_wrong_checksum_is_never_unpickled(tmp_path, monkeypatch):
    checksums, _ = write_cifar_archive(tmp_path)
    checksums["data_batch_3"] = "0" * 32
    unpickled = []
    real_load = datasets._NumpyOnlyUnpickler.load

    def counting_load(self):
        unpickled.append(1)
        return real_load(self)

    monkeypatch.setattr(datasets._NumpyOnlyUnpickler, "load", counting_load)
    with pytest.raises(ChecksumError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False, checksums=checksums)
    assert len(unpickled) == 2  # batches 1 and 2 only: the bad one stopped everything


def test_a_cifar_pickle_holding_anything_but_arrays_is_refused(tmp_path):
    checksums, _ = write_cifar_archive(tmp_path)
    load_dataset("cifar10", tmp_path, download=False, checksums=checksums)  # extracts
    folder = tmp_path / "cifar-10-batches-py"
    evil = pickle.dumps({b"data": functools.partial(print, "pwned")}, protocol=2)
    (folder / "data_batch_1").write_bytes(evil)
    checksums["data_batch_1"] = md5(evil)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load functools\.partial"):
        load_dataset("cifar10", tmp_path, download=False, checksums=checksums)


@contextlib.contextmanager
def serve(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def test_missing_files_are_downloaded_verified_and_used(tmp_path):
    checksums, arrays = write_idx_dataset(tmp_path / "mirror")
    with serve(tmp_path / "mirror") as url:
        data = load_dataset("mnist", tmp_path / "data", checksums=checksums, base_url=url)
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte.gz"])
    assert (tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()


def test_a_download_with_the_wrong_checksum_is_deleted(tmp_path):
    write_idx_dataset(tmp_path / "mirror")
    with serve(tmp_path / "mirror") as url, pytest.raises(ChecksumError):
        load_dataset("mnist", tmp_path / "data", base_url=url)
    assert not list((tmp_path / "data" / "MNIST" / "raw").iterdir())


def test_offline_the_error_says_where_to_put_which_files(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", tmp_path, base_url="http://127.0.0.1:9/")  # nothing listens
    message = str(info.value)
    assert "could not download" in message
    assert f"into {tmp_path / 'MNIST' / 'raw'}" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_bundled_digits_need_no_network():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 8, 8, 1) and data.x_test.shape == (360, 8, 8, 1)
    assert set(np.unique(data.y_test)) == set(range(10))
