"""One process of the multi-host tests.

``python -m tests.multihost_worker PORT RANK OUT [MODE]``:

Joins a 2-process cluster (2 CPU devices each), runs 3 synced BatchNorm2d training steps over
the 4 devices on its half of a fixed global batch, and saves its outputs to OUT (.npz).
MODE ``die-after-init`` exits abruptly after joining (to test that the peer does not hang;
the peer runs as ``survivor``: 5 s without heartbeats declare a process dead, 60 s otherwise);
``short-timeout`` gives up joining after 3 s (to test an unreachable coordinator);
``ipv6-join`` joins at ``[::1]:PORT``, checks the 4 devices and leaves;
``stuck-collective``: process 1 never enters the second step's collectives (it sleeps until
killed), so process 0's wait must end with the 5 s collective timeout's error.
The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` in the environment (not
done here, so importing this module from the tests changes nothing).

``python -m tests.multihost_worker train-mlp HOOK FLAGS...``: ``python -m train.mlp FLAGS...``
with a deterministic interruption (see :func:`train_mlp`).
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from jaxbn.multihost import initialize_multihost

C, ROWS, STEPS = 4, 16, 3
STUCK_TIMEOUT = 5  # seconds: the collective timeout of mode stuck-collective


def global_batches():
    """The fixed global batches: [(x, g)] each [ROWS, 3, 3, C]; the parent recomputes them."""
    rng = np.random.default_rng(0)
    return [
        (
            rng.standard_normal((ROWS, 3, 3, C)).astype(np.float32) * 2 + 1,
            rng.standard_normal((ROWS, 3, 3, C)).astype(np.float32),
        )
        for _ in range(STEPS)
    ]


def initial_variables(model):
    variables = model.init(jax.random.key(0), jnp.zeros((2, 3, 3, C)), train=False)
    variables["params"]["scale"] = jnp.linspace(0.5, 2.0, C)
    variables["params"]["bias"] = jnp.linspace(-1.0, 1.0, C)
    return variables


def train_step(model, variables, x, g):
    def loss(params, x):
        y, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y * g), (y, updates["batch_stats"])

    (dparams, dx), (y, stats) = jax.grad(loss, (0, 1), has_aux=True)(variables["params"], x)
    return y, dx, dparams, stats


def local_rows(a: jax.Array) -> np.ndarray:
    """This process's per-device results of a pmap output, stacked: [local devices, ...]."""
    return np.stack([np.asarray(s.data).reshape(s.data.shape[1:]) for s in a.addressable_shards])


def main(port: str, rank: str, out: str, mode: str = "") -> None:
    # Generous limits where nothing is meant to fail: a loaded machine may start one process
    # minutes after the other or starve it for seconds; a hang still ends within them.
    timeout = 3 if mode == "short-timeout" else 300
    heartbeat = 5 if mode in ("survivor", "die-after-init") else 60
    host = "[::1]" if mode == "ipv6-join" else "127.0.0.1"
    initialize_multihost(
        f"{host}:{port}",
        2,
        int(rank),
        timeout_seconds=timeout,
        heartbeat_seconds=heartbeat,
        collective_timeout_seconds=STUCK_TIMEOUT if mode == "stuck-collective" else 300,
    )
    if mode == "die-after-init":
        os._exit(3)
    if mode == "ipv6-join":
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        jax.distributed.shutdown()
        return
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    model = jaxbn.BatchNorm2d(C)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0, 0))
    @jaxbn.sync_batch_norm("batch")
    def step(variables, x, g):
        y, dx, dparams, stats = train_step(model, variables, x, g)
        return y, dx, jax.lax.psum(dparams, "batch"), stats

    variables = initial_variables(model)
    local = slice(int(rank) * ROWS // 2, (int(rank) + 1) * ROWS // 2)
    saved = {}
    for i, (x, g) in enumerate(global_batches()):
        xs = x[local].reshape(2, ROWS // 4, 3, 3, C)
        gs = g[local].reshape(2, ROWS // 4, 3, 3, C)
        if mode == "stuck-collective" and i == 1:  # both ran step 0 (and set up gloo)
            if rank == "1":
                # alive (heartbeats go on) but never in step 1's collectives, until process 0
                # has failed, however slowly a loaded machine runs, and the test kills this one
                time.sleep(600)
            try:  # process 0: the step must fail, naming the collective
                jax.block_until_ready(step(variables, xs, gs))
            except Exception as err:
                print(err, file=sys.stderr, flush=True)
                os._exit(1)  # not exit's jax.distributed shutdown, which waits for the peer
        y, dx, dparams, stats = step(variables, xs, gs)
        y, dx, dparams, stats = jax.tree.map(local_rows, (y, dx, dparams, stats))
        variables = {**variables, "batch_stats": jax.tree.map(lambda a: a[0], stats)}
        saved.update(
            {
                f"y{i}": y.reshape(-1, 3, 3, C),
                f"dx{i}": dx.reshape(-1, 3, 3, C),
                f"dscale{i}": dparams["scale"],
                f"dbias{i}": dparams["bias"],
                f"mean{i}": stats["mean"],
                f"var{i}": stats["var"],
                f"count{i}": stats["num_batches_tracked"],
            }
        )
    np.savez(out, **saved)
    jax.distributed.shutdown()


def train_mlp(hook: str, *flags: str) -> int:
    """``python -m train.mlp FLAGS`` with ``hook``: ``sigterm-at-N`` (the process sends itself
    SIGTERM during its N-th training step, as a scheduler's preemption notice would arrive),
    ``kill-in-save-E`` (SIGKILL once the checkpoint of epoch E is written but not yet renamed
    into place: a kill during the save), or ``none``."""
    import signal

    from train import mlp

    kind, _, number = hook.rpartition("-")
    if kind == "sigterm-at":
        from train.parallel import DataParallel

        real_train_step, calls = DataParallel.train_step, []

        def train_step(self, model, tx, batch_size):
            step = real_train_step(self, model, tx, batch_size)

            def signalled(state, x, y):
                calls.append(1)
                if len(calls) == int(number):
                    os.kill(os.getpid(), signal.SIGTERM)
                return step(state, x, y)

            return signalled

        DataParallel.train_step = train_step
    elif kind == "kill-in-save":
        from orbax.checkpoint._src.path import atomicity

        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            final = self.get_final()
            if final.parent.name == "checkpoints" and final.name == number:
                os.kill(os.getpid(), signal.SIGKILL)  # the data is written, not renamed
            return await real_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif hook != "none":
        raise ValueError(f"unknown hook {hook!r}")
    return mlp.main(list(flags))


if __name__ == "__main__":
    if sys.argv[1] == "train-mlp":
        sys.exit(train_mlp(*sys.argv[2:]))
    main(*sys.argv[1:])
