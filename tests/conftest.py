"""Test setup: 8 simulated CPU devices, set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One JAX compilation cache for this run, shared with the processes the tests start: the tests
# build the same models and steps many times over (every training run jits its own step), and
# a cache hit loads the executable XLA compiled for the same program instead of compiling it
# again (the same executable, so the same numbers). New for every run, removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="jaxbn-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # No size limit: a limit would make JAX lock the directory and rescan every entry at each
    # write (the suite ran 1.5x slower). An entry read while another process writes it fails
    # to load; JAX then warns and compiles the program itself: slower, never other numbers.

import sys

import pytest


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test that uses torch's global generator starts from seed 0; torch is imported only
    by the test modules that compare with it."""
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)


# The files of whole training runs and subprocesses start first: under pytest-xdist each file
# goes to one worker, and a long file taken up last would leave the other worker idle.
LONG_FILES = (
    "test_training_scripts.py",
    "test_multihost_training.py",
    "test_model_norms.py",
    "test_benchmarks.py",
    "test_readme_examples.py",
    "test_train_loop.py",
    "test_native_cache.py",
    "test_gpu_benchmark.py",
    "test_train_integrity.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: file order


def pytest_sessionfinish(session):
    """Under pytest-xdist, each worker hands its part of the parity table to the controller."""
    from tests.parity_report import LARGEST

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["parity"] = dict(LARGEST)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: merge a finished worker's part of the parity table."""
    from tests.parity_report import LARGEST

    for group, value in getattr(node, "workeroutput", {}).get("parity", {}).items():
        LARGEST[group] = max(LARGEST[group], value)


def pytest_terminal_summary(terminalreporter):
    from tests.parity_report import LARGEST

    if LARGEST:
        terminalreporter.section("largest |jaxbn - torch| per case group")
        for group, value in sorted(LARGEST.items()):
            terminalreporter.write_line(f"{group:<48} {value:.3e}")
