"""Data parallelism over devices and hosts — every mesh / collective call of the scripts.

The batch is split over a one-axis mesh ``("batch",)`` of ``devices_per_process`` devices of
each process; the model state is replicated. The steps themselves are ``train.step``'s; here
they run under ``jax.shard_map`` (the successor of ``pmap``) with ``axis_name="batch"``: batch
norm statistics are synced over the devices with ``jaxbn.sync_batch_norm`` (exactly PyTorch's
SyncBatchNorm numbers), and the gradients of the replicated parameters arrive summed over the
devices.
"""

from __future__ import annotations

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
