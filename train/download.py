"""Fetching dataset files: checksum verification and downloads with a progress bar."""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.error
import urllib.request

from tqdm import tqdm


class ChecksumError(RuntimeError):
    """A file's MD5 does not match the published one: it is not used."""


class DatasetUnavailableError(RuntimeError):
    """The files are missing and could not be downloaded."""


def md5_of(path: pathlib.Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # the datasets publish MD5s (integrity only)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: pathlib.Path, expected_md5: str) -> None:
    actual = md5_of(path)
    if actual != expected_md5:
        raise ChecksumError(
            f"{path}: MD5 {actual} does not match the published {expected_md5}; the file is "
            "corrupt or not the expected one. Delete it and download again."
        )


def fetch(url: str, dest: pathlib.Path, expected_md5: str, *, download: bool, how_to: str) -> None:
    """Makes sure ``dest`` exists and has ``expected_md5``, downloading it if allowed.

    Raises:
      DatasetUnavailableError: missing and not downloadable (offline, or ``download=False``),
        with ``how_to`` telling the user how to get the file.
      ChecksumError: present (or downloaded) with the wrong checksum.
    """
    if not dest.exists():
        if not download:
            raise DatasetUnavailableError(f"{dest} is missing (downloads disabled). {how_to}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            partial.unlink(missing_ok=True)
            raise DatasetUnavailableError(f"could not download {url}: {err}. {how_to}") from err
        try:
            verify(partial, expected_md5)
        except ChecksumError:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
    verify(dest, expected_md5)
