"""benchmarks/lm.py on its --quick setting: the page and its tables are written, every
aligned language model computes what model B computes, a missing --data fails clearly."""
from __future__ import annotations

import re

import pytest
import torch

from helpers import load_benchmark

pytest.importorskip("transformers")


def test_missing_data_fails_clearly(tmp_path, capsys):
    bench = load_benchmark("lm")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_unknown_family_rejected(tmp_path):
    bench = load_benchmark("lm")
    with pytest.raises(SystemExit):
        bench.main(["--families", "llama,nonsense", "--out", str(tmp_path)])


def test_lm_benchmark_quick_writes_page_and_aligned_models_are_exact(tmp_path):
    bench = load_benchmark("lm")
    out = tmp_path / "docs"
    result = bench.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache")])
    pairs, merges = result["pairs"], result["merges"]
    assert set(pairs) == {"llama", "gpt2"} and set(merges) == {"llama", "gpt2"}

    page = (out / "lm.md").read_text()
    assert (out / "lm_barrier.png").is_file()
    for section in ("## Llama-style", "## GPT-2-style", "## MergeMany", "## Target",
                    "## Against the literature", "![held-out loss vs lambda](lm_barrier.png)"):
        assert section in page, section
    for method in ("naive", "weight", "activation", "ste"):
        assert re.search(rf"\| \**{method}\** \| \d", page), method
    assert "residual stream unpermuted" in page
    assert "| residual stream |" in page and "| MLP hidden units |" in page
    assert "| **MergeMany** (weight matching) |" in page and "| ensemble" in page
    assert "--quick" in page  # the command that produced it

    batch = pairs["llama"]["example"]
    for name, pair in pairs.items():
        a, b = pair["a"], pair["b"]
        naive = pair["rows"]["naive"].curve.barrier
        assert naive > 0.05, f"{name}: two seeds should not be linearly connected"
        best = pair["rows"][pair["best"]].curve.barrier
        assert best < naive, f"{name}: the best matcher does not lower the barrier"
        assert set(pair["results"]) >= {"weight", "activation", "ste"}
        with torch.no_grad():
            ref = b(input_ids=batch).logits
            for label, res in pair["results"].items():
                assert res.verify_error is not None and res.verify_error <= 1e-4, label
                got = res.model(input_ids=batch).logits
                err = float((got - ref).norm() / ref.norm())
                assert err < 1e-4, f"{name} {label}: aligned B differs from B by {err:.2g}"
                # and it is a different model from B as a set of weights
                moved = any(not torch.equal(p, q) for p, q in
                            zip(res.model.state_dict().values(), b.state_dict().values()))
                assert moved, f"{name} {label}: nothing was permuted"
        # the page reports this family's numbers, not placeholders
        assert f"{naive:.4f}" in page
    for name, merge in merges.items():
        assert len(merge["verify_errors"]) == 3 and max(merge["verify_errors"]) <= 1e-4
        rows = merge["rows"]
        assert rows["**MergeMany** (weight matching)"][0] < rows["naive weight average"][0], name
