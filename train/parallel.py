"""Data parallelism over devices and hosts — every mesh / collective call of the scripts.

The batch is split over a one-axis mesh ``("batch",)`` of ``devices_per_process`` devices of
each process; the model state is replicated. Steps run under ``jax.shard_map`` (the successor
of ``pmap``): batch norm statistics are synced over the ``"batch"`` axis with
``jaxbn.sync_batch_norm`` (exactly PyTorch's SyncBatchNorm numbers), and the gradients of the
replicated parameters arrive summed over the devices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

AXIS = "batch"
State = dict[str, Any]


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
        """``(state, x, y) → (state, {"loss", "accuracy"})`` for one global batch."""

        def local_step(state, x, labels):
            def loss_fn(params):
                with jaxbn.sync_batch_norm(AXIS):
                    logits, updates = model.apply(
                        {"params": params, "batch_stats": state["batch_stats"]},
                        x,
                        train=True,
                        mutable=["batch_stats"],
                    )
                # the loss in float32 also under --dtype bfloat16 (a no-op in float32)
                logits = logits.astype(jnp.float32)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                # this device's share of the global mean
                return jnp.sum(loss) / batch_size, (logits, updates.get("batch_stats", {}))

            (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"]
            )
            # `params` are replicated (invariant) inputs of shard_map, so `grads` already hold
            # the sum over devices: the gradient of the global mean loss.
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            new_state = {
                "params": optax.apply_updates(state["params"], updates),
                "batch_stats": stats,
                "opt_state": opt_state,
            }
            correct = jnp.sum(jnp.argmax(logits, -1) == labels)
            metrics = {
                "loss": jax.lax.psum(loss, AXIS),
                "accuracy": jax.lax.psum(correct, AXIS) / batch_size,
            }
            return new_state, metrics

        step = jax.shard_map(
            local_step,
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=(P(), P()),
        )
        return jax.jit(step, donate_argnums=0)

    def eval_step(self, model) -> Callable[..., dict]:
        """``(state, x, y, mask) → {"loss_sum", "correct", "count"}`` over the masked batch."""

        def local_eval(state, x, labels, mask):
            logits = model.apply(
                {"params": state["params"], "batch_stats": state["batch_stats"]}, x, train=False
            ).astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            correct = jnp.argmax(logits, -1) == labels
            return {
                "loss_sum": jax.lax.psum(jnp.sum(jnp.where(mask, loss, 0)), AXIS),
                "correct": jax.lax.psum(jnp.sum(mask & correct), AXIS),
                "count": jax.lax.psum(jnp.sum(mask), AXIS),
            }

        step = jax.shard_map(
            local_eval,
            mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
            out_specs=P(),
        )
        return jax.jit(step)


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
