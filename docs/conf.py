"""Sphinx configuration of jaxbn's documentation site.

Build (from the repository root, after `pip install -e ".[docs]"`):

    python -m sphinx -W --keep-going -n -b html docs build/docs

`-W` turns every warning into an error and `-n` (nitpicky) makes a cross-reference to a jaxbn
name that does not exist one of them. The pages' Python examples are not executed here: they run
in the test suite (tests/test_docs_examples.py), which needs torch and the training extras.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # jaxbn and train/ from this checkout

import jaxbn

project = "jaxbn"
author = "jaxbn contributors"
copyright = "jaxbn contributors"
release = jaxbn.__version__
version = release

extensions = [
    "myst_parser",  # pages in Markdown, as the README
    "sphinx.ext.autodoc",  # API pages from the docstrings
    "sphinx.ext.napoleon",  # Google-style docstrings (Args:, Returns:, Raises:)
    "sphinx.ext.viewcode",  # a [source] link on every API entry
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links are checked like any other reference

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"  # signatures stay readable; types go next to each argument
autodoc_typehints_format = "short"
autodoc_typehints_description_target = "documented_params"  # no second, type-only list
autodoc_class_signature = "mixed"  # the constructor's signature on the class line
autodoc_inherit_docstrings = False  # flax.linen.Module's own docstrings are not jaxbn's reference
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # a module's fields as one compact list, not a block per field

# Nitpicky mode checks every cross-reference. jaxbn's own names must resolve; names of the
# libraries jaxbn builds on (no intersphinx: the build needs no network) are allowed to stay
# plain text.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|numpy|np|jnp|torch|optax|typing|collections|types)(\..*)?"),
    (r"py:.*", r"(equinox|eqx)(\..*)?"),
    # a private sentinel type in a signature's default (``_Unset``) is not an API name
    (r"py:class", r"jaxbn\..*\._[A-Za-z]\w*"),
    (r"py:.*", r"(Array|ArrayLike|PRNGKey|Shape|Dtype|DTypeLike|PyTree|Any|Callable|Sequence)"),
    (r"py:.*", r"(Mapping|Iterable|Iterator|Hashable|NamedTuple|Literal|Union|Optional)"),
    (r"py:.*", r"(int|float|bool|str|tuple|list|dict|None|object|type|bytes|Ellipsis)"),
    (r"py:.*", r"(Module|Variable|Param|BatchStat|Rngs|Initializer|Precision|PrecisionLike)"),
    (r"py:.*", r"(ShapeDtypeStruct|Mesh|NamedSharding|dtype|ndarray|Tensor|function)"),
    (r"py:.*", r"(pathlib|os|enum|dataclasses|functools|abc)(\..*)?"),
    # napoleon turns a "Raises:" line written as prose into one reference per word group
    (r"py:exc", r".*\s.*"),
    # napoleon reads "name_a, name_b (type)" in a docstring's field list as a type named name_b;
    # jaxbn's classes are CamelCase, so a bare lower-case class target is never one of them
    (r"py:class", r"[a-z_][a-z0-9_]*"),
]

html_theme = "furo"
html_title = f"jaxbn {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # tables that fit the page (see the file)
html_theme_options = {
    "source_repository": "",
    "navigation_with_keys": True,
}


def _constructor_signature(app, what, name, obj, options, signature, return_annotation):
    """An NNX module's signature is its ``__init__``'s: Flax's metaclass defines ``__call__(cls,
    *args, **kwargs)``, which Sphinx would otherwise show (and its ``-> Any``)."""
    import inspect

    if what != "class":
        return None
    _drop_return_type(app, name)
    if signature != "(*args, **kwargs)":
        return None
    try:
        parameters = list(inspect.signature(obj.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in parameters]
    return str(inspect.Signature(bare)), None


def _drop_return_type(app, name):
    """A class has no return type; Sphinx records the metaclass ``__call__``'s ``-> Any``."""
    app.env.current_document.autodoc_annotations.get(name, {}).pop("return", None)


def _class_docstring(app, what, name, obj, options, lines):
    if what == "class":
        _drop_return_type(app, name)


def setup(app):
    app.connect("autodoc-process-signature", _constructor_signature)
    app.connect("autodoc-process-docstring", _class_docstring)
