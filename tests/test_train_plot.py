"""train.plot: the curves of workdirs (``python -m train.plot``) and the compare figure."""

import colorsys
import dataclasses
import json
import subprocess
import sys

import matplotlib.colors
import pytest
from PIL import Image

from train.config import RunConfig
from train.plot import (
    PALETTE,
    PlotError,
    accuracy_limits,
    comparison_title,
    draw_comparison,
    draw_runs,
    main,
    plot_comparison,
    read_run,
    run_labels,
)

PNG = b"\x89PNG\r\n\x1a\n"


def config(**changes):
    """A config.json as train.config.RunConfig writes it."""
    run = RunConfig(
        model="MLP",
        norm="batch",
        data="digits (1437 train / 360 test)",
        batch_size=64,
        lr=0.1,
        epochs=3,
    )
    return {**dataclasses.asdict(run), **changes}


def metrics_row(epoch, test_accuracy=0.9):
    """A metrics.jsonl row as train.loop writes it."""
    return {
        "epoch": epoch,
        "step": 23 * epoch,
        "lr": 0.1,
        "train_loss": 1.0 / epoch,
        "train_accuracy": test_accuracy + 0.02,
        "test_loss": 1.2 / epoch,
        "test_accuracy": test_accuracy,
        "seconds": 1.5,
        "examples_per_second": 1000.0,
    }


def workdir(path, lines=None, cfg=None):
    path.mkdir(parents=True)
    if lines is None:
        lines = [json.dumps(metrics_row(e, 0.6 + 0.1 * e)) for e in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if cfg is not False:
        (path / "config.json").write_text(json.dumps(cfg or config(), indent=1) + "\n")
    return path


def run_main(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def png_dpi(path):
    with Image.open(path) as image:
        return image.format, image.info["dpi"]


# -- python -m train.plot --------------------------------------------------------------------


def test_two_workdirs_are_plotted_into_a_new_folder_at_150_dpi(tmp_path, capsys):
    a = workdir(tmp_path / "a")
    b = workdir(tmp_path / "b", cfg=config(norm="none", lr=1.0))
    out = tmp_path / "not" / "yet" / "curves.png"
    code, stdout, err = run_main([a, b, "--out", out], capsys)
    assert (code, stdout, err) == (0, f"plot: {out}\n", "")
    format_, dpi = png_dpi(out)
    assert format_ == "PNG" and min(dpi) >= 149.9  # PNG stores dots per metre: 150 reads 149.99


def test_the_figure_has_train_and_test_curves_per_run_and_a_legend_per_run(tmp_path):
    runs = [("run a", [metrics_row(1, 0.5), metrics_row(2, 0.7)]), ("run b", [metrics_row(1)])]
    figure = draw_runs(runs, "training curves on digits")
    ax_loss, ax_acc = figure.axes
    drawn = [line for line in ax_acc.get_lines() if len(line.get_xdata())]
    assert [list(line.get_ydata()) for line in drawn] == [
        [0.52, 0.72],  # run a train
        [0.5, 0.7],  # run a test
        [0.92],
        [0.9],
    ]
    assert [line.get_linestyle() for line in drawn] == ["-", "--", "-", "--"]
    assert [t.get_text() for t in ax_acc.get_legend().get_texts()] == ["run a", "run b"]
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["train", "test"]
    assert ax_loss.get_yscale() == "log"
    assert [t.get_text() for t in figure.texts] == ["training curves on digits"]


def test_the_legend_names_model_norm_and_lr_and_what_else_differs():
    configs = [config(), config(norm="none", lr=1.0, seed=1)]
    assert run_labels(configs, ["a", "b"]) == [
        "MLP, norm batch, lr 0.1, seed 0",
        "MLP, norm none, lr 1, seed 1",
    ]


def test_runs_that_read_alike_or_have_no_config_are_told_apart_by_their_workdir():
    labels = run_labels([config(), config(), {}], ["runs/a", "runs/b", "runs/old"])
    assert labels == [
        "MLP, norm batch, lr 0.1 (runs/a)",
        "MLP, norm batch, lr 0.1 (runs/b)",
        "?, norm ?, lr ? (runs/old)",
    ]


def test_a_workdir_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    code, out, err = run_main([tmp_path / "w", "--out", tmp_path / "c.png"], capsys)
    assert (code, out) == (2, "")
    assert (
        err
        == f"error: {tmp_path / 'w'} has no metrics.jsonl (not a workdir, or no epoch finished)\n"
    )
    assert not (tmp_path / "c.png").exists()


def test_a_missing_workdir_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_main([tmp_path / "nowhere", "--out", tmp_path / "c.png"], capsys)
    assert (code, err) == (2, f"error: {tmp_path / 'nowhere'} is not a directory\n")


def test_an_empty_metrics_file_is_a_one_line_error(tmp_path, capsys):
    w = workdir(tmp_path / "w", lines=["", "  "])
    code, _, err = run_main([w, "--out", tmp_path / "c.png"], capsys)
    assert (code, err) == (2, f"error: {w / 'metrics.jsonl'} is empty: no epoch finished\n")


def test_a_corrupt_metrics_line_is_named(tmp_path, capsys):
    w = workdir(tmp_path / "w", lines=[json.dumps(metrics_row(1)), '{"epoch": 2, "train_lo'])
    code, _, err = run_main([w, "--out", tmp_path / "c.png"], capsys)
    assert code == 2
    assert err.startswith(f"error: {w / 'metrics.jsonl'}, line 2: not JSON (")
    assert err.count("\n") == 1


def test_a_row_without_a_plotted_number_is_named(tmp_path):
    row = {**metrics_row(1), "test_loss": None}
    w = workdir(tmp_path / "w", lines=[json.dumps(row)])
    with pytest.raises(PlotError) as caught:
        read_run(w)
    assert str(caught.value) == f"{w / 'metrics.jsonl'}, line 1: 'test_loss' is None, not a number"


def test_a_row_without_an_integer_epoch_is_named(tmp_path):
    w = workdir(tmp_path / "w", lines=[json.dumps(metrics_row(1)), "[1, 2]"])
    with pytest.raises(PlotError) as caught:
        read_run(w)
    assert str(caught.value) == (
        f"{w / 'metrics.jsonl'}, line 2: not a JSON object with an integer 'epoch'"
    )


def test_a_corrupt_config_is_a_one_line_error(tmp_path):
    w = workdir(tmp_path / "w")
    (w / "config.json").write_text("{")
    with pytest.raises(PlotError) as caught:
        read_run(w)
    assert str(caught.value).startswith(f"{w / 'config.json'} is not readable JSON: ")


def test_no_out_is_refused_by_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main([str(workdir(tmp_path / "w"))])
    out, err = capsys.readouterr()
    assert (caught.value.code, out) == (2, "")
    assert err == (
        "python -m train.plot: error: the following arguments are required: --out (see --help)\n"
    )


def test_the_module_runs_as_a_script(tmp_path):
    w = workdir(tmp_path / "w")
    out = tmp_path / "figs" / "w"  # no suffix: written exactly there, as a PNG
    done = subprocess.run(
        [sys.executable, "-m", "train.plot", str(w), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"plot: {out}\n", "")
    assert out.read_bytes()[:8] == PNG and not out.with_suffix(".png").exists()


def test_workdirs_named_with_the_workdir_flag_plot_like_positional_ones(tmp_path, capsys):
    a = workdir(tmp_path / "a")
    b = workdir(tmp_path / "b", cfg=config(norm="none", lr=1.0))
    by_flag, by_position = tmp_path / "flag.png", tmp_path / "position.png"
    assert run_main(["--workdir", a, "--workdir", b, "--out", by_flag], capsys)[0] == 0
    assert run_main([a, b, "--out", by_position], capsys)[0] == 0
    assert by_flag.read_bytes() == by_position.read_bytes()


def test_no_workdir_asks_for_the_workdir_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--out", str(tmp_path / "c.png")])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "python -m train.plot: error: the following arguments are required: --workdir "
        "(see --help)\n"
    )


# -- the compare figure ----------------------------------------------------------------------


def history(accuracies, loss=0.5):
    return [
        {"epoch": e, "train_loss": loss / e, "test_accuracy": a}
        for e, a in enumerate(accuracies, 1)
    ]


def result(lr, norm, accuracies, diverged=None, status="ok"):
    return {
        "lr": lr,
        "norm": norm,
        "history": history(accuracies),
        "diverged": diverged,
        "status": status,
    }


SWEEP = [
    result(0.1, "none", [0.62, 0.80, 0.90]),
    result(0.1, "batch", [0.70, 0.88, 0.97]),
    result(10, "none", [0.65, 0.75], diverged=3, status="diverged in epoch 3"),
    result(10, "batch", [0.80, 0.85, 0.93]),
]


def test_the_compare_plot_lands_exactly_at_its_path_in_a_new_folder_at_150_dpi(tmp_path):
    path = tmp_path / "new" / "folder" / "compare.png"
    assert plot_comparison(SWEEP, path, "t") == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["compare.png"]
    format_, dpi = png_dpi(path)
    assert format_ == "PNG" and min(dpi) >= 149.9


@pytest.mark.parametrize("name", ["compare", "compare.v2"])
def test_a_plot_path_without_a_known_suffix_is_written_there_as_png(tmp_path, name):
    plot_comparison(SWEEP, tmp_path / name, "t")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes()[:8] == PNG


def test_an_unwritable_plot_path_is_a_plot_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PlotError) as caught:
        plot_comparison(SWEEP, tmp_path / "file" / "c.png", "t")
    assert str(caught.value) == f"cannot write {tmp_path / 'file' / 'c.png'}: File exists"


def is_yellowish(color):
    """Hue between amber (45°) and yellow-green (75°), saturated and light: Okabe-Ito's orange
    (#E69F00, 41°) is not, its yellow (#F0E442, 56°) and viridis's top (#FDE725, 53°) are."""
    hue, saturation, value = colorsys.rgb_to_hsv(*matplotlib.colors.to_rgb(color))
    return 45 / 360 < hue < 75 / 360 and saturation > 0.3 and value > 0.6


def test_the_palette_has_no_yellow():
    assert not any(is_yellowish(c) for c in PALETTE)
    assert is_yellowish("#F0E442") and is_yellowish("#FDE725")  # Okabe-Ito's and viridis's top


def test_every_learning_rate_gets_a_palette_colour_and_a_look_of_its_own():
    lrs = [0.001 * 2**i for i in range(9)]  # more than the palette holds
    figure = draw_comparison([result(lr, "batch", [0.5, 0.6]) for lr in lrs], "t")
    lines = [line for line in figure.axes[1].get_lines() if len(line.get_xdata())]
    colors = [matplotlib.colors.to_hex(line.get_color()).upper() for line in lines]
    assert set(colors) <= set(PALETTE)
    assert len({(c, line.get_marker()) for c, line in zip(colors, lines, strict=True)}) == 9


def test_the_accuracy_axis_brackets_the_data_tightly():
    low, high = draw_comparison(SWEEP, "t").axes[1].get_ylim()
    # data 0.62 .. 0.97 (the diverged run's cross does not stretch the axis)
    assert 0.62 - 0.05 < low < 0.62 and 0.97 < high < 0.97 + 0.05


def test_the_accuracy_axis_keeps_a_margin_above_a_perfect_score():
    assert accuracy_limits([0.99, 1.0]) == (0.98, 1.01)
    assert accuracy_limits([0.1, 0.3]) == pytest.approx((0.09, 0.31))


def test_the_legend_marks_the_diverged_run_with_its_epoch():
    labels = [t.get_text() for t in draw_comparison(SWEEP, "t").axes[1].get_legend().get_texts()]
    assert labels == [
        "lr=0.1 no BN",
        "lr=0.1 BN",
        "lr=10 no BN (diverged in epoch 3)",
        "lr=10 BN",
    ]


def test_the_title_names_dataset_model_and_epochs():
    title = comparison_title(model="cnn", dataset="fashion_mnist", epochs=7)
    assert (
        title
        == "CNN on fashion_mnist, 7 epochs: SGD learning-rate sweep, with vs without batch norm"
    )
    assert [t.get_text() for t in draw_comparison(SWEEP, title).texts] == [title]
    assert comparison_title(model="mlp", dataset="digits", epochs=1).startswith(
        "MLP on digits, 1 epoch:"
    )
