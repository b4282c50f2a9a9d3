"""The ``>>>`` examples of jaxbn.equinox's docstrings run as shown (the package is left out of
tests/test_docs_docstring_examples.py, which runs without the optional extra in mind)."""

import doctest
import importlib
import pkgutil

import pytest

import jaxbn.equinox

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(jaxbn.equinox.__path__, "jaxbn.equinox.")
)
CASES = [
    test
    for name in ["jaxbn.equinox", *MODULES]
    for test in doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(name), name)
    if test.examples
]


def test_every_module_of_the_package_has_an_example():
    assert {t.name.split(".")[2] if t.name.count(".") > 1 else "" for t in CASES} >= {
        "",
        "batch_norm",
        "group_norm",
        "layer_norm",
        "models",
        "interop",
        "tools",
    }


@pytest.mark.parametrize("test", CASES, ids=[t.name for t in CASES])
def test_the_docstring_example_runs_as_shown(test):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    test.globs = {**test.globs}
    report: list[str] = []
    assert runner.run(test, out=report.append).failed == 0, "".join(report)
