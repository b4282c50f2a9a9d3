"""A bad kernel cache never crashes a program: it is rebuilt, or jaxbn falls back with one warning.

The library is loaded once per process, so every case runs a batch norm forward and backward in
a fresh interpreter whose ``$JAXBN_CACHE_DIR`` holds the damaged cache, and compares what it
prints with the XLA reductions (``JAXBN_NATIVE=0``). The kernels are compiled at most once for
the module (copied from this process's cache when it holds them); rebuilds use a stand-in
compiler that writes that library (in pieces, slowly where builders race, as a compiler does)
and logs each call, so a test knows how many builds happened without paying for them.
"""

from __future__ import annotations

import _ctypes
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxbn._cpu_kernels import build as native

CHECK = """
    import json, warnings
    import numpy as np, jax, jax.numpy as jnp
    import jaxbn
    from jaxbn._cpu_kernels import build as native

    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32) * 3 + 2
    w = np.linspace(0.5, 1.5, 8, dtype=np.float32)

    def loss(x, w):
        y = jaxbn.functional.batch_norm(x, None, None, w, None, training=True)[0]
        return jnp.sum(y * jnp.cos(y))

    value, (gx, gw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    result = [float(value), *np.asarray(gx).ravel().tolist(), *np.asarray(gw).tolist()]
    print(json.dumps({"loaded": native.load(), "result": result}))
"""

FAKE_COMPILER = """
    import os, sys, time
    source, log = os.environ["FAKE_CXX_LIBRARY"], os.environ["FAKE_CXX_LOG"]
    delay = float(os.environ["FAKE_CXX_DELAY"])
    with open(log, "a") as file:
        file.write("build\\n")
    data = open(source, "rb").read()
    with open(sys.argv[sys.argv.index("-o") + 1], "wb") as out:  # in place, as compilers do
        for start in range(0, len(data), len(data) // 4 + 1):
            out.write(data[start : start + len(data) // 4 + 1])
            out.flush()
            time.sleep(delay)
"""

WARNING = "RuntimeWarning: jaxbn:"
# A shared object that loads anywhere Python does (ctypes needs it) and defines no kernels.
_OTHER_LIBRARY = _ctypes.__file__


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache directory holding a real build of the kernels (library and digest)."""
    cache = tmp_path_factory.mktemp("built")
    library = native.library_path()
    if native.load() and native.cache_problem(library) is None:  # built already: copy it
        for path in (library, native.digest_path(library)):
            shutil.copyfile(path, cache / path.name)
    else:
        native.build(cache / library.name)
    return cache


@pytest.fixture(scope="module", autouse=True)
def reference_process(tmp_path_factory):
    """The run with XLA's reductions (JAXBN_NATIVE=0), started with the module's first test so
    that it runs on the second core beside that test's own process."""
    process = _start({"JAXBN_NATIVE": "0", "JAXBN_CACHE_DIR": str(tmp_path_factory.mktemp("none"))})
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def reference(reference_process):
    run = _wait(reference_process)
    assert run.returncode == 0, run.stderr
    return _result(run)["result"]


@pytest.fixture
def cache(built, tmp_path) -> Path:
    """A private copy of the built cache, for a test to damage."""
    return Path(shutil.copytree(built, tmp_path / "cache"))


@pytest.fixture
def compiler(built, tmp_path) -> dict:
    """Environment for the stand-in compiler, which writes the built library."""
    script = tmp_path / "fake_cxx.py"
    script.write_text(textwrap.dedent(FAKE_COMPILER))
    return {
        "CXX": shlex.join([sys.executable, str(script)]),
        "FAKE_CXX_LIBRARY": str(built / native.library_path().name),
        "FAKE_CXX_LOG": str(tmp_path / "builds.log"),
        "FAKE_CXX_DELAY": "0",  # seconds per piece written: only racing builders need them
    }


def _builds(compiler: dict) -> int:
    log = Path(compiler["FAKE_CXX_LOG"])
    return len(log.read_text().splitlines()) if log.exists() else 0


def _library(cache: Path) -> Path:
    return cache / native.library_path().name


def _start(env_update: dict) -> subprocess.Popen:
    env = {**os.environ, **env_update}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHECK)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=1200)  # a hang only; loaded machines are slow
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(env_update: dict) -> subprocess.CompletedProcess:
    return _wait(_start(env_update))


def _result(run: subprocess.CompletedProcess) -> dict:
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_same_numbers(run, reference):
    np.testing.assert_allclose(_result(run)["result"], reference, rtol=1e-5, atol=1e-5)


def _write_digest(library: Path) -> None:
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    native.digest_path(library).write_text(f"{digest}  {library.name}\n")


def _damage(library: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(library, 1000)  # what `truncate -s 1000` or a full disk leaves
    elif how == "empty":
        os.truncate(library, 0)
    elif how == "another library":  # loads fine, but has none of the kernels
        shutil.copyfile(_OTHER_LIBRARY, library)
    elif how == "without its digest":  # e.g. cached by a jaxbn that wrote no digests
        native.digest_path(library).unlink()


@pytest.mark.parametrize("how", ["truncated", "empty", "another library", "without its digest"])
def test_a_damaged_cached_library_is_rebuilt_without_a_warning(how, cache, compiler, reference):
    library = _library(cache)
    _damage(library, how)
    run = _run({"JAXBN_CACHE_DIR": str(cache), **compiler})
    assert run.returncode == 0, run.stderr
    assert _result(run)["loaded"] is True
    assert WARNING not in run.stderr, run.stderr
    _assert_same_numbers(run, reference)
    assert _builds(compiler) == 1
    assert native.cache_problem(library) is None
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [library.name, native.digest_path(library).name]
    )


def test_a_damaged_library_that_cannot_be_rebuilt_falls_back_with_one_warning(cache, reference):
    library = _library(cache)
    _damage(library, "truncated")
    run = _run({"JAXBN_CACHE_DIR": str(cache), "CXX": "false"})
    assert run.returncode == 0, run.stderr
    assert _result(run)["loaded"] is False
    assert run.stderr.count(WARNING) == 1, run.stderr
    assert f"{library} is truncated or modified" in run.stderr
    assert "Traceback" not in run.stderr
    _assert_same_numbers(run, reference)


def test_a_verified_library_without_the_kernels_falls_back_with_one_warning(cache, reference):
    library = _library(cache)
    _damage(library, "another library")
    _write_digest(library)  # a digest that matches: the file is what was written, but wrong
    run = _run({"JAXBN_CACHE_DIR": str(cache), "CXX": "false"})
    assert run.returncode == 0, run.stderr
    assert _result(run)["loaded"] is False
    assert run.stderr.count(WARNING) == 1, run.stderr
    assert f"{library} does not define jaxbn_channel_moments" in run.stderr
    assert "Traceback" not in run.stderr
    _assert_same_numbers(run, reference)


def test_a_verified_library_is_loaded_without_compiling(cache, reference):
    run = _run({"JAXBN_CACHE_DIR": str(cache), "CXX": "false"})
    assert run.returncode == 0, run.stderr
    assert _result(run)["loaded"] is True
    assert WARNING not in run.stderr, run.stderr
    _assert_same_numbers(run, reference)


def _unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "a file":
        (tmp_path / "cache").write_text("")
        return tmp_path / "cache"
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    (tmp_path / "cache").mkdir(mode=0o555)
    return tmp_path / "cache"


@pytest.mark.parametrize("kind", ["a file", "a read-only directory"])
def test_an_unwritable_cache_builds_for_the_process_with_one_warning(
    kind, tmp_path, compiler, reference
):
    cache = _unwritable(tmp_path, kind)
    run = _run({"JAXBN_CACHE_DIR": str(cache), **compiler})
    assert run.returncode == 0, run.stderr
    assert _result(run)["loaded"] is True
    assert run.stderr.count(WARNING) == 1, run.stderr
    assert f"cannot cache the native CPU kernels in {cache}" in run.stderr
    _assert_same_numbers(run, reference)
    assert _builds(compiler) == 1


def test_an_unwritable_cache_without_a_compiler_falls_back_with_one_warning(tmp_path, reference):
    cache = _unwritable(tmp_path, "a file")
    run = _run({"JAXBN_CACHE_DIR": str(cache), "CXX": "false"})
    assert run.returncode == 0, run.stderr
    assert _result(run)["loaded"] is False
    assert run.stderr.count(WARNING) == 1, run.stderr
    assert "Traceback" not in run.stderr
    _assert_same_numbers(run, reference)


def test_concurrent_builds_leave_one_verified_library(tmp_path, compiler, reference):
    cache = tmp_path / "cache"
    env = {"JAXBN_CACHE_DIR": str(cache), **compiler, "FAKE_CXX_DELAY": "0.2"}
    runs = [_wait(process) for process in [_start(env), _start(env)]]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert _result(run)["loaded"] is True
        assert WARNING not in run.stderr, run.stderr
        _assert_same_numbers(run, reference)
    library = _library(cache)
    assert native.cache_problem(library) is None
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [library.name, native.digest_path(library).name]
    )
