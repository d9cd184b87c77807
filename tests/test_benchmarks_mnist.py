"""Smoke test of benchmarks/mnist_mlp.py on a small slice of the real MNIST files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import autobasin

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [Path("/work/shared/data/mnist"), REPO.parent / "shared" / "data" / "mnist"]
MNIST = next((p for p in CANDIDATES if (p / "t10k-images-idx3-ubyte.gz").is_file()), None)
HAS_MATCHER = all(hasattr(autobasin, f) for f in ("auto_rebasin", "loss_barrier", "plot_barrier"))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("mnist_mlp_bench", REPO / "benchmarks" / "mnist_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_data_fails_clearly(tmp_path, capsys):
    bench = load_benchmark()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "MNIST IDX files not found" in str(exc.value) and "--data" in str(exc.value)
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path)])  # --data is required
    assert "--data" in capsys.readouterr().err


def test_unknown_method_rejected(tmp_path):
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.main(["--data", str(tmp_path), "--methods", "naive,nonsense"])


@pytest.mark.skipif(MNIST is None, reason="MNIST IDX files not found under ../shared/data/mnist")
@pytest.mark.skipif(not HAS_MATCHER, reason="matcher layer (autobasin.auto_rebasin) not available yet")
def test_mnist_mlp_one_epoch_writes_table(tmp_path):
    bench = load_benchmark()
    results = bench.main(["--data", str(MNIST), "--epochs", "1", "--limit", "512",
                          "--lambdas", "5", "--out", str(tmp_path)])
    assert set(results) == {"naive", "weight"}
    report = (tmp_path / "mnist_mlp.md").read_text()
    assert "| naive |" in report and "| weight |" in report
    assert "--epochs 1" in report
    assert (tmp_path / "mnist_mlp_barrier.png").is_file()
