"""benchmarks/equinox_step.py runs end to end on tiny shapes and prints its table (no timing
is asserted: speed lives in benchmarks/, not in tests)."""

import pytest

from benchmarks import equinox_step


@pytest.mark.slow
def test_the_equinox_step_benchmark_prints_every_variant_and_the_overheads(capsys):
    assert equinox_step.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[3:-1]]
    assert rows == ["jaxbn", "eqx", "eqx", "none"]
    assert "BN overhead vs no norm: jaxbn " in out
