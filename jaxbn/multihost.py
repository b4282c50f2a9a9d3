"""Joining a multi-process JAX cluster (``jax.distributed``) with bounded waits.

After :func:`initialize_multihost`, ``jax.devices()`` lists every process's devices and a
``jax.pmap(..., axis_name=...)`` spans them all, so synced batch norm merges statistics across
hosts exactly as across local devices. On CPU the collectives go through gloo.

Example (two processes on one machine, each with 2 CPU devices)::

    # XLA_FLAGS=--xla_force_host_platform_device_count=2 set before importing jax
    jaxbn.multihost.initialize_multihost("127.0.0.1:12345", num_processes=2, process_id=I)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
"""

from __future__ import annotations

import socket
import time

import jax

__all__ = ["initialize_multihost"]


def initialize_multihost(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    timeout_seconds: int = 60,
    heartbeat_seconds: int = 10,
) -> None:
    """Joins the cluster, or raises ``RuntimeError`` within ``timeout_seconds``.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0, which hosts the coordinator.
      num_processes: number of processes in the cluster.
      process_id: this process's rank, ``0 <= process_id < num_processes``.
      timeout_seconds: how long to wait for the coordinator and all peers.
      heartbeat_seconds: after this long without a peer's heartbeat the cluster is declared
        dead and every process stops with an error instead of hanging in a collective.

    Raises:
      ValueError: a bad address or rank. RuntimeError: the cluster could not be joined in time.
    """
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {coordinator_address!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if process_id != 0:
        # The runtime aborts the whole process on a failed connect; probe first so that an
        # unreachable coordinator is a Python error naming the address.
        _wait_for_coordinator(host, int(port), timeout_seconds, coordinator_address)
    # Only the CPU backend reads this; set before any backend exists (querying one would
    # start it, and initialize must come first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout_seconds,
            heartbeat_timeout_seconds=heartbeat_seconds,
            shutdown_timeout_seconds=timeout_seconds,
        )
    except Exception as err:  # the runtime raises several types; one clear message for all
        raise RuntimeError(
            f"could not join the jax.distributed cluster at {coordinator_address} as process "
            f"{process_id} of {num_processes} within {timeout_seconds} s "
            f"(is process 0 running and the port reachable?): {err}"
        ) from err


def _wait_for_coordinator(host: str, port: int, timeout_seconds: float, address: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"could not reach the jax.distributed coordinator at {address} within "
                    f"{timeout_seconds} s (is process 0 running and the port reachable?): {err}"
                ) from err
            time.sleep(0.2)
