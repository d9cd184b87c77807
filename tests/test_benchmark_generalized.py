"""benchmarks/generalized.py: a smoke run writes its page, table and plot, every
aligned model computes what B computes, and a missing --data fails clearly."""
from __future__ import annotations

import json

import pytest

from helpers import MNIST, load_benchmark, needs_mnist

pytest.importorskip("transformers")


@needs_mnist
def test_generalized_benchmark_smoke(tmp_path):
    bench = load_benchmark("generalized")
    results = bench.main(["--quick", "--out", str(tmp_path), "--families", "llama,vit",
                          "--data", str(MNIST), "--lm-cache", str(tmp_path / "lm")])
    page = (tmp_path / "generalized.md").read_text()
    assert (tmp_path / "generalized.png").is_file()
    doc = json.loads((tmp_path / "generalized.json").read_text())
    assert doc["families"].keys() == {"llama", "vit"}
    for fam in ("llama", "vit"):
        methods = results[fam]["methods"]
        assert set(methods) == set(bench.METHODS)
        for label, r in methods.items():
            if r["verify_error"] is not None:
                assert r["verify_error"] < 1e-4, (fam, label)
        assert methods["generalized"]["kinds"].get("orthogonal") == 1  # the residual stream
        assert f"| generalized | {methods['generalized']['barrier']:.4f} |" in page
    assert "## Target" in page and "target **" in page
    # the page is re-written from the JSON alone, the same
    (tmp_path / "generalized.md").unlink()
    bench.main(["--render", "--out", str(tmp_path)])
    assert (tmp_path / "generalized.md").read_text() == page


def test_generalized_benchmark_missing_data(tmp_path):
    bench = load_benchmark("generalized")
    with pytest.raises(SystemExit, match="no MNIST"):
        bench.main(["--quick", "--out", str(tmp_path), "--families", "vit",
                    "--data", str(tmp_path / "nowhere")])
