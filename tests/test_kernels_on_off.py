"""Turning the CPU kernels off (``JAXBN_NATIVE=0``) changes no result beyond float rounding.

The kernels sum in another order than XLA's reductions (blocks of 32 in float, then double),
so statistics may differ in the last bits of float32: tolerance 2e-6 relative on float32
values summed over 2,048 elements per channel (a few float32 ulps). A bfloat16 output is
rounded once from float32, so two float32 values a few ulps apart can round to neighbouring
bfloat16 values: at most one bfloat16 ulp (relative 2⁻⁸ = 0.0039), and only on a few elements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxbn._cpu_kernels import build as native

RUN = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jaxbn
    from jaxbn._cpu_kernels import build as native

    def run(dtype):
        model = jaxbn.BatchNorm2d(8, momentum=0.3)
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((8, 16, 16, 8)) * 3 + 5 for _ in range(3)]
        xs = [jnp.asarray(x, jnp.float32).astype(dtype) for x in xs]
        g = jnp.asarray(rng.standard_normal((8, 16, 16, 8)), jnp.float32).astype(dtype)
        variables = model.init(jax.random.key(0), xs[0], train=False)
        params = {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)}

        @jax.jit
        def step(params, stats, x):
            def loss(params, x):
                y, updates = model.apply(
                    {"params": params, "batch_stats": stats}, x, train=True,
                    mutable=["batch_stats"])
                return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), (y, updates)
            (grads, dx), (y, updates) = jax.grad(loss, (0, 1), has_aux=True)(params, x)
            return y, dx, grads, updates["batch_stats"]

        stats, out = variables["batch_stats"], {}
        for x in xs:
            y, dx, grads, stats = step(params, stats, x)
        out = {"y": y, "dx": dx, "dscale": grads["scale"], "dbias": grads["bias"],
               "mean": stats["mean"], "var": stats["var"]}
        return {k: np.asarray(v, np.float32).tolist() for k, v in out.items()}

    print(json.dumps({"native": native.load(), "float32": run(jnp.float32),
                      "bfloat16": run(jnp.bfloat16)}))
"""


def _start(native_flag: str) -> subprocess.Popen:
    env = {**os.environ, "JAXBN_NATIVE": native_flag}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUN)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=1200)  # a hang only; loaded machines are slow
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def on_and_off():
    if not native.load():
        pytest.skip("no C++ compiler here: the kernels cannot be turned on")
    processes = _start("1"), _start("0")  # side by side, on two cores
    try:
        on, off = (_results(process) for process in processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert on["native"] and not off["native"]
    return on, off


@pytest.mark.parametrize("name", ["y", "dx", "dscale", "dbias", "mean", "var"])
def test_float32_results_agree_with_the_kernels_off(on_and_off, name):
    on, off = (np.asarray(r["float32"][name]) for r in on_and_off)
    np.testing.assert_allclose(on, off, rtol=2e-6, atol=2e-6 * np.abs(off).max())


@pytest.mark.parametrize("name", ["y", "dx"])
def test_bfloat16_outputs_differ_by_at_most_one_bfloat16_ulp_on_few_elements(on_and_off, name):
    on, off = (np.asarray(r["bfloat16"][name]) for r in on_and_off)
    ulp = np.maximum(np.abs(off), 2.0**-126) * 2.0**-7  # spacing of bf16 numbers near |off|
    assert np.all(np.abs(on - off) <= ulp)
    assert np.mean(on != off) < 0.01


@pytest.mark.parametrize("name", ["dscale", "dbias", "mean", "var"])
def test_bfloat16_statistics_and_parameter_gradients_agree_in_float32(on_and_off, name):
    on, off = (np.asarray(r["bfloat16"][name]) for r in on_and_off)
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5 * np.abs(off).max())
