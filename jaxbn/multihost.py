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
      coordinator_address: ``HOST:PORT`` of process 0, which hosts the coordinator; an IPv6
        host in brackets (``[::1]:1234``).
      num_processes: number of processes in the cluster.
      process_id: this process's rank, ``0 <= process_id < num_processes``.
      timeout_seconds: how long to wait for the coordinator and all peers.
      heartbeat_seconds: after this long without a peer's heartbeat the cluster is declared
        dead and every process stops with an error instead of hanging in a collective.

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
    # CPU programs are dispatched asynchronously to a thread pool by default; with several
    # processes, programs holding collectives could then start in a different order on each
    # process, and gloo pairs collectives by order: on a loaded machine training hung in a
    # collective. Dispatching in order costs a little host overlap and changes no number.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
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
