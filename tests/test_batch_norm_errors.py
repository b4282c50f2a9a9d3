"""Every batch-norm error case raises at trace time with PyTorch's wording (checked against
torch where torch has the case)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
import torch
import torch.nn.functional as TF

import jaxbn
from jaxbn import functional as F


def torch_message(fn) -> str:
    with pytest.raises((ValueError, RuntimeError)) as info:
        fn()
    return str(info.value)


def jax_raises(fn, message: str, exc=(ValueError, RuntimeError)):
    with pytest.raises(exc, match=re.escape(message)):
        jax.jit(fn)()  # under jit: the error must come at trace time


def test_one_value_per_channel_in_training_is_refused_like_torch():
    torch_msg = torch_message(lambda: torch.nn.BatchNorm1d(3)(torch.randn(1, 3)))
    assert torch_msg.startswith("Expected more than 1 value per channel when training")
    jax_raises(
        lambda: F.batch_norm(jnp.ones((1, 3)), jnp.zeros(3), jnp.ones(3), training=True),
        "Expected more than 1 value per channel when training, got input size (1, 3)",
    )


def test_a_batch_of_one_never_silently_returns_bias_from_the_module():
    bn = jaxbn.BatchNorm2d(3)
    x = jnp.ones((1, 1, 1, 3))
    variables = bn.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_untracked_module_needs_more_than_one_value_in_eval_too_like_torch():
    tm = torch.nn.BatchNorm1d(3, track_running_stats=False).eval()
    assert "more than 1 value" in torch_message(lambda: tm(torch.randn(1, 3)))
    bn = jaxbn.BatchNorm1d(3, track_running_stats=False)
    x = jnp.ones((1, 3))
    variables = bn.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.apply(variables, x, train=False)


@pytest.mark.parametrize(
    "cls,torch_cls,ndim",
    [
        (jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, 4),
        (jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, 1),
        (jaxbn.BatchNorm2d, torch.nn.BatchNorm2d, 3),
        (jaxbn.BatchNorm3d, torch.nn.BatchNorm3d, 4),
    ],
)
def test_wrong_rank_is_refused_with_torchs_message(cls, torch_cls, ndim):
    shape = (2, 3) + (2,) * (ndim - 2) if ndim >= 2 else (3,)
    expected = torch_message(lambda: torch_cls(3)(torch.randn(shape)))
    with pytest.raises(ValueError, match=re.escape(expected)):
        cls(3).init(jax.random.key(0), jnp.ones(shape), train=False)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_sized_stats_or_params_are_refused_with_torchs_message(name):
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    args[name] = torch.ones(4)
    expected = torch_message(lambda: TF.batch_norm(torch.randn(4, 3), training=True, **args))
    jargs = {"running_mean": jnp.zeros(3), "running_var": jnp.ones(3)}
    jargs[name] = jnp.ones(4)
    jax_raises(lambda: F.batch_norm(jnp.ones((4, 3)), training=True, **jargs), expected)


def test_module_with_the_wrong_num_features_is_refused_like_torch():
    expected = torch_message(lambda: torch.nn.BatchNorm1d(4)(torch.randn(5, 3)))
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        jaxbn.BatchNorm1d(4).init(jax.random.key(0), jnp.ones((5, 3)), train=False)


def test_module_without_variables_checks_num_features_too():
    bn = jaxbn.BatchNorm1d(4, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="expected 4 features on axis -1"):
        bn.init(jax.random.key(0), jnp.ones((5, 3)), train=False)


def test_eval_without_running_stats_is_refused_like_torch():
    expected = torch_message(lambda: TF.batch_norm(torch.randn(4, 3), None, None, training=False))
    jax_raises(lambda: F.batch_norm(jnp.ones((4, 3)), None, None, training=False), expected)


@pytest.mark.parametrize("eps,training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_bad_eps_is_refused_like_torch(eps, training):
    expected = torch_message(
        lambda: TF.batch_norm(
            torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=training, eps=eps
        )
    )
    jax_raises(
        lambda: F.batch_norm(
            jnp.ones((4, 3)), jnp.zeros(3), jnp.ones(3), training=training, eps=eps
        ),
        expected,
    )


def test_zero_eps_is_allowed_in_eval_like_torch():
    y, _, _ = F.batch_norm(jnp.ones((4, 3)), jnp.zeros(3), jnp.ones(3), training=False, eps=0.0)
    assert jnp.allclose(y, 1.0)


def test_train_is_a_required_keyword():
    bn = jaxbn.BatchNorm1d(3)
    variables = bn.init(jax.random.key(0), jnp.ones((4, 3)), train=False)
    with pytest.raises(TypeError, match="train"):
        bn.apply(variables, jnp.ones((4, 3)))


def test_a_non_boolean_mask_is_refused():
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        F.batch_norm(jnp.ones((4, 3)), None, None, training=True, mask=jnp.ones((4, 3)))


def test_a_mask_that_does_not_broadcast_is_refused():
    with pytest.raises(ValueError, match="not broadcastable"):
        F.batch_norm(jnp.ones((4, 3)), None, None, training=True, mask=jnp.ones((5, 1), bool))


def test_functional_momentum_none_points_to_the_module():
    with pytest.raises(ValueError, match="momentum=None"):
        F.batch_norm(jnp.ones((4, 3)), jnp.zeros(3), jnp.ones(3), training=True, momentum=None)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize(
    "make, tracking",
    [
        (lambda eps: jaxbn.BatchNorm1d(3, eps=eps), True),
        (lambda eps: jaxbn.BatchNorm1d(3, eps=eps, track_running_stats=False), False),
        (lambda eps: jaxbn.flax_compat.BatchNorm(epsilon=eps), True),
    ],
    ids=["BatchNorm1d", "untracked", "flax_compat"],
)
def test_a_negative_eps_module_is_built_and_refused_when_it_runs_like_torch(
    make, tracking, training
):
    # torch builds it and raises in forward: "positive during training" where the batch's
    # statistics are used (training, or eval without running statistics), else "non-negative"
    torch_bn = torch.nn.BatchNorm1d(3, eps=-1.0, track_running_stats=tracking).train(training)
    expected = torch_message(lambda: torch_bn(torch.randn(4, 3)))
    bn = make(-1.0)  # built, as torch's
    if isinstance(bn, jaxbn.flax_compat.BatchNorm):
        kwargs = {"use_running_average": not training}
    else:
        kwargs = {"train": training}
    jax_raises(lambda: bn.init(jax.random.key(0), jnp.ones((4, 3)), **kwargs), expected)
