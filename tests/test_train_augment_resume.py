"""CIFAR-10 augmentation (random crops of the 4-pixel zero-padded images, horizontal flips) is
on by default for --dataset cifar10, done on the device with keys from (seed, epoch, step), so
a run stopped mid-epoch and resumed sees the same augmented batches and ends bit for bit like
the uninterrupted run (issue 19). The data is a tiny CIFAR-10 written in the exact on-disk
format (tests/test_datasets.py), its checksums put in place of the published ones."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shlex

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_datasets import write_cifar_archive
from tests.workdir_checks import signal_at_step
from train import datasets, mlp
from train.augment import augment_batch
from train.cli import parse_args
from train.config import Run, RunConfig
from train.datasets import load_dataset
from train.feed import AUGMENT_STREAM, DeviceFeed, HostFeed
from train.files import WorkdirError
from train.loop import run
from train.parallel import DataParallel

# 5 batches of 8 training images, 5 test images: batch 8 gives 5 steps per epoch
FLAGS = ["--epochs", "2", "--batch-size", "8", "--schedule", "constant", "--use-bn"]
STEPS = 5
TIMINGS = ("seconds", "examples_per_second")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """--data-dir of a tiny CIFAR-10 whose checksums the loader accepts; the flags to use it."""
    root = tmp_path_factory.mktemp("cifar")
    checksums, _ = write_cifar_archive(root, per_batch=8, test=5)
    patch = pytest.MonkeyPatch()
    for name, value in checksums.items():
        patch.setitem(datasets.CIFAR10_FILES, name, value)
    yield [*FLAGS, "--dataset", "cifar10", "--data-dir", str(root), "--no-download"]
    patch.undo()


def main(argv, signal_at=None):
    """``python -m train.mlp argv`` here, optionally sending itself SIGTERM during the
    ``signal_at``-th training step: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        if signal_at is not None:
            signal_at_step(patch, signal_at)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = mlp.main(argv)
    return code, out.getvalue(), err.getvalue()


def rows(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def saved(workdir, epoch):
    manager = ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints").absolute())
    state = manager.restore(epoch, args=ocp.args.StandardRestore())
    manager.close()
    return jax.tree.map(np.array, state)


@pytest.fixture(scope="module")
def straight(cifar, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "w"
    code, out, err = main([*cifar, "--workdir", str(workdir)])
    assert code == 0, err
    return workdir, out


def test_cifar10_is_augmented_by_default_and_the_config_records_it(straight):
    workdir, out = straight
    assert "(40 train / 5 test, augmented)" in out.splitlines()[0]
    assert json.loads((workdir / "config.json").read_text())["augment"] is True


def test_a_run_stopped_mid_epoch_resumes_the_same_augmented_batches(cifar, straight, tmp_path):
    code, _, err = main([*cifar, "--workdir", str(tmp_path)], signal_at=STEPS + 2)
    line = [x for x in err.splitlines() if "absl" not in x][-1]
    assert code == 143
    assert line.startswith(f"stopped by SIGTERM at epoch 2, step 2/{STEPS}; saved: ")
    command = shlex.split(line.split("; continue with: ")[1])
    assert main(command[3:])[0] == 0
    assert rows(tmp_path) == rows(straight[0])
    for a, b in zip(
        jax.tree.leaves(saved(tmp_path, 2)), jax.tree.leaves(saved(straight[0], 2)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_no_augment_trains_on_the_plain_images_and_resume_keeps_it_so(cifar, straight, tmp_path):
    assert main([*cifar, "--no-augment", "--epochs", "1", "--workdir", str(tmp_path)])[0] == 0
    assert json.loads((tmp_path / "config.json").read_text())["augment"] is False
    assert rows(tmp_path)[0]["train_loss"] != rows(straight[0])[0]["train_loss"]
    flags = [*cifar, "--epochs", "1", "--workdir", str(tmp_path), "--resume"]  # default: on
    with pytest.raises(
        WorkdirError,
        match=r"flags differ \(saved -> now\): --no-augment -> --augment; repeat the saved",
    ):
        run(parse_args("test", "", mlp.DEFAULTS, flags), mlp.make_model, log=lambda _: None)


@pytest.mark.parametrize(
    "argv,augment",
    [
        ([], False),
        (["--dataset", "cifar10"], True),
        (["--dataset", "cifar10", "--no-augment"], False),
    ],
)
def test_augmentation_is_on_by_default_for_cifar10_only(argv, augment):
    assert Run.from_flags(parse_args("t", "", mlp.DEFAULTS, argv)).config.augment is augment


def test_augment_on_a_dataset_of_digits_is_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        mlp.main(["--augment"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "python -m train.mlp: error: --augment applies to --dataset cifar10 only (random crops "
        "and horizontal flips; a mirrored digit is another digit), not to digits (see --help)\n"
    )


def test_an_older_config_without_the_field_loads_as_not_augmented(straight, tmp_path):
    config = json.loads((straight[0] / "config.json").read_text())
    del config["augment"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert RunConfig.load(tmp_path).augment is False


@pytest.mark.parametrize("devices", [1, 2])
def test_augmented_batches_depend_only_on_seed_epoch_and_step(cifar, devices):
    data = load_dataset("cifar10", cifar[cifar.index("--data-dir") + 1], download=False)
    parallel = DataParallel(devices)
    plain = list(DeviceFeed(parallel, data, 8).train(3, 2))
    on_device = list(DeviceFeed(parallel, data, 8, augment=True).train(3, 2))
    on_host = list(HostFeed(parallel, data, 8, augment=True).train(3, 2))
    resumed = list(DeviceFeed(parallel, data, 8, augment=True).train(3, 2, start_step=2))
    assert len(plain) == len(on_device) == len(on_host) == STEPS and len(resumed) == STEPS - 2
    key = jax.random.fold_in(jax.random.key(3), AUGMENT_STREAM)
    for step, ((x, y), (xa, ya), (xh, yh)) in enumerate(
        zip(plain, on_device, on_host, strict=True)
    ):
        expected = augment_batch(jax.random.fold_in(jax.random.fold_in(key, 2), step), x)
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(xh), np.asarray(xa))
        np.testing.assert_array_equal(np.asarray(ya), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(yh), np.asarray(y))
        assert not np.array_equal(np.asarray(xa), np.asarray(x))
        assert xa.sharding.is_equivalent_to(x.sharding, x.ndim)
    for (xr, _), (xa, _) in zip(resumed, on_device[2:], strict=True):
        np.testing.assert_array_equal(np.asarray(xr), np.asarray(xa))


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_outside_what_the_keys_and_the_batch_order_take_is_refused(seed, capsys):
    # -1: numpy's batch order refused it deep in the run; 2**32: JAX's keys keep 32 bits, so it
    # would have initialized and augmented like --seed 0
    with pytest.raises(SystemExit) as caught:
        mlp.main(["--seed", seed])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"python -m train.mlp: error: --seed must be in [0, {2**32 - 1}], got {seed} (see --help)\n"
    )
