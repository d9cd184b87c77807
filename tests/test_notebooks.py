"""Execute the notebooks on their reduced setting (``AUTOBASIN_QUICK=1``)."""
from __future__ import annotations

import re

import pytest

from helpers import MNIST, needs_mnist, run_notebook


@needs_mnist
def test_mnist_comparison_notebook_runs(monkeypatch):
    text, images = run_notebook("mnist_comparison.ipynb", monkeypatch, AUTOBASIN_MNIST=str(MNIST))
    for name in ("naive", "weight", "activation", "ste"):
        assert f"| {name} |" in text
    assert images, "the plot cell produced no image"


def test_quickstart_notebook_runs(monkeypatch):
    """The quickstart aligns two timm resnet18s, reads and checks the spec, undoes a planted
    permutation exactly, and plots a loss barrier; the file on disk carries no outputs."""
    text, images = run_notebook("quickstart.ipynb", monkeypatch)
    assert "aligned B computes what B computes: True" in text
    assert "spec JSON" in text and "groups kept: True" in text
    assert "layer1.0.conv2.weight[1]" in text            # a group's members are listed
    coverage = float(re.search(r"coverage: ([0-9.]+) of parameter elements", text).group(1))
    assert coverage > 0.999
    before = re.search(r"L2 distance to A: B ([0-9.]+) -> aligned B ([0-9.]+)", text)
    assert float(before.group(2)) < float(before.group(1))
    assert float(re.search(r"relative output error ([0-9.e+-]+)", text).group(1)) < 1e-4
    planted = float(re.search(r"planted distance before alignment: ([0-9.]+)", text).group(1))
    assert planted > 1.0
    assert "planted distance after alignment: 0.0000" in text
    exact = re.search(r"recovered exactly: (\d+)/(\d+)", text)
    assert exact.group(1) == exact.group(2)
    barriers = dict(re.findall(r"(naive|weight matching): loss barrier ([0-9.-]+)", text))
    assert float(barriers["weight matching"]) < float(barriers["naive"])
    assert images, "the plot cell produced no image"


@needs_mnist
def test_merge_many_repair_notebook_runs(monkeypatch):
    text, images = run_notebook("merge_many_repair.ipynb", monkeypatch, AUTOBASIN_MNIST=str(MNIST))
    for row in ("| parent 1 |", "| naive average |", "| MergeMany |", "| MergeMany + REPAIR |",
                "| ensemble |", "| matched midpoint |", "| matched + REPAIR |"):
        assert row in text, row
    assert len(images) == 2, "the reliability diagram and the path plot"


def test_lm_align_notebook_runs(monkeypatch):
    """Two Llama-style byte LMs trained a few steps on the standard library: both aligned
    copies of B compute what B computes, and the plot cell draws the path."""
    pytest.importorskip("transformers")
    text, images = run_notebook("lm_align.ipynb", monkeypatch)
    assert text.count("aligned B computes what B computes: True") == 2
    rows = dict(re.findall(r"\| (naive|weight|activation) \| ([0-9.-]+) \|", text))
    assert set(rows) == {"naive", "weight", "activation"}
    assert float(rows["weight"]) < float(rows["naive"])
    assert images, "the plot cell produced no image"


def test_phenomena_notebook_runs(monkeypatch):
    """The reduced width, training-time and counterexample studies on sklearn digits."""
    text, images = run_notebook("phenomena.ipynb", monkeypatch)
    m = re.search(r"weight matching barrier, narrowest -> widest: ([0-9.-]+) -> ([0-9.-]+)", text)
    assert float(m.group(2)) < float(m.group(1)) / 4
    assert float(re.search(r"naive barrier at the widest: ([0-9.]+)", text).group(1)) > 0.2
    assert "B' computes what B computes: True" in text
    barriers = dict(re.findall(r"(A, B|A, B' \(rescaled B\)|balanced A, balanced B'): weight matching "
                               r"barrier ([0-9.-]+)", text))
    assert float(barriers["A, B' (rescaled B)"]) > 4 * max(float(barriers["A, B"]), 0.02)
    assert float(barriers["balanced A, balanced B'"]) < float(barriers["A, B' (rescaled B)"]) / 4
    assert "weight matching: peak barrier" in text
    assert len(images) == 2
