"""Execute the notebooks on their reduced setting (``AUTOBASIN_QUICK=1``)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="MNIST IDX files not found under ../shared/data/mnist")
def test_mnist_comparison_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("AUTOBASIN_QUICK", "1")
    monkeypatch.setenv("AUTOBASIN_MNIST", str(MNIST))
    path = REPO / "notebooks" / "mnist_comparison.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # in memory: the file on disk keeps no outputs
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "QUICK=True" in text
    for name in ("naive", "weight", "activation", "ste"):
        assert f"| {name} |" in text
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the plot cell produced no image"


def test_quickstart_notebook_runs(monkeypatch):
    """The quickstart aligns two timm resnet18s, reads and checks the spec, undoes a planted
    permutation exactly, and plots a loss barrier; the file on disk carries no outputs."""
    import re
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("AUTOBASIN_QUICK", "1")
    path = REPO / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "QUICK=True" in text
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
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the plot cell produced no image"


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="MNIST IDX files not found under ../shared/data/mnist")
def test_merge_many_repair_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("AUTOBASIN_QUICK", "1")
    monkeypatch.setenv("AUTOBASIN_MNIST", str(MNIST))
    path = REPO / "notebooks" / "merge_many_repair.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # in memory: the file on disk keeps no outputs
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "QUICK=True" in text
    for row in ("| parent 1 |", "| naive average |", "| MergeMany |", "| MergeMany + REPAIR |",
                "| ensemble |", "| matched midpoint |", "| matched + REPAIR |"):
        assert row in text, row
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the reliability diagram and the path plot"
