"""One training step and one evaluation step, written once for the loop, the benchmarks and
the tests.

The state is ``{"params", "batch_stats", "opt_state"}``. A training step is: the forward pass
in training mode (batch statistics, running statistics updated), softmax cross-entropy in at
least float32 (float32 also under bfloat16 activations, float64 stays float64), the gradients,
the optax update, and the metrics ``loss`` and ``accuracy``. Nothing here is jitted or placed
on devices: the callers do that (``train.parallel`` under ``jax.shard_map`` with
``axis_name``, the benchmarks and the tests with a plain ``jax.jit``).

With ``axis_name`` the functions run per device inside a mapped context: every jaxbn batch
norm syncs its statistics over ``axis_name`` (:func:`jaxbn.sync_batch_norm`), the loss is the
device's share of the global mean (``batch_size`` is the global batch), and the metrics are
summed over the devices.

Example:
    >>> tx = optax.sgd(0.1)
    >>> step = jax.jit(train_step(model, tx), donate_argnums=0)
    >>> state = init_state(model, tx, x[:2])
    >>> state, metrics, logits = step(state, x, labels)   # x: [N, ...], labels: [N] int
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxbn

State = dict[str, Any]
TrainStep = Callable[[State, jax.Array, jax.Array], tuple[State, dict, jax.Array]]
EvalStep = Callable[[State, jax.Array, jax.Array, jax.Array], dict]


def init_state(model, tx: optax.GradientTransformation, x: jax.Array, seed: int = 0) -> State:
    """A fresh ``{"params", "batch_stats", "opt_state"}`` for inputs shaped like ``x``."""
    variables = model.init(jax.random.key(seed), x, train=False)
    return {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": tx.init(variables["params"]),
    }


def train_step(
    model,
    tx: optax.GradientTransformation,
    batch_size: int | None = None,
    *,
    axis_name: str | None = None,
) -> TrainStep:
    """``(state, x, labels) → (state, {"loss", "accuracy"}, logits)`` for one batch.

    Args:
      model: a Flax module called as ``model.apply(variables, x, train=..., mutable=...)``.
      tx: the optimizer.
      batch_size: the global batch size the loss is averaged over; None: ``x.shape[0]`` (one
        device). Required with ``axis_name``, where ``x`` is one device's share.
      axis_name: the mapped axis to sync batch norm and sum the metrics over; None: no sync.

    The returned logits ([N, K], at least float32) are this device's; callers that do not use
    them drop them and XLA does not keep them.
    """
    if axis_name is not None and batch_size is None:
        raise ValueError("train_step: batch_size (the global batch) is required with axis_name")

    def step(state: State, x: jax.Array, labels: jax.Array):
        total = x.shape[0] if batch_size is None else batch_size

        def loss_fn(params):
            sync = contextlib.nullcontext()
            if axis_name is not None:
                sync = jaxbn.sync_batch_norm(axis_name)
            with sync:
                logits, updates = model.apply(
                    {"params": params, "batch_stats": state["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
            logits = _at_least_float32(logits)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            # this device's share of the global mean
            return jnp.sum(loss) / total, (logits, updates.get("batch_stats", {}))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        # Under shard_map `params` are replicated (invariant) inputs, so `grads` already hold
        # the sum over devices: the gradient of the global mean loss.
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats,
            "opt_state": opt_state,
        }
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        metrics = {
            "loss": _sum_over(loss, axis_name),
            "accuracy": _sum_over(correct, axis_name) / total,
        }
        return new_state, metrics, logits

    return step


def eval_step(model, *, axis_name: str | None = None) -> EvalStep:
    """``(state, x, labels, mask) → {"loss_sum", "correct", "count"}`` over the rows where
    ``mask`` ([N] bool) is True; running statistics, no update; summed over ``axis_name``."""

    def step(state: State, x: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
        logits = model.apply(
            {"params": state["params"], "batch_stats": state["batch_stats"]}, x, train=False
        )
        logits = _at_least_float32(logits)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, -1) == labels
        return {
            "loss_sum": _sum_over(jnp.sum(jnp.where(mask, loss, 0)), axis_name),
            "correct": _sum_over(jnp.sum(mask & correct), axis_name),
            "count": _sum_over(jnp.sum(mask), axis_name),
        }

    return step


def _at_least_float32(logits: jax.Array) -> jax.Array:
    """The loss in float32 also under bfloat16 activations; float32 and float64 stay as they
    are (float64 for the exact ports)."""
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _sum_over(value: jax.Array, axis_name: str | None) -> jax.Array:
    return value if axis_name is None else jax.lax.psum(value, axis_name)
