"""Smoke tests of benchmarks/merge_many.py and benchmarks/repair.py on a slice of MNIST."""
from __future__ import annotations

from helpers import MNIST, load_benchmark as load, needs_mnist


@needs_mnist
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
    assert set(repair) == {("mlp", "weight"), ("cnn", "weight"), ("deepcnn", "weight")}
    part = (tmp_path / "repair.md").read_text()
    assert "recovered by REPAIR" in part and "--epochs 1" in part
    for png in ("repair_path.png", "repair_variance.png"):
        assert (tmp_path / png).stat().st_size > 1000

    results = (tmp_path / "results.md").read_text()
    assert "| **MergeMany** |" in results and "recovered by REPAIR" in results
    assert "(merge_many_reliability.png)" in results and "(repair_path.png)" in results
    assert results.count("\n## ") >= 2  # both parts, headings nested under '# Results'


def test_repair_check_explains_a_small_midpoint_loss():
    checks = load("repair").checks
    small = {"recovery": -0.15, "lost": 0.017, "heldout": 2000,
             "variance": {"matched midpoint": {"conv1": 0.93, "conv4": 0.78}}}
    large = dict(small, lost=0.30)
    (line_small,), (line_large,) = checks({("cnn", "weight"): small}), checks({("mlp", "weight"): large})
    assert ": NO (-15% of 1.70 points)" in line_small
    assert "at least 0.78 of their std" in line_small and "one image = 0.05 points" in line_small
    assert line_large.endswith("NO (-15% of 30.00 points)")  # a real miss is not explained away
