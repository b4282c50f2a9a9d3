"""Every import path the README and the documentation pages show exists.

Three kinds of path are checked: the imports of every ```python block (``import jaxbn.nnx``,
``from jaxbn.interop import torch_to_flax``), every dotted ``jaxbn.…`` name in the text and the
code (``jaxbn.interop.verify_port``), and every ``python -m MODULE`` command.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DOTTED = re.compile(r"(?<![\w./-])jaxbn(?:\.[A-Za-z_]\w*)+")
COMMAND = re.compile(r"python -m ([\w.]+)")


def text_of(page: pathlib.Path) -> str:
    # HTML comments hold notes for the pages' writers (sections still to come), not paths
    return re.sub(r"<!--.*?-->", "", page.read_text(), flags=re.S)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(path)


def imports_of(source: str) -> list[str]:
    """``module`` for ``import module``, ``module:name`` for ``from module import name``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [f"{node.module}:{alias.name}" for alias in node.names]
    return found


def check_import(spec: str) -> None:
    module, _, name = spec.partition(":")
    imported = importlib.import_module(module)
    if name and not hasattr(imported, name):
        importlib.import_module(f"{module}.{name}")  # `from package import submodule`


def paths(kind: str) -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        text, where = text_of(page), page.relative_to(ROOT).as_posix()
        if kind == "imports":
            found |= {(where, s) for block in python_blocks(text) for s in imports_of(block)}
        elif kind == "dotted":
            found |= {(where, m) for m in DOTTED.findall(text)}
        else:
            found |= {(where, m) for m in COMMAND.findall(text)}
    return sorted(found)


def test_the_walk_finds_the_documented_interop_import():
    assert ("docs/api/interop.md", "jaxbn.interop.torch_to_flax") in paths("dotted")
    assert any(spec.startswith("jaxbn") for _, spec in paths("imports"))


@pytest.mark.parametrize(("page", "spec"), paths("imports"))
def test_every_import_of_an_example_imports(page, spec):
    check_import(spec)


@pytest.mark.parametrize(("page", "path"), paths("dotted"))
def test_every_jaxbn_path_in_the_text_exists(page, path):
    resolve(path)


@pytest.mark.parametrize(("page", "module"), paths("commands"))
def test_every_python_m_command_names_a_module(page, module):
    assert importlib.util.find_spec(module) is not None
