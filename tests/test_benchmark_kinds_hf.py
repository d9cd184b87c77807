"""benchmarks/kinds_hf.py: a smoke run on two types writes its page; their specs with
every kind are exact, Llama's and GPT-2's folded residual streams orthogonal."""
from __future__ import annotations

import pytest

from helpers import load_benchmark

pytest.importorskip("transformers")


def test_kinds_hf_smoke(tmp_path):
    bench = load_benchmark("kinds_hf")
    rows = bench.main(["--out", str(tmp_path), "--types", "llama,gpt2"])
    assert [r["status"] for r in rows] == ["exact", "exact"]
    assert all(r["stream"] == "orthogonal" and r["folded"] == 5 for r in rows)
    assert all(r["error"] < 1e-4 and r["kinds"].get("invertible") for r in rows)
    page = (tmp_path / "kinds_hf.md").read_text()
    assert "**2 / 2**" in page and "caught (a kind the model does not admit): **0**" in page
