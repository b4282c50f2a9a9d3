"""BatchNorm1d/2d/3d against torch.nn.BatchNorm*: outputs, gradients and running statistics
over many training steps, then eval outputs, across layouts, momenta, affine and tracking."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from tests.parity_report import assert_close
from tests.torch_twins import to_jax, to_numpy

SHAPES = {
    "1d-NC": (jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    "1d-NCL": (jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, (5, 4, 3)),
    "2d": (jaxbn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5)),
    "3d": (jaxbn.BatchNorm3d, torch.nn.BatchNorm3d, (3, 3, 2, 3, 4)),
}
MOMENTA = [0.1, 0.3, 0.0, None]


def run_against_torch(name, channels_last, momentum, affine, track, dtype, steps, tol, group):
    jax_cls, torch_cls, shape = SHAPES[name]
    torch_dtype = {jnp.float32: torch.float32, jnp.float64: torch.float64}[dtype]
    channels = shape[1]
    gen = torch.Generator().manual_seed(hash((name, momentum, affine, track)) % 2**31)
    tm = torch_cls(channels, momentum=momentum, affine=affine, track_running_stats=track)
    tm = tm.to(torch_dtype)
    jm = jax_cls(
        channels,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        axis=-1 if channels_last else 1,
        param_dtype=dtype,
    )
    variables = jm.init(jax.random.key(0), to_jax(torch.zeros(shape), channels_last), train=False)
    params = {}
    if affine:
        with torch.no_grad():
            tm.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
            tm.bias.copy_(torch.randn(channels, generator=gen))
        params = {
            "scale": jnp.asarray(tm.weight.detach().numpy()),
            "bias": jnp.asarray(tm.bias.detach().numpy()),
        }
    stats = variables.get("batch_stats", {})

    def loss(params, x, cotangent, stats):
        y, updates = jm.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y * cotangent), (y, updates.get("batch_stats", {}))

    # jitted: one compile, then each step is one call (differentiated op by op, a step costs
    # more than the compile)
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    tm.train()
    for _ in range(steps):
        x_t = (torch.randn(shape, generator=gen) * 2 + 0.5).to(torch_dtype).requires_grad_()
        g_t = torch.randn(shape, generator=gen).to(torch_dtype)
        y_t = tm(x_t)
        (y_t * g_t).sum().backward()
        (dparams, dx), (y, stats) = grad_fn(
            params, to_jax(x_t, channels_last), to_jax(g_t, channels_last), stats
        )
        assert_close(f"{group} y", to_numpy(y, channels_last), y_t.detach(), tol, tol)
        assert_close(f"{group} dx", to_numpy(dx, channels_last), x_t.grad, tol, tol)
        if affine:
            assert_close(f"{group} dscale", dparams["scale"], tm.weight.grad, tol, tol)
            assert_close(f"{group} dbias", dparams["bias"], tm.bias.grad, tol, tol)
            tm.weight.grad = tm.bias.grad = None
        if track:
            assert_close(f"{group} running_mean", stats["mean"], tm.running_mean, tol, tol)
            assert_close(f"{group} running_var", stats["var"], tm.running_var, tol, tol)
            assert int(stats["num_batches_tracked"]) == int(tm.num_batches_tracked)
        else:
            assert stats == {}

    tm.eval()
    x_t = torch.randn(shape, generator=gen).to(torch_dtype)
    y_eval = jm.apply(
        {"params": params, "batch_stats": stats}, to_jax(x_t, channels_last), train=False
    )
    with torch.no_grad():
        assert_close(f"{group} eval y", to_numpy(y_eval, channels_last), tm(x_t), tol, tol)


@pytest.mark.parametrize(
    "name,channels_last,momentum,affine,track",
    [
        case
        for case in itertools.product(SHAPES, [True, False], MOMENTA, [True, False], [True, False])
        # without running statistics the momentum is unused: one float and None suffice
        if case[4] or case[2] in (0.1, None)
    ],
)
def test_float32_training_and_eval_match_torch_batchnorm(
    name, channels_last, momentum, affine, track
):
    run_against_torch(
        name,
        channels_last,
        momentum,
        affine,
        track,
        jnp.float32,
        steps=10,
        tol=2e-5,
        group=f"bn float32 {name}",
    )


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_float64_training_and_eval_match_torch_batchnorm_tightly(name, momentum):
    with jax.enable_x64(True):
        run_against_torch(
            name,
            True,
            momentum,
            True,
            True,
            jnp.float64,
            steps=10,
            tol=1e-11,
            group=f"bn float64 {name}",
        )


def test_running_stats_of_the_issue_example_are_exact():
    # X = arange(16).reshape(8, 2): mean [7, 8], unbiased var 24 → 0.1·[7, 8] and 0.9 + 2.4.
    x = jnp.arange(16.0).reshape(8, 2)
    _, mean, var = jaxbn.functional.batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True)
    np.testing.assert_allclose(mean, [0.7, 0.8], rtol=1e-6)
    np.testing.assert_allclose(var, [3.3, 3.3], rtol=1e-6)
