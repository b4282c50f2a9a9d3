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

import os
import re
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
    collective_timeout_seconds: int = 300,
) -> None:
    """Joins the cluster, or raises ``RuntimeError`` within ``timeout_seconds``.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0, which hosts the coordinator; an IPv6
        host in brackets (``[::1]:1234``).
      num_processes: number of processes in the cluster.
      process_id: this process's rank, ``0 <= process_id < num_processes``.
      timeout_seconds: how long to wait for the coordinator and all peers.
      heartbeat_seconds: after this long without a peer's heartbeat the cluster is declared
        dead and every process stops with an error instead of hanging in a collective.
      collective_timeout_seconds: a CPU collective (gloo) that waits this long for a peer
        raises an error naming the collective instead of waiting forever. It bounds how long one
        process may run ahead of another between two collectives (a compilation, a checkpoint,
        an evaluation), so it is generous. An explicit
        ``--xla_cpu_collective_timeout_seconds`` in ``XLA_FLAGS`` wins.

    Raises:
      ValueError: a bad address or rank. RuntimeError: JAX has already computed something in
        this process (it must be called first), or the cluster could not be joined in time.
    """
    host, port = _host_and_port(coordinator_address)
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if _backend_started():
        # The runtime's own error comes only after the coordinator probe below, and reads like
        # a network failure once wrapped: say the real cause first, before waiting for anyone.
        raise RuntimeError(_STARTED.format(address=coordinator_address))
    if process_id != 0:
        # The runtime aborts the whole process on a failed connect; probe first so that an
        # unreachable coordinator is a Python error naming the address.
        _wait_for_coordinator(host, port, timeout_seconds, coordinator_address)
    # Only the CPU backend reads this; set before any backend exists (querying one would
    # start it, and initialize must come first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax_cpu_enable_async_dispatch stays on: off, XLA lets each CPU device hold only one
    # program in flight, so a launch while the previous program runs blocks one of the client's
    # few pool threads (max(cores, local devices)); a collective still waiting for that thread
    # then never starts, and its peers in the other processes wait forever.
    # A cross-process collective whose peer never comes (a bug, a peer stuck elsewhere) would
    # wait forever; with this flag it raises "Gloo ... failed: ... Timed out waiting ..." instead.
    # XLA reads XLA_FLAGS when the backend starts, which has not happened yet (checked above).
    _set_xla_flag_default("xla_cpu_collective_timeout_seconds", collective_timeout_seconds)
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
        if "must be called before" in str(err):  # JAX computed something after the check above
            raise RuntimeError(f"{_STARTED.format(address=coordinator_address)} ({err})") from err
        # The runtime's reason first: only a timeout is about the network.
        raise RuntimeError(
            f"could not join the jax.distributed cluster at {coordinator_address} as process "
            f"{process_id} of {num_processes}: {err} (if it timed out after {timeout_seconds} s: "
            f"is process 0 running and the port reachable?)"
        ) from err


_STARTED = (
    "initialize_multihost must be called before JAX computes anything in this process (any "
    "computation, jax.devices(), jax.device_put, ...): JAX's backend is already running, so it "
    "cannot join the cluster at {address}. Call it first, right after importing jax"
)


def _set_xla_flag_default(name: str, value: int) -> None:
    """Adds ``--name=value`` to ``XLA_FLAGS`` unless the user already set ``name`` there."""
    flags = os.environ.get("XLA_FLAGS", "")
    if not re.search(rf"--{name}(=|\s|$)", flags):
        os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


def _host_and_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host for ``socket``, port); an IPv6 host is written in brackets
    (``[::1]:1234``, as gRPC takes it) and handed to ``socket`` without them."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(
            f"coordinator address must be HOST:PORT, got {address!r}: write an IPv6 host in "
            f"brackets, [{host}]:{port}"
        )
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host, int(port)


def _backend_started() -> bool:
    """Whether JAX has started a backend in this process (then it cannot join a cluster)."""
    try:
        from jax._src import xla_bridge  # no public API answers this without starting one
    except ImportError:  # pragma: no cover - a JAX without it: the runtime's error remains
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else False


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
