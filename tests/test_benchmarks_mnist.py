"""The MNIST benchmarks: a missing --data fails clearly; mnist_mlp.py on a small slice."""
from __future__ import annotations

import pytest

from helpers import MNIST, load_benchmark, needs_mnist

@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_resnet", "merge_many", "repair"])
def test_missing_data_fails_clearly(name, tmp_path, capsys):
    bench = load_benchmark(name)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "MNIST IDX files not found" in str(exc.value) and "--data" in str(exc.value)
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path)])  # --data is required
    assert "--data" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_unknown_method_rejected(tmp_path):
    bench = load_benchmark("mnist_mlp")
    with pytest.raises(SystemExit):
        bench.main(["--data", str(tmp_path), "--methods", "naive,nonsense"])


@needs_mnist
def test_mnist_mlp_one_epoch_writes_table(tmp_path):
    bench = load_benchmark("mnist_mlp")
    results = bench.main(["--data", str(MNIST), "--epochs", "1", "--limit", "512",
                          "--lambdas", "5", "--out", str(tmp_path)])
    assert set(results) == {"naive", "weight"}
    report = (tmp_path / "mnist_mlp.md").read_text()
    assert "| naive |" in report and "| weight |" in report
    assert "| train loss barrier |" in report
    assert "--epochs 1" in report
    assert (tmp_path / "mnist_mlp_barrier.png").is_file()
