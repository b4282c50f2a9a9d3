"""``nn.tabulate`` with FLOPs runs on every jaxbn Linen module, and the counter is int32."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxbn

C = 4
WIDE = {"width": 400, "force_terminal": False}  # no wrapped names

MODULES = {
    "BatchNorm1d": (lambda: jaxbn.BatchNorm1d(C), {"train": True}),
    "BatchNorm": (lambda: jaxbn.BatchNorm(C, affine=False), {"train": False}),
    "FrozenBatchNorm": (lambda: jaxbn.FrozenBatchNorm(C), {"train": True}),
    "GhostBatchNorm": (lambda: jaxbn.GhostBatchNorm(C, 4), {"train": True}),
    "BatchRenorm": (lambda: jaxbn.BatchRenorm(C, warmup_steps=5), {"train": True}),
    "GroupNorm": (lambda: jaxbn.GroupNorm(2, C), {}),
    "LayerNorm": (lambda: jaxbn.LayerNorm(C), {}),
    "flax_compat.BatchNorm": (
        lambda: jaxbn.flax_compat.BatchNorm(use_scale=False),
        {"use_running_average": False},
    ),
    "flax_compat.BatchNorm with a mask": (
        jaxbn.flax_compat.BatchNorm,
        {"use_running_average": False, "mask": jnp.arange(8)[:, None] < 6},
    ),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_tabulate_with_flops_and_every_call_shown_runs_on_a_jaxbn_module(name):
    make, kwargs = MODULES[name]
    table = nn.tabulate(
        make(),
        jax.random.key(0),
        compute_flops=True,
        compute_vjp_flops=True,
        show_repeated=True,
        console_kwargs=WIDE,
    )(jnp.ones((8, C)), **kwargs)
    assert "vjp_flops" in table
    # its helpers are not calls of their own (each would be a row, run alone for its FLOPs)
    assert "_affine_params" not in table and "_refuse" not in table


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = jaxbn.BatchNorm1d(C)(nn.Dense(C)(x), train=train)
        x = jaxbn.GhostBatchNorm(C, 4)(x, train=train)
        return jaxbn.flax_compat.BatchNorm()(x, use_running_average=not train)


def test_tabulate_with_flops_runs_on_a_model_of_jaxbn_layers():
    table = nn.tabulate(
        Net(), jax.random.key(0), compute_flops=True, compute_vjp_flops=True, console_kwargs=WIDE
    )(jnp.ones((8, C)), train=True)
    assert "GhostBatchNorm_0" in table and "BatchNorm1d_0" in table


def test_num_batches_tracked_is_int32_also_under_jax_enable_x64():
    # x64 is a process-wide switch: a process of its own
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, jaxbn
        x = jnp.arange(16.0).reshape(8, 2)
        assert x.dtype == jnp.float64
        counters = {}
        for name, bn in [("bn", jaxbn.BatchNorm1d(2)), ("frozen", jaxbn.FrozenBatchNorm(2)),
                         ("ghost", jaxbn.GhostBatchNorm(2, 4)), ("renorm", jaxbn.BatchRenorm(2)),
                         ("compat", jaxbn.flax_compat.BatchNorm())]:
            kw = {"use_running_average": False} if name == "compat" else {"train": True}
            variables = bn.init(jax.random.key(0), x, **{k: not v for k, v in kw.items()})
            counters[name + " init"] = variables["batch_stats"]["num_batches_tracked"]
            _, updates = bn.apply(variables, x, mutable=["batch_stats"], **kw)
            counters[name + " trained"] = updates["batch_stats"]["num_batches_tracked"]
            if name != "compat":
                stats = jaxbn.update_bn(bn.apply, variables, [x])["batch_stats"]
                counters[name + " update_bn"] = stats["num_batches_tracked"]
        bn = jaxbn.BatchNorm1d(2)
        variables = bn.init(jax.random.key(0), x, train=False)
        loaded = dict(variables["batch_stats"], num_batches_tracked=jnp.asarray(5, jnp.int64))
        stats = jaxbn.update_bn(bn.apply, {**variables, "batch_stats": loaded}, [x])
        counters["int64 loaded, update_bn"] = stats["batch_stats"]["num_batches_tracked"]
        print({k: str(v.dtype) for k, v in counters.items()})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dtypes = eval(out.stdout.strip().splitlines()[-1])
    assert len(dtypes) == 15
    assert set(dtypes.values()) == {"int32"}, dtypes
