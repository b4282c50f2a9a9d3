"""The native CPU kernels: ``channel_sums.cc`` built on first use and registered with XLA.

The C++ source ships with the package and is compiled once per machine with the system's C++
compiler (``$CXX``, else ``c++``) against the XLA FFI headers that jaxlib ships, for the CPU it
runs on (``-march=native``). The library is cached under ``$JAXBN_CACHE_DIR`` (default
``~/.cache/jaxbn``) keyed by the source, the flags, jaxlib's version and the CPU's features
(``-march=native`` code must not be loaded on another CPU sharing the home directory), so later
processes only load it.

A cached library is loaded only when its bytes match the SHA-256 written next to it
(``channel_sums-<key>.sha256``) by the build that produced it: loading a truncated shared object
kills the process with SIGBUS, so a missing, truncated or foreign library is rebuilt instead
(silently: it is a cache miss). The build renames the digest and then the library into place,
each complete, so concurrent builders and readers never see a half-written pair that matches.
When the cache directory cannot be written, the kernels are built in a temporary directory for
this process, with one warning.

When there is no compiler, or ``JAXBN_NATIVE=0``, :func:`load` returns False and jaxbn uses
XLA's own reductions: same results, slower. Every failure (a failed build, a library that does
not load or lacks the kernels) warns once, naming the file or the command and the reason, and
falls back; none raises.
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


def digest_path(library: Path) -> Path:
    """The SHA-256 of ``library``'s bytes, written by the build that produced it."""
    return library.with_suffix(".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_problem(library: Path) -> str | None:
    """Why ``library`` must not be loaded (None when it is complete and is what a build wrote)."""
    if not library.exists():
        return "not built yet"
    try:
        expected = digest_path(library).read_text().split()
    except OSError:
        return f"{library} has no digest {digest_path(library).name} (not written by a build)"
    try:
        actual = _sha256(library)
    except OSError as error:
        return f"{library} cannot be read ({error})"
    if expected[:1] != [actual]:
        return f"{library} is truncated or modified (its SHA-256 does not match the digest)"
    return None


def _write_atomically(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(target: Path) -> None:
    """Compiles the kernels to ``target`` and writes its digest next to it.

    Atomic: the library is compiled under a temporary name, its digest renamed into place, then
    the library. A reader (or a concurrent builder) sees either a complete library or none, and
    a digest that matches only a complete library. Raises RuntimeError when the compiler fails
    and OSError when ``target``'s directory cannot be written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=target.parent)
    os.close(fd)
    command = [*compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{error.stderr[-2000:]}") from None
        except OSError as error:  # no such compiler: not a problem of the cache directory
            raise RuntimeError(f"{shlex.join(command)} failed: {error}") from None
        digest = _sha256(Path(tmp))
        _write_atomically(digest_path(target), f"{digest}  {target.name}\n".encode())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """True when the kernels are registered with XLA for the CPU (building them if needed).

    Never raises: whatever goes wrong (no compiler, a corrupt cache, an unwritable cache
    directory, a library without the kernels) warns once and returns False, and jaxbn uses
    XLA's reductions.
    """
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
        return _state["ok"]


class _UnavailableError(Exception):
    """The kernels cannot be used in this process; the message says why."""


def _warn(message: str) -> None:
    warnings.warn(f"jaxbn: {message}", RuntimeWarning, stacklevel=4)


def _load() -> bool:
    if os.environ.get("JAXBN_NATIVE", "1") == "0":
        return False
    notes: list[str] = []
    try:
        library = _open(library_path(), notes)
        missing = [name for name in TARGETS if not hasattr(library, name)]
        if missing:
            raise _UnavailableError(f"{library._name} does not define {', '.join(missing)}")
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), "cpu")
    except Exception as error:  # any failure means "no kernels", never a crash of the program
        _warn(
            f"the native CPU kernels are unavailable ({error}); using XLA's reductions instead "
            "(same results, slower)."
        )
        return False
    for note in notes:
        _warn(note)
    return True


def _open(path: Path, notes: list[str]) -> ctypes.CDLL:
    """Loads the cached library at ``path``, (re)building it first when it is not verified."""
    problem = cache_problem(path)
    if problem is None:
        return _dlopen(path)
    try:
        build(path)
    except RuntimeError as error:
        raise _UnavailableError(f"{_unless_missing(problem)}{error}") from None
    except OSError as error:  # the cache directory cannot be written: build for this process
        notes.append(
            f"cannot cache the native CPU kernels in {path.parent} ({error}); built them in a "
            "temporary directory for this process only (set JAXBN_CACHE_DIR to a writable "
            "directory to build them once)."
        )
        with tempfile.TemporaryDirectory(prefix="jaxbn-") as scratch:
            try:
                build(Path(scratch) / path.name)
            except (RuntimeError, OSError) as retry:
                raise _UnavailableError(
                    f"{_unless_missing(problem)}{path.parent} cannot be written ({error}) and "
                    f"building in a temporary directory failed: {retry}"
                ) from None
            # A loaded library stays mapped after its file is removed.
            return _dlopen(Path(scratch) / path.name)
    return _dlopen(path)


def _unless_missing(problem: str) -> str:
    return "" if problem == "not built yet" else f"{problem}; rebuilding it: "


def _dlopen(path: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise _UnavailableError(f"{path} cannot be loaded ({error})") from None
