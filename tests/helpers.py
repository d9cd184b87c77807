"""Shared by the tests of the benchmarks and notebooks: where MNIST is, loading a
benchmark script as a module, executing a notebook in memory."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [REPO.parent / "shared" / "data" / "mnist", Path("/work/shared/data/mnist")]
MNIST = next((p for p in _CANDIDATES if (p / "t10k-images-idx3-ubyte.gz").is_file()), None)
needs_mnist = pytest.mark.skipif(MNIST is None,
                                 reason="MNIST IDX files not found under ../shared/data/mnist")


def load_benchmark(name: str):
    """``benchmarks/{name}.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_notebook(name: str, monkeypatch, **env: str) -> tuple[str, list]:
    """Execute ``notebooks/{name}`` with ``AUTOBASIN_QUICK=1`` and ``env`` set; the file
    on disk must carry no outputs and stays untouched. Returns the text the code
    cells printed and their PNG outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("AUTOBASIN_QUICK", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = REPO / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # in memory
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "QUICK=True" in text
    return text, images


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``autobasin ARGV...`` in this process: (exit code, stdout, stderr)."""
    from autobasin.cli import main
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module():
    """Small models run fastest on one thread, and far faster on a busy machine:
    a module that imports this fixture runs its tests on one thread."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
