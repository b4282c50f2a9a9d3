"""The training loop keeps the device busy (issue "GPU-ready training"): no host sync per step,
metrics accumulated on the device with exactly the old step-by-step figures, the divergence
check on the device, device-resident data, bfloat16 activations. Tiny data throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train.loop
from tests.tiny_digits import tiny
from train import cnn, mlp
from train.batching import eval_batches, train_batches
from train.checkpoint import Checkpoints
from train.cli import parse_args
from train.feed import DeviceFeed, HostFeed
from train.loop import TrainingDivergedError, create_state, make_optimizer, run
from train.parallel import DataParallel


def step_by_step(args, script, data, epochs):
    """The loop as it was: host batches, ``float()`` of every step's loss and accuracy, a
    float64 mean per epoch, the evaluation summed batch by batch on the host."""
    parallel = DataParallel(args.devices)
    steps = len(data.y_train) // args.batch_size
    tx = make_optimizer(args, steps * args.epochs)
    model = script.make_model(args, data)
    state = create_state(model, tx, data, args.seed, parallel)
    train_step = parallel.train_step(model, tx, args.batch_size)
    eval_step = parallel.eval_step(model)
    rows = []
    for epoch in range(1, epochs + 1):
        losses, accuracies = [], []
        for i in train_batches(len(data.y_train), args.batch_size, args.seed, epoch):
            state, m = train_step(state, *parallel.shard(data.x_train[i], data.y_train[i]))
            losses.append(float(m["loss"]))
            accuracies.append(float(m["accuracy"]))
        loss_sum = correct = count = 0
        for i, mask in eval_batches(len(data.y_test), args.batch_size):
            out = eval_step(state, *parallel.shard(data.x_test[i], data.y_test[i], mask))
            loss_sum += float(out["loss_sum"])
            correct += int(out["correct"])
            count += int(out["count"])
        rows.append(
            {
                "train_loss": float(np.mean(losses)),
                "train_accuracy": float(np.mean(accuracies)),
                "test_loss": loss_sum / count,
                "test_accuracy": correct / count,
            }
        )
    return rows, jax.device_get(state["params"])


@pytest.mark.parametrize("devices", [1, 2])
def test_epoch_figures_equal_the_step_by_step_reference_exactly(devices, monkeypatch):
    monkeypatch.setattr(train.loop, "CHECK_EVERY", 4)  # looks inside the epoch and at its end
    flags = ["--use-bn", "--epochs", "2", "--batch-size", "16", "--devices", str(devices)]
    args = parse_args("test", "", mlp.DEFAULTS, flags)
    result = run(args, mlp.make_model, data=tiny(), log=lambda _: None)
    reference, params = step_by_step(args, mlp, tiny(), 2)
    assert [{k: row[k] for k in reference[0]} for row in result.history] == reference
    leaves = jax.tree.leaves(result.variables["params"])
    for a, b in zip(leaves, jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_epoch_waits_for_the_device_only_every_check_every_steps(monkeypatch):
    # 96 / 8 = 12 steps, a look every 4: 3 looks; then per epoch one fetch each of the step
    # figures, the learning rate, the evaluation and the state's finiteness; never one per step
    monkeypatch.setattr(train.loop, "CHECK_EVERY", 4)
    fetches, implicit, real_get = [], [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(1) or real_get(x))
    array_type = type(jnp.ones(()))
    for method in ("__float__", "__int__", "__bool__", "__index__"):
        real = getattr(array_type, method)
        monkeypatch.setattr(
            array_type, method, lambda x, real=real, m=method: implicit.append(m) or real(x)
        )
    args = parse_args("test", "", mlp.DEFAULTS, ["--use-bn", "--epochs", "1", "--batch-size", "8"])
    result = run(args, mlp.make_model, data=tiny(), log=lambda _: None)
    assert np.isfinite(result.history[0]["train_loss"])
    assert implicit == []  # no float(x)/int(x)/bool(x) of a device array anywhere
    assert len(fetches) == 3 + 4 + 1  # + the final variables


def test_a_divergence_mid_epoch_names_its_step_and_saves_nothing_of_that_epoch(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(train.loop, "CHECK_EVERY", 4)
    real_train_step, calls = DataParallel.train_step, []

    def train_step(self, model, tx, batch_size):
        step = real_train_step(self, model, tx, batch_size)

        def poisoned(state, x, y):
            calls.append(1)
            return step(state, x * np.nan if len(calls) >= 12 + 6 else x, y)

        return poisoned

    monkeypatch.setattr(DataParallel, "train_step", train_step)
    flags = ["--use-bn", "--epochs", "3", "--batch-size", "8", "--workdir", str(tmp_path)]
    with pytest.raises(
        TrainingDivergedError,
        match=r"^loss became nan at epoch 2, step 6: .*kept: the checkpoint of epoch 1 ",
    ):
        run(parse_args("test", "", mlp.DEFAULTS, flags), mlp.make_model, data=tiny(), log=print)
    assert len(calls) == 12 + 8  # found at the look after step 8 of epoch 2
    assert Checkpoints(tmp_path).epochs() == [1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("devices", [1, 4])
def test_device_resident_and_host_batches_are_the_same_bits(devices):
    data, parallel = tiny(), DataParallel(devices)
    on_device, on_host = DeviceFeed(parallel, data, 16), HostFeed(parallel, data, 16)
    pairs = [
        *zip(on_device.train(0, 3), on_host.train(0, 3), strict=True),
        *zip(on_device.test(), on_host.test(), strict=True),
    ]
    assert len(pairs) == 6 + 3
    for a, b in pairs:
        for u, v in zip(a, b, strict=True):
            assert u.sharding.is_equivalent_to(v.sharding, u.ndim)
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_bfloat16_trains_bfloat16_activations_with_float32_parameters_and_statistics():
    flags = ["--use-bn", "--epochs", "2", "--batch-size", "16", "--dtype", "bfloat16"]
    args = parse_args("test", "", cnn.DEFAULTS, flags)
    result = run(args, cnn.make_model, data=tiny(), log=lambda _: None)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(result.variables["params"])}
    assert dtypes == {np.dtype(np.float32)}
    stats = result.variables["batch_stats"]["features_1"]
    assert stats["mean"].dtype == stats["var"].dtype == np.float32
    model = cnn.make_model(args, tiny())
    apply = lambda x: model.apply(result.variables, x, train=False)
    assert jax.eval_shape(apply, tiny().x_test[:4]).dtype == jnp.bfloat16  # traced, not run
