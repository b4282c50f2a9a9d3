"""Ghost batch norm against torch BatchNorm applied split by split:
``torch.cat([bn(s) for s in x.split(virtual_batch_size)])`` — outputs, gradients and the
running buffers over several steps; eval, errors, and devices (virtual batches stay local)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxbn import functional as F
from jaxbn.linen.batch_norm import BatchNorm
from jaxbn.linen.ghost_batch_norm import GhostBatchNorm
from jaxbn.sync import sync_batch_norm
from tests.bn_train_step import bn_train_step
from tests.parity_report import assert_close

C = 3
# jitted: one compile instead of one per operation in eager mode
ghost_batch_norm = jax.jit(
    F.ghost_batch_norm, static_argnames=("training", "virtual_batch_size", "axis")
)
batch_norm = jax.jit(F.batch_norm, static_argnames=("training",))
nchw = lambda a: np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1))


def data(step, shape, seed=0):
    rng = np.random.default_rng(100 * seed + step)
    # each example its own offset: the virtual batches have different statistics
    x = rng.normal(size=shape) + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)) * 2
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


def twins(momentum, shape, virtual_batch_size):
    tm = torch.nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        tm.weight.copy_(torch.linspace(0.5, 2.0, C))
        tm.bias.copy_(torch.linspace(-1.0, 1.0, C))
    model = GhostBatchNorm(C, virtual_batch_size=virtual_batch_size, momentum=momentum)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    variables["params"] = {"scale": jnp.linspace(0.5, 2.0, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    return tm, model, variables


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_torch_batchnorm_applied_split_by_split_over_steps(momentum):
    shape, v = (12, 2, 2, C), 4  # NHWC, three virtual batches
    tm, model, variables = twins(momentum, shape, v)
    group = "ghost BN vs torch split by split"
    for step in range(3):
        x, g = data(step, shape)
        y, dx, dparams, stats = bn_train_step(model, variables, x, g)
        x_t = torch.tensor(nchw(x), requires_grad=True)
        tm.weight.grad = tm.bias.grad = None
        y_t = torch.cat([tm(s) for s in x_t.split(v)])
        (y_t * torch.tensor(nchw(g))).sum().backward()
        assert_close(group, nchw(y), y_t.detach().numpy(), 1e-5, 2e-5)
        assert_close(group, nchw(dx), x_t.grad.numpy(), 1e-5, 2e-5)
        assert_close(group, dparams["scale"], tm.weight.grad.numpy(), 1e-5, 2e-5)
        assert_close(group, dparams["bias"], tm.bias.grad.numpy(), 1e-5, 2e-5)
        assert_close(group, stats["mean"], tm.running_mean.numpy(), 1e-6, 1e-6)
        assert_close(group, stats["var"], tm.running_var.numpy(), 1e-6, 1e-6)
        assert int(stats["num_batches_tracked"]) == int(tm.num_batches_tracked) == 3 * (step + 1)
        variables = {**variables, "batch_stats": stats}
    # eval: the running statistics, any batch size
    tm.eval()
    x, _ = data(9, (5, 2, 2, C))
    y = model.apply(variables, x, train=False)
    assert_close(group, nchw(y), tm(torch.tensor(nchw(x))).detach().numpy(), 1e-5, 2e-5)


def test_the_virtual_batches_really_have_their_own_statistics():
    x, _ = data(0, (8, C))
    y = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4)[0]
    np.testing.assert_allclose(y.reshape(2, 4, C).mean(1), 0, atol=1e-6)
    assert float(jnp.abs(y - batch_norm(x, None, None, training=True)[0]).max()) > 0.1


def test_a_virtual_batch_of_the_whole_batch_is_batch_norm():
    shape = (6, C)
    x, g = data(0, shape)
    ghost = GhostBatchNorm(C, virtual_batch_size=6)
    variables = ghost.init(jax.random.key(0), x, train=False)
    got = bn_train_step(ghost, variables, x, g)
    expected = bn_train_step(BatchNorm(C), variables, x, g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_virtual_batch_size_that_does_not_divide_the_batch_is_refused_in_training():
    model = GhostBatchNorm(C, virtual_batch_size=4)
    variables = model.init(jax.random.key(0), jnp.zeros((10, C)), train=False)  # init: any N
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 does not divide the batch of 10"):
        model.apply(variables, jnp.zeros((10, C)), train=True, mutable=["batch_stats"])
    assert model.apply(variables, jnp.zeros((10, C)), train=False).shape == (10, C)


def test_one_value_per_channel_in_a_virtual_batch_is_refused_like_torch():
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        F.ghost_batch_norm(jnp.ones((4, C)), None, None, training=True, virtual_batch_size=1)


def test_without_running_statistics_eval_splits_like_torch():
    shape, v = (8, 2, 2, C), 4
    tm = torch.nn.BatchNorm2d(C, track_running_stats=False).eval()
    model = GhostBatchNorm(C, virtual_batch_size=v, track_running_stats=False)
    x, _ = data(0, shape)
    variables = model.init(jax.random.key(0), x, train=False)
    assert "batch_stats" not in variables
    y = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    expected = torch.cat([tm(s) for s in torch.tensor(nchw(x)).split(v)]).detach().numpy()
    assert_close(
        "ghost BN vs torch split by split",
        nchw(y),
        expected,
        1e-5,
        2e-5,
    )


def test_a_mask_counts_per_virtual_batch():
    x, _ = data(0, (8, C))
    mask = jnp.asarray(np.random.default_rng(0).random((8, C)) > 0.3)
    y, rm, rv = ghost_batch_norm(
        x, jnp.zeros(C), jnp.ones(C), training=True, virtual_batch_size=4, mask=mask
    )
    m, v = jnp.zeros(C), jnp.ones(C)
    parts = []
    for k in range(2):
        part, m, v = batch_norm(
            x[4 * k : 4 * k + 4], m, v, training=True, mask=mask[4 * k : 4 * k + 4]
        )
        parts.append(part)
    np.testing.assert_allclose(y, jnp.concatenate(parts), atol=1e-6)
    np.testing.assert_allclose(rm, m, atol=1e-7)
    np.testing.assert_allclose(rv, v, atol=1e-7)


def test_virtual_batches_stay_on_their_device_and_the_sync_switch_is_ignored():
    n, shape, v = 2, (8, 2, C), 2
    model = GhostBatchNorm(C, virtual_batch_size=v)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    x, g = data(0, (n * shape[0], *shape[1:]))
    split = lambda a: a.reshape(n, *shape)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0, 0))
    @sync_batch_norm("batch")
    def per_device(variables, x, g):
        return bn_train_step.__wrapped__(model, variables, x, g)

    p_y, p_dx, _, p_stats = per_device(variables, split(x), split(g))
    for d in range(n):
        y, dx, _, stats = bn_train_step(model, variables, split(x)[d], split(g)[d])
        np.testing.assert_allclose(p_y[d], y, atol=1e-6)
        np.testing.assert_allclose(p_dx[d], dx, atol=1e-6)
        for k in ("mean", "var"):
            np.testing.assert_allclose(p_stats[k][d], stats[k], atol=1e-7)
    # local statistics differ per device (as torch DDP without SyncBatchNorm)
    assert float(jnp.abs(p_stats["mean"][0] - p_stats["mean"][1]).max()) > 1e-3


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, TypeError, "GhostBatchNorm needs virtual_batch_size"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size must be positive, got 0"),
        ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size must be an int"),
    ],
)
def test_bad_virtual_batch_sizes_are_refused_when_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        GhostBatchNorm(C, **kwargs)


def test_the_batch_axis_cannot_be_the_feature_axis():
    with pytest.raises(ValueError, match="splits the batch on axis 0"):
        F.ghost_batch_norm(
            jnp.ones((4, C)), None, None, training=True, virtual_batch_size=2, axis=0
        )
