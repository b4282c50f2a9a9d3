"""Same weights, same batches, K=20 steps of SGD with momentum and weight decay on both sides:
train outputs, loss, accuracy, parameters and running statistics stay equal to PyTorch's, and so
do the final eval outputs, loss and accuracy. MLP (with and without BN), ConvNet and a small
ResNet. The JAX side is ``train.step``, the steps the training loop and the benchmarks run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxbn
from benchmarks import train_step as train_step_benchmark
from jaxbn import models
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close
from train import step as steps
from train.parallel import DataParallel

STEPS, CHECK_EVERY = 20, 5
LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def compare_state(group, pair, params, stats, tol):
    back = jaxbn.interop.flax_to_torch(
        {"params": params, "batch_stats": stats}, flatten_shapes=pair.flatten_shapes
    )
    reference = pair.state_dict_for_jax()
    for key, value in reference.items():
        kind = "running stats" if "running" in key else "params"
        if key.endswith("num_batches_tracked"):
            assert int(back[key]) == int(value), key
            continue
        assert_close(f"{group} {kind}", back[key], value.detach().numpy(), tol, tol)


@pytest.mark.parametrize("name", ["mlp-bn", "mlp-none", "convnet", "resnet"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgd_training_tracks_pytorch_step_by_step(name, dtype):
    pair = make_pairs(seed=1)[name]
    tdtype, jdtype = {
        "float32": (torch.float32, jnp.float32),
        "float64": (torch.float64, jnp.float64),
    }[dtype]
    tol = 2e-5 if dtype == "float32" else 1e-10
    group = f"train {name} {dtype}"
    with jax.enable_x64(dtype == "float64"):
        net = pair.torch_model.to(tdtype).train()
        variables = pair.load_into_jax(jdtype)
        tx = optax.chain(
            optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=SGD_MOMENTUM)
        )
        state = {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(variables["params"]),
        }
        opt = torch.optim.SGD(
            net.parameters(), lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        step = jax.jit(steps.train_step(pair.model, tx))
        gen = torch.Generator().manual_seed(2)
        for i in range(1, STEPS + 1):
            x_t = (torch.randn(pair.input_shape, generator=gen) * 2 + 0.5).to(tdtype)
            labels_t = torch.randint(0, 10, (pair.input_shape[0],), generator=gen)
            opt.zero_grad()
            logits_t = net(x_t)
            loss_t = torch.nn.functional.cross_entropy(logits_t, labels_t)
            loss_t.backward()
            opt.step()
            state, metrics, logits = step(
                state, pair.to_jax_input(x_t), jnp.asarray(labels_t.numpy())
            )
            if i % CHECK_EVERY == 0:
                assert_close(f"{group} train logits", logits, logits_t.detach(), tol, tol)
                assert_close(f"{group} loss", metrics["loss"], loss_t.detach(), tol, tol)
                compare_state(group, pair, state["params"], state["batch_stats"], tol)
                correct_t = (logits_t.argmax(-1) == labels_t).sum().item()
                assert float(metrics["accuracy"]) == correct_t / len(labels_t)
        net.eval()
        x_t = torch.randn(pair.input_shape, generator=gen).to(tdtype)
        labels_t = torch.randint(0, 10, (pair.input_shape[0],), generator=gen)
        with torch.no_grad():
            expected = net(x_t)
        got = pair.model.apply(
            {"params": state["params"], "batch_stats": state["batch_stats"]},
            pair.to_jax_input(x_t),
            train=False,
        )
        assert_close(f"{group} eval logits", got, expected, tol, tol)
        # the eval step, with the last row masked out
        mask = np.arange(len(labels_t)) < len(labels_t) - 1
        out = jax.jit(steps.eval_step(pair.model))(
            state, pair.to_jax_input(x_t), jnp.asarray(labels_t.numpy()), jnp.asarray(mask)
        )
        kept = torch.from_numpy(mask)
        loss_sum_t = torch.nn.functional.cross_entropy(
            expected[kept], labels_t[kept], reduction="sum"
        )
        assert_close(f"{group} eval loss", out["loss_sum"], loss_sum_t, tol, tol)
        assert int(out["correct"]) == int((expected[kept].argmax(-1) == labels_t[kept]).sum())
        assert int(out["count"]) == len(labels_t) - 1
        assert np.isfinite(float(metrics["loss"]))


def test_the_loop_and_the_benchmarks_build_their_steps_from_train_step(monkeypatch):
    # The parity test above runs train.step against torch; the training loop (through
    # DataParallel) and the train-step benchmark must run that same code, not copies of it.
    built = []
    real_train_step, real_eval_step = steps.train_step, steps.eval_step

    def spy_train_step(*args, **kwargs):
        built.append(("train", kwargs.get("axis_name")))
        return real_train_step(*args, **kwargs)

    def spy_eval_step(*args, **kwargs):
        built.append(("eval", kwargs.get("axis_name")))
        return real_eval_step(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", spy_train_step)
    monkeypatch.setattr(steps, "eval_step", spy_eval_step)
    model, tx = models.MLP(hidden=(4,)), optax.sgd(0.1)
    parallel = DataParallel(1)
    parallel.train_step(model, tx, 8)
    parallel.eval_step(model)
    x, y = jnp.ones((8, 3)), jnp.zeros(8, jnp.int32)
    train_step_benchmark.jax_step(model, x, y)
    assert built == [("train", "batch"), ("eval", "batch"), ("train", None)]
