"""What `pip install` gets: the wheel holds `jaxbn` only and needs jax, flax and numpy; the
scripts' packages are the `train` extra; `[cuda]` names the CUDA plugin of the jax in use
(resolved from the installed metadata, nothing downloaded)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_the_library_needs_jax_flax_and_numpy_and_the_scripts_the_train_extra():
    assert names(PROJECT["dependencies"]) == {"jax", "flax", "numpy"}
    extras = PROJECT["optional-dependencies"]
    script_needs = {"optax", "orbax-checkpoint", "tqdm", "matplotlib", "scikit-learn"}
    assert names(extras["train"]) == script_needs
    assert names(extras["test"]) == script_needs | {
        "pytest",
        "pytest-xdist",
        "torch",
        "ruff",
        "keras",
        "equinox",
    }
    assert names(extras["equinox"]) == {"equinox"}
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_the_cuda_extra_names_the_plugin_of_the_jax_in_use():
    (extra,) = [Requirement(r) for r in PROJECT["optional-dependencies"]["cuda"]]
    installed = Version(importlib.metadata.version("jax"))
    base = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("jax"))
    # pip keeps the installed jax (it satisfies both) and adds jax's own extra for it
    assert extra.name == "jax" and installed in extra.specifier and installed in base.specifier
    (cuda,) = extra.extras
    assert cuda in importlib.metadata.metadata("jax").get_all("Provides-Extra")
    pinned = {}
    for text in importlib.metadata.requires("jax"):
        r = Requirement(text)
        if r.marker is not None and r.marker.evaluate({"extra": cuda}):
            pinned[r.name] = r.specifier
    plugin = f"jax-{cuda}-plugin"
    assert plugin in pinned, f"jax {installed}'s [{cuda}] extra names {sorted(pinned)}"
    for name in (plugin, "jaxlib"):  # pinned to exactly the installed jax version
        assert installed in pinned[name]
        newer = Version(f"{installed.major}.{installed.minor}.{installed.micro + 1}")
        assert newer not in pinned[name]


def test_the_wheel_holds_only_jaxbn(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    for package in ("jaxbn", "train", "benchmarks"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(source)],
        check=True,
        timeout=1200,  # stops a hang only: generous for a loaded machine
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("jaxbn-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"jaxbn"}


def test_importing_jaxbn_imports_none_of_the_training_packages():
    # (optax is not in the list: flax itself requires it)
    code = (
        "import sys, jaxbn, jaxbn.models; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'orbax', 'tqdm', 'matplotlib', 'sklearn', 'torch', 'train'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_version_comes_from_the_package_metadata():
    import jaxbn

    assert jaxbn.__version__ == importlib.metadata.version("jaxbn") == PROJECT["version"]


def test_the_top_level_names_are_the_public_api_and_its_subpackages():
    import types

    import jaxbn

    assert all(hasattr(jaxbn, name) for name in jaxbn.__all__)
    assert not [name for name in jaxbn.__all__ if name.startswith("_") and name != "__version__"]
    # what else `import jaxbn` leaves public is a submodule, not a helper (jaxbn.tree_paths
    # became jaxbn.tools._tree)
    unlisted = {name for name in vars(jaxbn) if not name.startswith("_")} - set(jaxbn.__all__)
    assert all(isinstance(getattr(jaxbn, name), types.ModuleType) for name in unlisted), unlisted
    assert not hasattr(jaxbn, "tree_paths")


def imported_modules(path: Path) -> set[str]:
    """The modules a source file imports (``from a.b import c`` counts as ``a.b``)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_modules_reach_the_core_only_through_functional_and_module_logic():
    # a batch norm call goes module -> functional -> core (-> kernels); the modules' argument
    # checks come to them through jaxbn._module_logic
    package = ROOT / "jaxbn"
    module_files = [
        *sorted((package / "linen").glob("*.py")),
        *sorted((package / "nnx").glob("*.py")),
        *sorted((package / "models").glob("*.py")),
        package / "flax_compat.py",
    ]
    assert len(module_files) > 15
    reaching = {
        str(path.relative_to(ROOT)): sorted(
            name
            for name in imported_modules(path)
            if name.startswith(("jaxbn._core", "jaxbn._cpu_kernels"))
        )
        for path in module_files
    }
    assert {file: names for file, names in reaching.items() if names} == {}
