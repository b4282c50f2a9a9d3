"""Collects the largest |jaxbn - torch| per case group; conftest prints it after the run."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

LARGEST: dict[str, float] = defaultdict(float)


def assert_close(group: str, actual, expected, rtol: float, atol: float) -> None:
    """np.testing.assert_allclose that also records the largest absolute deviation."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.size:
        LARGEST[group] = max(LARGEST[group], float(np.nanmax(np.abs(a - e))))
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=group)
