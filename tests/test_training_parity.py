"""Same weights, same batches, K=20 steps of SGD with momentum and weight decay on both sides:
train outputs, loss, parameters and running statistics stay equal to PyTorch's, and so do the
final eval outputs. MLP (with and without BN), ConvNet and a small ResNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxbn
from tests.model_pairs import make_pairs
from tests.parity_report import assert_close

STEPS, CHECK_EVERY = 20, 5
LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def jax_train_step(model, tx):
    @jax.jit
    def step(params, stats, opt_state, x, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates.get("batch_stats", {}))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss, logits

    return step


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
        params, stats = variables["params"], variables.get("batch_stats", {})
        opt = torch.optim.SGD(
            net.parameters(), lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        tx = optax.chain(
            optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=SGD_MOMENTUM)
        )
        opt_state = tx.init(params)
        step = jax_train_step(pair.model, tx)
        gen = torch.Generator().manual_seed(2)
        for i in range(1, STEPS + 1):
            x_t = (torch.randn(pair.input_shape, generator=gen) * 2 + 0.5).to(tdtype)
            labels_t = torch.randint(0, 10, (pair.input_shape[0],), generator=gen)
            opt.zero_grad()
            logits_t = net(x_t)
            loss_t = torch.nn.functional.cross_entropy(logits_t, labels_t)
            loss_t.backward()
            opt.step()
            params, stats, opt_state, loss, logits = step(
                params,
                stats,
                opt_state,
                pair.to_jax_input(x_t),
                jnp.asarray(labels_t.numpy()),
            )
            if i % CHECK_EVERY == 0:
                assert_close(f"{group} train logits", logits, logits_t.detach(), tol, tol)
                assert_close(f"{group} loss", loss, loss_t.detach(), tol, tol)
                compare_state(group, pair, params, stats, tol)
        net.eval()
        x_t = torch.randn(pair.input_shape, generator=gen).to(tdtype)
        with torch.no_grad():
            expected = net(x_t)
        got = pair.model.apply(
            {"params": params, "batch_stats": stats}, pair.to_jax_input(x_t), train=False
        )
        assert_close(f"{group} eval logits", got, expected, tol, tol)
        assert np.isfinite(float(loss))
