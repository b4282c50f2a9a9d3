"""Data parallelism over devices and hosts — every mesh / collective call of the scripts.

The batch is split over a one-axis mesh ``("batch",)`` of ``devices_per_process`` devices of
each process; the model state is replicated. The steps themselves are ``train.step``'s; here
they run under ``jax.shard_map`` (the successor of ``pmap``) with ``axis_name="batch"``: batch
norm statistics are synced over the devices with ``jaxbn.sync_batch_norm`` (exactly PyTorch's
SyncBatchNorm numbers), and the gradients of the replicated parameters arrive summed over the
devices.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import step as steps

AXIS = "batch"
State = steps.State

#: Steps whose programs a CPU run over several devices may queue behind the one running (see
#: :class:`Pacer`): 3 steps of 3-4 programs each (batch, step, metrics, augmentation) stay far
#: below XLA's limit of 32 programs in flight per CPU device.
IN_FLIGHT_STEPS = 2


class DataParallel:
    """A mesh over ``devices_per_process`` local devices of every process."""

    def __init__(self, devices_per_process: int):
        available = jax.local_device_count()
        if devices_per_process > available:
            raise ValueError(
                f"--devices {devices_per_process} requested but only {available} "
                f"{jax.default_backend()} device(s) exist in this process"
                + _why_fewer_devices(devices_per_process)
            )
        devices = [
            d
            for process in range(jax.process_count())
            for d in [d for d in jax.devices() if d.process_index == process][:devices_per_process]
        ]
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.size = len(devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P(AXIS))

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise ValueError(
                f"--batch-size {batch_size} does not divide across {self.size} devices; "
                f"use a multiple of {self.size}"
            )

    def pacer(self) -> Pacer:
        """A :class:`Pacer` for one loop over steps; it waits only in CPU runs over several
        devices (one process or many), whose steps hold collectives."""
        return Pacer(IN_FLIGHT_STEPS, self.size > 1 and jax.default_backend() == "cpu")

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def shard(self, *global_arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Global batch arrays (identical on every process) → arrays split over the mesh; each
        process contributes only its own rows."""
        count, index = jax.process_count(), jax.process_index()
        out = []
        for a in global_arrays:
            rows = a.shape[0] // count
            local = a[index * rows : (index + 1) * rows]
            out.append(jax.make_array_from_process_local_data(self.split, local, a.shape))
        return tuple(out)

    def train_step(
        self, model, tx: optax.GradientTransformation, batch_size: int
    ) -> Callable[[State, jax.Array, jax.Array], tuple[State, dict]]:
        """``(state, x, y) → (state, {"loss", "accuracy"})`` for one global batch: the step of
        :func:`train.step.train_step`, per device, synced over the mesh."""
        step = steps.train_step(model, tx, batch_size, axis_name=AXIS)

        def local_step(state, x, labels):
            new_state, metrics, _ = step(state, x, labels)
            return new_state, metrics

        mapped = jax.shard_map(
            local_step,
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=(P(), P()),
        )
        return jax.jit(mapped, donate_argnums=0)

    def eval_step(self, model) -> Callable[..., dict]:
        """``(state, x, y, mask) → {"loss_sum", "correct", "count"}`` over the masked batch:
        :func:`train.step.eval_step` per device, summed over the mesh."""
        mapped = jax.shard_map(
            steps.eval_step(model, axis_name=AXIS),
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
            out_specs=P(),
        )
        return jax.jit(mapped)


class Pacer:
    """Keeps the host at most ``window`` steps ahead of the devices: called with each step's
    outputs, it waits for those of the step ``window`` steps earlier (when ``active``).

    Why a CPU run over several devices needs it: XLA's CPU client runs every program on a pool
    of max(cores, local devices) threads (2 here), and a program with a cross-process collective
    needs one thread per local device at the same time. Launching a program on a device that
    already has the limit of programs in flight (32; 1 with ``jax_cpu_enable_async_dispatch``
    off) blocks a pool thread until one finishes; with the host far ahead (the loop looks at the
    devices every 16 steps, 3 programs a step), a blocked launch can hold the thread that the
    running collective's second device needs: that process never enters the collective and both
    processes wait forever (seen under load as one process in the batch gather, the other in a
    step, all threads idle). One process over several devices starves the same way: its
    collective's rendezvous waits for a device thread a blocked launch holds, and XLA aborts
    the process after its rendezvous timeout (seen under load with 4 devices on 2 cores). With
    at most ``window`` steps queued no launch ever blocks; a run on one device has no
    collective and keeps its full host lead.

    Outputs passed in must not be donated later (the step's metrics, not its state).
    """

    def __init__(self, window: int, active: bool):
        self.window, self.active = window, active
        self._pending: collections.deque = collections.deque()

    def __call__(self, outputs: Any) -> None:
        if not self.active:
            return
        self._pending.append(outputs)
        if len(self._pending) > self.window:
            jax.block_until_ready(self._pending.popleft())


def _why_fewer_devices(requested: int) -> str:
    if jax.default_backend() != "cpu":
        return ""
    preset = re.search(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    if preset:
        return (
            f": XLA_FLAGS in the environment fixes the CPU device count at {preset.group(1)} and "
            f"wins over --devices; unset it, or set --xla_force_host_platform_device_count="
            f"{requested} in it"
        )
    # JAX started before the flags were parsed (e.g. when the loop is called from Python).
    return (
        f": the CPU device count is fixed when JAX starts; set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={requested} before importing jax"
    )
