"""Every public name has an entry in the API reference (docs/api/*.md).

The public names are those in ``jaxbn.__all__`` and in the ``__all__`` of every jaxbn module
reachable from it (``jaxbn.linen``, ``jaxbn.nnx``, ``jaxbn.tools``, ``jaxbn.interop``, ...), plus
``jaxbn.sync`` and ``jaxbn.equinox`` (with its ``models``, ``interop`` and ``tools``). A name is
documented when an autodoc directive (``.. autoclass::``, ``.. autofunction::``,
``.. autodata::``, ``.. automodule::``, ...) names it, or names the same object under another
public path (``jaxbn.linen.BatchNorm`` is ``jaxbn.BatchNorm``).
"""

from __future__ import annotations

import importlib
import pathlib
import re
import types

import jaxbn

API = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"
DIRECTIVE = re.compile(
    r"^\.\. auto(?:class|function|data|module|exception|attribute)::\s+(\S+)", re.M
)
# public, though not in jaxbn.__all__: jaxbn.sync (only its functions are), and jaxbn.equinox
# (an optional extra, which `import jaxbn` does not import; the test extra installs Equinox)
EXTRA_MODULES = ("jaxbn.sync", "jaxbn.equinox")


def resolve(path: str):
    """The object named by a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def documented_paths() -> set[str]:
    return {m for page in API.glob("*.md") for m in DIRECTIVE.findall(page.read_text())}


def public_names() -> dict[str, object]:
    """``{dotted path: object}`` of every public name."""
    names: dict[str, object] = {}
    todo = [jaxbn, *(importlib.import_module(m) for m in EXTRA_MODULES)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        names[module.__name__] = module
        for name in module.__all__:
            obj = getattr(module, name)
            names[f"{module.__name__}.{name}"] = obj
            if isinstance(obj, types.ModuleType) and obj.__name__.startswith("jaxbn."):
                todo.append(obj)
    return names


def is_documented(path: str, obj, paths: set[str], objects: list) -> bool:
    if path in paths:
        return True
    # a value (a string, a tuple of kinds) is documented only under its own path; a module, a
    # class or a function under any public path
    shared = isinstance(obj, (types.ModuleType, type, types.FunctionType)) or callable(obj)
    return shared and any(obj is other for other in objects)


def test_every_directive_names_an_existing_object():
    missing = []
    for path in sorted(documented_paths()):
        try:
            resolve(path)
        except (ImportError, AttributeError):
            missing.append(path)
    assert missing == []


def test_every_public_name_has_an_api_entry():
    paths = documented_paths()
    objects = [resolve(p) for p in paths]
    undocumented = [
        path
        for path, obj in sorted(public_names().items())
        if not is_documented(path, obj, paths, objects)
    ]
    assert undocumented == []


def test_the_public_names_include_every_subpackage():
    # the walk itself: a subpackage left out of it would leave its names unchecked
    assert {
        "jaxbn.linen.BatchNorm",
        "jaxbn.nnx.torch_to_nnx",
        "jaxbn.tools.interop.verify_port",
        "jaxbn.equinox.BatchNorm2d",
        "jaxbn.equinox.models.ConvNet",
        "jaxbn.equinox.tools.update_bn",
    } <= set(public_names())
