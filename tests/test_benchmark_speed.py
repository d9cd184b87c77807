"""benchmarks/weight_matching_speed.py: its distance-over-time arithmetic, and a smoke run."""
from __future__ import annotations

import pytest

from helpers import load_benchmark


def test_time_to_distance_reads_the_objective_history():
    bench = load_benchmark("weight_matching_speed")
    # ||A||^2 + ||B||^2 = 30, so d^2 = 30 - 2 J: J = 5, 8, 9 give d^2 = 20, 14, 12
    ours = {"objectives": [5.0, 8.0, 9.0], "sweep_seconds": [0.5, 1.0, 1.5],
            "dist_after": 12 ** 0.5}
    curve = bench.distance_curve(ours)
    assert [t for t, _ in curve] == [0.5, 1.0, 1.5]
    assert [d * d for _, d in curve] == pytest.approx([20, 14, 12])
    assert bench.time_to_distance(ours, 14 ** 0.5) == 1.0
    assert bench.time_to_distance(ours, 100.0) == 0.5
    assert bench.time_to_distance(ours, 3.0) is None


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path):
    bench = load_benchmark("weight_matching_speed")
    rows = bench.main(["--models", "resnet18", "--no-rebasin", "--out", str(tmp_path)])
    ours = rows[0]["autobasin"]
    assert ours["ok"], ours
    assert ours["dist_after"] < ours["dist_before"] and ours["function_error"] <= 1e-4
    assert len(ours["sweep_seconds"]) == len(ours["objectives"]) == ours["sweeps"] + 1
    text = (tmp_path / "performance.md").read_text()
    assert "| resnet18 |" in text and "within 2x of the floor" in text
