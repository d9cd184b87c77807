"""Smoke tests of benchmarks/merge_many.py and benchmarks/repair.py on a slice of MNIST."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [Path("/work/shared/data/mnist"), REPO.parent / "shared" / "data" / "mnist"]
MNIST = next((p for p in CANDIDATES if (p / "t10k-images-idx3-ubyte.gz").is_file()), None)


def load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["merge_many", "repair"])
def test_missing_data_fails_clearly(name, tmp_path, capsys):
    bench = load(name)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "MNIST IDX files not found" in str(exc.value) and "--data" in str(exc.value)
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path)])  # --data is required
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


@pytest.mark.skipif(MNIST is None, reason="MNIST IDX files not found under ../shared/data/mnist")
def test_both_benchmarks_write_their_part_and_results_md(tmp_path):
    merge = load("merge_many").main(["--data", str(MNIST), "--models", "2", "--epochs", "1",
                                     "--limit", "128", "--lambdas", "3", "--patching", "biased",
                                     "--out", str(tmp_path)])
    assert set(merge["merge"]["rows"]) >= {"parent 1", "parent 2", "naive weight average",
                                           "**MergeMany**", "ensemble (mean of softmax)"}
    assert len(merge["patching"]) == 1  # the biased split only
    assert all("aligned midpoint + REPAIR" in p["rows"] for p in merge["patching"].values())
    part = (tmp_path / "merge_many.md").read_text()
    assert "| **MergeMany** |" in part and "| naive midpoint |" in part and "--models 2" in part
    for png in ("merge_many_reliability.png", "patching_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 1000

    repair = load("repair").main(["--data", str(MNIST), "--epochs", "1", "--limit", "128",
                                  "--lambdas", "3", "--out", str(tmp_path)])
    assert set(repair) == {("mlp", "weight"), ("cnn", "weight")}
    part = (tmp_path / "repair.md").read_text()
    assert "recovered by REPAIR" in part and "--epochs 1" in part
    for png in ("repair_path.png", "repair_variance.png"):
        assert (tmp_path / png).stat().st_size > 1000

    results = (tmp_path / "results.md").read_text()
    assert "| **MergeMany** |" in results and "recovered by REPAIR" in results
    assert "(merge_many_reliability.png)" in results and "(repair_path.png)" in results
    assert results.count("\n## ") >= 2  # both parts, headings nested under '# Results'
