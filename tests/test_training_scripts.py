"""The training scripts end to end on tiny data: finite metrics, falling loss, resume identity,
exact evaluation counts on any device count, clear errors, the compare plot."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import pytest

import jaxbn
import train.plot
from tests.tiny_digits import tiny
from train import cnn, compare, mlp, resnet
from train.checkpoint import Checkpoints
from train.cli import parse_args
from train.files import WorkdirError
from train.loop import TrainingDivergedError, run
from train.parallel import DataParallel


def args_for(script, *flags):
    return parse_args("test", "", script.DEFAULTS, list(flags))


TIMINGS = ("seconds", "examples_per_second")  # the only fields that vary between runs


def without_time(history):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


@pytest.mark.parametrize("script", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("devices", [1, 4])
def test_scripts_train_with_finite_metrics(script, norm, devices):
    args = args_for(
        script, "--norm", norm, "--devices", str(devices), "--epochs", "2", "--batch-size", "32"
    )
    result = run(args, script.make_model, data=tiny(), log=lambda _: None)
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        assert all(np.isfinite(v) for v in row.values())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert bool(result.variables["batch_stats"]) == (norm == "batch")


def inspect_rows(lines: list[str]) -> list[str]:
    """The --inspect table in the log: its header first, then the layer rows (no rule)."""
    table = next(line for line in lines if line.startswith("layer "))
    header, _, *rows = table.splitlines()
    return [header, *rows]


def assert_aligned(table: list[str]) -> None:
    """Every number column ends, and the flags start, where the header's label does."""
    header, rows = table[0], table[1:]
    labels = ["C", "steps", "mean (avg, range)", "var (avg, range)", "scale avg", "bias avg"]
    ends = [header.index(f" {label}") + 1 + len(label) for label in labels]
    flags = header.index("  flags") + 2
    for row in rows:
        for end in ends:
            assert row[end - 1] != " " and row[end] == " ", (end, row, header)
        assert row[flags - 2 : flags] == "  " and row[flags] != " ", (row, header)


def test_resnet_script_trains_with_batch_norm_on_four_devices():
    args = args_for(
        resnet, "--use-bn", "--devices", "4", "--epochs", "1", "--batch-size", "32", "--inspect"
    )
    lines = []
    result = run(args, resnet.make_model, data=tiny(64, 16), log=lines.append)
    assert np.isfinite(result.history[0]["train_loss"])
    bn = result.variables["batch_stats"]["layer4_1"]["bn2"]
    assert int(bn["num_batches_tracked"]) == 2
    # --inspect lists the layers as the model applies them: a block's shortcut first
    table = inspect_rows(lines)
    names = [row.split()[0] for row in table[1:]]
    assert names[:5] == ["bn1", "layer1_0/bn1", "layer1_0/bn2", "layer1_1/bn1", "layer1_1/bn2"]
    assert names[5:8] == ["layer2_0/shortcut_1", "layer2_0/bn1", "layer2_0/bn2"]
    assert len(names) == 1 + 2 * 8 + 3


class AppliedOutOfOrder(nn.Module):
    """Its batch norms' names sort the other way round from the order it applies them."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.reshape(x.shape[0], -1)
        x = jaxbn.BatchNorm1d(name="zeta_first")(nn.Dense(16)(x), train=train)
        x = jaxbn.BatchNorm1d(name="layer_10")(nn.Dense(16)(nn.relu(x)), train=train)
        x = jaxbn.BatchNorm1d(name="layer_9")(nn.Dense(16)(nn.relu(x)), train=train)
        return nn.Dense(10)(nn.relu(x))


@pytest.fixture(scope="module")
def inspected() -> list[str]:
    """The --inspect table of a short run of :class:`AppliedOutOfOrder`."""
    lines = []
    args = args_for(mlp, "--epochs", "1", "--batch-size", "32", "--inspect")
    run(args, lambda config, data: AppliedOutOfOrder(), data=tiny(), log=lines.append)
    return inspect_rows(lines)


def test_inspect_prints_the_layers_in_the_order_the_model_applies_them(inspected):
    # neither sorted (layer_10, layer_9, zeta_first) nor numeric (layer_9, layer_10, ...)
    assert [row.split()[0] for row in inspected[1:]] == ["zeta_first", "layer_10", "layer_9"]


def test_inspect_columns_stay_aligned_whatever_the_figures(inspected):
    assert_aligned(inspected)


def test_the_cnn_command_runs_on_the_bundled_data_and_writes_metrics(tmp_path, capsys):
    code = cnn.main(["--use-bn", "--epochs", "1", "--workdir", str(tmp_path), "--inspect"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["test_accuracy"] > 0.5
    out = capsys.readouterr().out
    assert "epoch   1  train loss" in out
    assert "features_1" in out and "classifier_1" in out  # the --inspect table


def test_the_loss_falls_on_a_fixed_batch():
    args = args_for(mlp, "--use-bn", "--schedule", "constant")
    data = tiny()
    model = mlp.make_model(args, data)
    parallel = DataParallel(1)
    from train.loop import make_optimizer

    tx = make_optimizer(args, 100)
    variables = model.init(jax.random.key(0), data.x_train[:2], train=False)
    state = parallel.replicate({**variables, "opt_state": tx.init(variables["params"])})
    step = parallel.train_step(model, tx, 32)
    x, y = parallel.shard(data.x_train[:32], data.y_train[:32])
    losses = []
    for _ in range(20):
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0]


def test_four_devices_train_like_one_with_synced_batch_norm():
    results = [
        run(
            args_for(mlp, "--use-bn", "--devices", str(d), "--epochs", "1", "--batch-size", "32"),
            mlp.make_model,
            data=tiny(),
            log=lambda _: None,
        )
        for d in (1, 4)
    ]
    one, four = results
    for a, b in zip(jax.tree.leaves(one.variables), jax.tree.leaves(four.variables), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(one.history[0][key], four.history[0][key], rtol=1e-5)


def test_runs_are_deterministic_given_the_seed():
    args = args_for(cnn, "--use-bn", "--epochs", "1", "--batch-size", "32", "--seed", "3")
    first, second = (run(args, cnn.make_model, data=tiny(), log=lambda _: None) for _ in range(2))
    assert without_time(first.history) == without_time(second.history)
    for a, b in zip(
        jax.tree.leaves(first.variables), jax.tree.leaves(second.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


class SimulatedCrashError(Exception):
    pass


def stop_after_first_checkpoint(monkeypatch, then=None):
    real_save = Checkpoints.save

    def save(self, epoch, state):
        real_save(self, epoch, state)
        if epoch == 1:
            if then:
                then()
            else:
                raise SimulatedCrashError

    monkeypatch.setattr(Checkpoints, "save", save)


def test_two_epochs_equal_one_epoch_then_resume_bit_for_bit(tmp_path, monkeypatch):
    flags = ["--use-bn", "--epochs", "2", "--batch-size", "32"]
    straight = run(
        args_for(mlp, *flags, "--workdir", str(tmp_path / "a")),
        mlp.make_model,
        data=tiny(),
        log=lambda _: None,
    )
    with monkeypatch.context() as patch:
        stop_after_first_checkpoint(patch)
        with pytest.raises(SimulatedCrashError):
            run(
                args_for(mlp, *flags, "--workdir", str(tmp_path / "b")),
                mlp.make_model,
                data=tiny(),
                log=lambda _: None,
            )
    resumed = run(
        args_for(mlp, *flags, "--workdir", str(tmp_path / "b"), "--resume"),
        mlp.make_model,
        data=tiny(),
        log=lambda _: None,
    )
    for a, b in zip(
        jax.tree.leaves(straight.variables), jax.tree.leaves(resumed.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert without_time(straight.history) == without_time(resumed.history)
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert without_time(logged) == without_time(straight.history)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poisoned = []  # from epoch 2 on, every batch is NaN (the data lives on the device)
    real_train_step = DataParallel.train_step

    def train_step(self, model, tx, batch_size):
        step = real_train_step(self, model, tx, batch_size)
        return lambda state, x, y: step(state, x * np.nan if poisoned else x, y)

    monkeypatch.setattr(DataParallel, "train_step", train_step)
    stop_after_first_checkpoint(monkeypatch, then=lambda: poisoned.append(True))
    data = tiny()
    args = args_for(
        mlp, "--use-bn", "--epochs", "3", "--batch-size", "32", "--workdir", str(tmp_path)
    )
    with pytest.raises(
        TrainingDivergedError,
        match=r"loss became nan at epoch 2, step 1.*kept: the checkpoint of epoch 1 ",
    ):
        run(args, mlp.make_model, data=data, log=lambda _: None)
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest_epoch() == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("devices,batch", [(1, 24), (3, 24), (8, 16)])
def test_evaluation_counts_every_test_example_exactly_once(devices, batch):
    data = tiny(n_test=37)  # 37 is prime: the last batch is always partial
    args = args_for(
        mlp, "--use-bn", "--devices", str(devices), "--epochs", "1", "--batch-size", str(batch)
    )
    result = run(args, mlp.make_model, data=data, log=lambda _: None)
    model = mlp.make_model(args, data)
    logits = model.apply(result.variables, data.x_test, train=False)
    correct = int(np.sum(np.argmax(logits, -1) == data.y_test))
    log_probs = jax.nn.log_softmax(logits)
    expected_loss = float(-np.mean(np.take_along_axis(log_probs, data.y_test[:, None], 1)))
    assert result.history[0]["test_accuracy"] == correct / 37
    assert result.history[0]["test_loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_a_batch_that_does_not_divide_across_devices_is_a_clear_error(capsys):
    assert mlp.main(["--use-bn", "--devices", "3", "--batch-size", "64", "--epochs", "1"]) == 2
    assert "--batch-size 64 does not divide across 3 devices" in capsys.readouterr().err


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path):
    flags = ["--use-bn", "--epochs", "1", "--batch-size", "32", "--workdir", str(tmp_path)]
    run(args_for(mlp, *flags), mlp.make_model, data=tiny(), log=lambda _: None)
    with pytest.raises(WorkdirError, match=r"already holds a run \(checkpoints of epochs 1;"):
        run(args_for(mlp, *flags), mlp.make_model, data=tiny(), log=lambda _: None)


def test_the_bare_momentum_flag_is_refused_as_ambiguous(capsys):
    with pytest.raises(SystemExit):
        args_for(mlp, "--momentum", "0.9")
    assert "use --sgd-momentum (optimizer) or --bn-momentum" in capsys.readouterr().err


def test_compare_prints_the_table_and_writes_the_plot(tmp_path, capsys, monkeypatch):
    titles = []
    draw = train.plot.draw_comparison
    monkeypatch.setattr(
        train.plot,
        "draw_comparison",
        lambda results, title: titles.append(title) or draw(results, title),
    )
    plot = tmp_path / "not" / "yet" / "compare.png"
    assert compare.main(["--epochs", "1", "--lrs", "0.1,1", "--out", str(plot)]) == 0
    assert list(plot.parent.iterdir()) == [plot]
    with PIL.Image.open(plot) as image:
        assert image.format == "PNG" and min(image.info["dpi"]) >= 149.9
    assert titles == [train.plot.comparison_title(model="mlp", dataset="digits", epochs=1)]
    out = capsys.readouterr().out
    assert out.endswith(f"\nplot: {plot}\n")
    table = out[out.index("test acc") :]
    assert table.count("none") == 2 and table.count("batch") == 2
