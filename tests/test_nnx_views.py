"""Flax NNX's inspection tools on every jaxbn NNX module: nnx.view_info (built from the
``Args:`` section of ``set_view``'s docstring), nnx.view, nnx.eval_shape and nnx.tabulate."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest
from flax import nnx

import jaxbn.nnx

C = 4
MODULES = {
    "BatchNorm": lambda: jaxbn.nnx.BatchNorm(C),
    "BatchNorm2d": lambda: jaxbn.nnx.BatchNorm2d(C),
    "flax_compat.BatchNorm": lambda: jaxbn.nnx.flax_compat.BatchNorm(C, rngs=nnx.Rngs(0)),
    "BatchRenorm": lambda: jaxbn.nnx.BatchRenorm(C),
    "GhostBatchNorm": lambda: jaxbn.nnx.GhostBatchNorm(C, 2),
    "FrozenBatchNorm": lambda: jaxbn.nnx.FrozenBatchNorm(C),
    "GroupNorm": lambda: jaxbn.nnx.GroupNorm(2, C),
    "LayerNorm": lambda: jaxbn.nnx.LayerNorm(C),
}
#: the modules with a mode, which nnx.view and nnx.view_info list
WITH_MODE = ("BatchNorm", "BatchNorm2d", "flax_compat.BatchNorm", "BatchRenorm", "GhostBatchNorm")


@pytest.mark.parametrize("name", MODULES)
def test_view_info_lists_the_mode_of_every_module_that_has_one(name):
    info = nnx.view_info(MODULES[name]())
    if name in WITH_MODE:
        assert info.splitlines()[:2] == [
            f"{name.split('.')[-1]}:",
            "  use_running_average: bool | None = None",
        ]
        assert "statistics" in info
    else:
        assert info == ""


@pytest.mark.parametrize("name", WITH_MODE)
def test_nnx_view_sets_the_mode_on_a_copy(name):
    module = MODULES[name]()
    module.use_running_average = False
    view = nnx.view(module, use_running_average=True)
    assert (view.use_running_average, module.use_running_average) == (True, False)


@pytest.mark.parametrize("name", MODULES)
def test_eval_shape_builds_the_abstract_module(name):
    module = nnx.eval_shape(MODULES[name])
    shapes = {
        path[-1]: (leaf.shape, str(leaf.dtype))
        for path, leaf in nnx.to_flat_state(nnx.state(module))
    }
    assert shapes["scale"] == ((C,), "float32")
    assert ("mean" in shapes) == (name not in ("GroupNorm", "LayerNorm"))


@pytest.mark.parametrize("name", MODULES)
def test_tabulate_runs_a_training_call(name):
    x = jnp.arange(2 * 3 * 3 * C, dtype=jnp.float32).reshape(2, 3, 3, C)
    module = MODULES[name]()
    if name in WITH_MODE:
        module.train()
    table = re.sub(r"\x1b\[[0-9;]*m", "", nnx.tabulate(module, x))  # without the colors
    assert f"{type(module).__name__} Summary" in table
    assert "│ float32[2,3" in table  # the call ran: its input is listed
    # scale and bias (8), and mean, var and the counter (9) where there are statistics
    total = 8 if name in ("GroupNorm", "LayerNorm") else 17
    assert f"Total Parameters: {total} " in table
