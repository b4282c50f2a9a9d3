"""The native CPU kernels: ``channel_sums.cc`` built on first use and registered with XLA.

The C++ source ships with the package and is compiled once per machine with the system's C++
compiler (``$CXX``, else ``c++``) against the XLA FFI headers that jaxlib ships, for the CPU it
runs on (``-march=native``). The library is cached under ``$JAXBN_CACHE_DIR`` (default
``~/.cache/jaxbn``) keyed by the source, the flags, jaxlib's version and the CPU's features
(``-march=native`` code must not be loaded on another CPU sharing the home directory), so later
processes only load it.

When there is no compiler, or ``JAXBN_NATIVE=0``, :func:`load` returns False and jaxbn uses
XLA's own reductions: same results, slower. A failed build warns once, naming the command.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jaxlib

SOURCE = Path(__file__).with_name("channel_sums.cc")
TARGETS = ("jaxbn_channel_moments", "jaxbn_channel_dot")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict[str, bool] = {}


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxbn"
    return Path(os.environ.get("JAXBN_CACHE_DIR", default))


def cpu_features() -> str:
    """The CPU's architecture and feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def library_path() -> Path:
    """Where the library built for this source, flags, jaxlib and CPU lives."""
    identity = repr((FLAGS, jaxlib.__version__, cpu_features())).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + identity).hexdigest()[:16]
    return cache_dir() / f"channel_sums-{key}.so"


def build(target: Path) -> None:
    """Compiles the kernels to ``target`` (atomically: concurrent builders cannot collide)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [*compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{error.stderr[-2000:]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """True when the kernels are registered with XLA for the CPU (building them if needed)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
        return _state["ok"]


def _load() -> bool:
    if os.environ.get("JAXBN_NATIVE", "1") == "0":
        return False
    path = library_path()
    try:
        if not path.exists():
            build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError) as error:
        warnings.warn(
            f"jaxbn: the native CPU kernels are unavailable ({error}); using XLA's "
            "reductions instead (same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), "cpu")
    return True
