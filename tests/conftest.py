"""Test setup: 8 simulated CPU devices, set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

import pytest


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test that uses torch's global generator starts from seed 0; torch is imported only
    by the test modules that compare with it."""
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    from tests.parity_report import LARGEST

    if LARGEST:
        terminalreporter.section("largest |jaxbn - torch| per case group")
        for group, value in sorted(LARGEST.items()):
            terminalreporter.write_line(f"{group:<48} {value:.3e}")
