"""The fields the batch norm variants share (jaxbn/linen/variant_fields.py) and the rank classes
made by ``_module_logic.rank_variants``: who takes what by position, and what a mistake gets."""

import pickle
import warnings

import jax.numpy as jnp
import pytest

import jaxbn
import jaxbn.nnx
from jaxbn import functional as F
from jaxbn.linen.batch_norm import MomentumConventionWarning


@pytest.mark.parametrize(
    "build",
    [
        lambda: jaxbn.BatchRenorm(8, 1e-3),
        lambda: jaxbn.GhostBatchNorm(8, 4, 1e-3),
    ],
    ids=["renorm", "ghost"],
)
def test_a_variants_options_are_refused_by_position(build):
    # eps by position would once have been accepted; now it cannot land in the wrong option
    with pytest.raises(TypeError, match="positional argument"):
        build()


def test_variants_take_their_sizes_by_position():
    ghost = jaxbn.GhostBatchNorm(8, 4, momentum=0.2)
    assert (ghost.num_features, ghost.virtual_batch_size, ghost.momentum) == (8, 4, 0.2)
    assert jaxbn.BatchRenorm(8, r_max=2.0).num_features == 8


def test_frozen_batch_norm_takes_eps_by_position_like_torchvision():
    # torchvision.ops.FrozenBatchNorm2d(num_features, eps=1e-5)
    assert jaxbn.FrozenBatchNorm(8, 1e-3).eps == 1e-3
    with pytest.raises(TypeError, match="positional argument"):
        jaxbn.FrozenBatchNorm(8, 1e-3, False)


def test_ghost_batch_norm_functional_takes_the_parameters_by_keyword():
    x, w = jnp.ones((4, 3)), jnp.ones(3)
    with pytest.raises(TypeError, match="positional argument"):
        F.ghost_batch_norm(x, None, None, w, w, virtual_batch_size=2)
    y, _, _ = F.ghost_batch_norm(
        x, None, None, virtual_batch_size=2, training=True, weight=w, bias=2 * w
    )
    assert float(jnp.abs(y - 2.0).max()) == 0.0  # constant input: normalized to 0, plus bias


@pytest.mark.parametrize(
    "cls, module",
    [
        (jaxbn.BatchNorm1d, "jaxbn.linen.batch_norm"),
        (jaxbn.BatchNorm3d, "jaxbn.linen.batch_norm"),
        (jaxbn.nnx.BatchNorm2d, "jaxbn.nnx.batch_norm"),
    ],
)
def test_rank_classes_are_named_and_pickle_by_name(cls, module):
    name = cls.__name__
    assert (cls.__module__, cls.__qualname__) == (module, name)
    assert name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert cls.__doc__.startswith(f"``torch.nn.{name}``")


def warning_text(build) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    [warning] = [w for w in caught if w.category is MomentumConventionWarning]
    assert warning.filename == __file__  # the user's line that built the module
    return str(warning.message)


def test_each_module_warns_with_its_own_users_convention():
    ghost = warning_text(lambda: jaxbn.GhostBatchNorm(8, 4, momentum=0.9))
    renorm = warning_text(lambda: jaxbn.BatchRenorm(8, momentum=0.99))
    bn = warning_text(lambda: jaxbn.BatchNorm(8, momentum=0.95))
    assert "Flax's momentum=0.9 is jaxbn's 0.1" in ghost
    assert "Keras's momentum=0.99 is jaxbn's 0.01" in renorm
    assert "pass momentum=0.01" in renorm
    # jaxbn.flax_compat.BatchNorm is a way out for BatchNorm only, not for the variants
    assert "flax_compat.BatchNorm" in bn
    assert "flax_compat" not in ghost and "flax_compat" not in renorm


def test_each_line_that_builds_a_variant_gets_its_warning():
    # once per message and line: a second variant built elsewhere is not silenced by the first
    first = warning_text(lambda: jaxbn.GhostBatchNorm(8, 2, momentum=0.8))
    second = warning_text(lambda: jaxbn.GhostBatchNorm(8, 2, momentum=0.8))
    assert first == second


def test_a_refused_variant_does_not_use_up_the_warning_of_a_valid_one():
    # one line builds both: the warning is once per message and line (a non-positive eps is
    # built, as in torch, and refused when it runs: virtual_batch_size=0 is refused here)
    for size in (0, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                jaxbn.GhostBatchNorm(8, size, momentum=0.85)
            except ValueError:
                assert size == 0
    assert [w.category for w in caught] == [MomentumConventionWarning]
