"""The benchmark script runs and prints its two tables."""

from benchmarks import speed


def test_quick_benchmark_prints_both_tables(capsys):
    speed.main(["--quick", "--threads", "1"])
    output = capsys.readouterr().out
    assert "| preset | batch | threads |" in output
    for preset in speed.PRESETS:
        assert f"| {preset} | " in output
    assert "| n | spheres K |" in output
    assert "| 5 | 8 |" in output
