"""The ``>>>`` examples of the docstrings (shown on the API pages) run and print what they show.

Every module of the package is searched, private ones included (a public class's docstring
lives where the class is defined). Whitespace differences and ``...`` are accepted, as the
reader reads them. Every example runs: there is no list of exceptions.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxbn

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(jaxbn.__path__, "jaxbn.")
    # jaxbn.interop is jaxbn.tools.interop (a shim); jaxbn.equinox (an optional extra) is
    # searched too: the test extra installs Equinox
    if name != "jaxbn.interop"
)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    found = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    # an object re-exported by a module is searched where it is defined, once
    return [t for t in found if t.examples]


CASES = [(name, test) for name in MODULES for test in examples(name)]


def test_the_docstrings_have_examples():
    assert any(name == "jaxbn.functional" for name, _ in CASES)


@pytest.mark.parametrize(("module", "test"), CASES, ids=[t.name for _, t in CASES])
def test_the_docstring_example_runs_as_shown(module, test):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    test.globs = {**test.globs}
    report: list[str] = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
