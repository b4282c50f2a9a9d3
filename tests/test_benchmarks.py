"""The benchmark scripts run end to end on tiny shapes and print their tables (no timing is
asserted: speed lives in benchmarks/, not in tests)."""

from __future__ import annotations

from benchmarks import bn, train_step


def test_the_bn_benchmark_prints_a_row_per_shape_dtype_and_mode(capsys):
    assert bn.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "fwd" in line and "x" in line.split()[0]]
    assert len(rows) == len(bn.QUICK_SHAPES) * 2 * 2  # shapes × dtypes × (fwd+bwd, fwd)
    assert "/flax" in out and "/torch" in out and "/bound" in out


def test_the_train_step_benchmark_compares_all_variants(capsys):
    assert train_step.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in ("ConvNet", "ResNet"):
        for variant in ("jaxbn", "flax.linen BN", "torch", "no norm (jax)"):
            assert any(line.startswith(name) and variant in line for line in out.splitlines())
    assert out.count("BN overhead vs no norm") == 2
