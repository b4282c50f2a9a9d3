"""Every public callable's docstring is a reference: summary, Args, Returns, Raises, Example.

The public callables are the classes and functions (not values) in ``jaxbn.__all__``,
``jaxbn.nnx.__all__``, ``jaxbn.tools.__all__`` and ``jaxbn.functional.__all__`` (each object
once). A class is read with its own ``__call__`` (where the call's ``Args``/``Returns``/
``Raises`` live); its fields count as ``Args`` when listed under ``Attributes:``. A class has
no ``Returns`` to give.

Every one has all of them: a docstring that loses a section fails.
"""

from __future__ import annotations

import inspect

import pytest

import jaxbn
import jaxbn.functional
import jaxbn.nnx
import jaxbn.tools

MODULES = (jaxbn, jaxbn.nnx, jaxbn.tools, jaxbn.functional)
SECTIONS = ("Args:", "Returns:", "Raises:", "Example")


def public_callables() -> dict[str, object]:
    found: dict[str, object] = {}
    ids: set[int] = set()
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            # classes and functions; a value such as jaxbn.nnx.trainable (an nnx filter) is
            # documented as data
            if not (inspect.isclass(obj) or inspect.isroutine(obj)) or id(obj) in ids:
                continue
            ids.add(id(obj))
            found[f"{module.__name__}.{name}"] = obj
    return found


def reference_text(obj) -> str:
    """The docstring a reader gets for ``obj``: a class's own and its jaxbn ``__call__``'s."""
    text = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        call = next((c.__dict__["__call__"] for c in obj.__mro__ if "__call__" in c.__dict__), None)
        if call is not None and getattr(call, "__module__", "").startswith("jaxbn"):
            text += "\n" + (inspect.getdoc(call) or "")
    return text


def missing_sections(obj) -> list[str]:
    text = reference_text(obj)
    missing = []
    for section in SECTIONS:
        if section == "Returns:" and inspect.isclass(obj):
            continue
        present = section in text or (section == "Args:" and "Attributes:" in text)
        if not present:
            missing.append(section.rstrip(":"))
    return missing


PUBLIC = public_callables()

# What each docstring still lacks (see the module docstring); shrink it, never grow it.


def test_the_walk_finds_the_public_callables():
    assert {"jaxbn.BatchNorm2d", "jaxbn.nnx.BatchNorm2d", "jaxbn.functional.batch_norm"} <= set(
        PUBLIC
    )


@pytest.mark.parametrize("path", sorted(PUBLIC))
def test_the_docstring_has_a_summary_and_every_section(path):
    obj = PUBLIC[path]
    summary = (inspect.getdoc(obj) or "").strip().splitlines()
    assert summary and summary[0].strip(), f"{path} has no summary line"
    assert missing_sections(obj) == []


@pytest.mark.parametrize("path", ["jaxbn.BatchNorm2d", "jaxbn.nnx.BatchNorm2d"])
def test_help_of_a_rank_class_starts_with_jaxbn_text(path):
    import pydoc

    obj = PUBLIC[path]
    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    own = text.index(obj.__doc__.splitlines()[0])
    first_flax = text.find("flax.linen.module.Module.") if "nnx" not in path else -1
    assert "Args:" in text[own : own + 3000] or "Attributes:" in text[own : own + 3000]
    assert first_flax == -1 or own < first_flax
