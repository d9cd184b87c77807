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
