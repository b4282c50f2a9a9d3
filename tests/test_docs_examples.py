"""Every ```python block of every documentation page runs, in order, as the page shows it.

A page is run like a notebook: its blocks in order, in one namespace, so a later block may use
what an earlier one built (the port of guides/from-pytorch.md is folded further down). A block
that raises fails the page's test, naming the block.
"""

from __future__ import annotations

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_guides_have_python_examples():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES_WITH_CODE}
    assert {
        "getting-started.md",
        "guides/from-pytorch.md",
        "guides/from-linen.md",
        "guides/from-nnx.md",
        "guides/sync.md",
        "guides/variants.md",
        "guides/tools.md",
    } <= names


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_every_python_block_of_the_page_runs(page, capsys):
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for index, block in enumerate(python_blocks(page)):
        source = f"{page.relative_to(DOCS)}[python block {index}]"
        exec(compile(block, source, "exec"), namespace)
    capsys.readouterr()  # the examples print; their output is the reader's
