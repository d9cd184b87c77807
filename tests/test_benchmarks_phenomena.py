"""The phenomena benchmarks (width, training time, counterexample) on small slices,
their page, and the counterexample's function-preserving rescalings."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import MNIST, load_benchmark, needs_mnist, one_thread_per_module  # noqa: F401


@pytest.mark.parametrize("name", ["width", "training_time", "counterexample"])
def test_missing_data_fails_clearly(name, tmp_path):
    bench = load_benchmark(name)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "MNIST IDX files not found" in str(exc.value)
    assert not list(tmp_path.iterdir())


def test_rescaling_and_balancing_preserve_the_function():
    bench = load_benchmark("counterexample")
    phen = load_benchmark("phenomena")
    model = phen.make_model("mlp", 16, seed=0)
    x = torch.randn(32, 1, 28, 28)
    scaled = bench.rescale_units(model, 16.0, seed=3)
    balanced = bench.balance_units(scaled)
    with torch.no_grad():
        ref = model(x)
        for other in (scaled, balanced):
            torch.testing.assert_close(other(x), ref, rtol=1e-4, atol=1e-4)
    layers = bench.linears(scaled)
    assert (layers[0].weight - bench.linears(model)[0].weight).abs().max() > 0.1  # the weights did change
    for layer, following in zip(bench.linears(balanced)[:-1], bench.linears(balanced)[1:]):
        n_in = torch.cat([layer.weight, layer.bias[:, None]], 1).norm(dim=1)
        torch.testing.assert_close(n_in, following.weight.norm(dim=0), rtol=1e-3, atol=1e-5)


def test_exhaustive_midpoint_matches_the_permuted_model():
    """midpoint_excess_all's value for a permutation equals the loss of the real
    midpoint model with B's units in that order (checked on a few permutations)."""
    bench = load_benchmark("counterexample")
    phen = load_benchmark("phenomena")
    from autobasin import interpolate
    a, b = phen.make_model("mlp", 4, 0, depth=1), phen.make_model("mlp", 4, 1, depth=1)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(20, 1, 28, 28, generator=gen), torch.randint(0, 10, (20,), generator=gen))]
    excess, perms = bench.midpoint_excess_all(a, b, data, chunk=7)
    assert len(excess) == 24
    x, y = data[0]
    ends = sum(torch.nn.functional.cross_entropy(m(x), y).item() for m in (a, b)) / 2
    for i in (0, 5, 23):
        mid = interpolate(a, bench.permute_hidden(b, perms[i]), 0.5)
        loss = torch.nn.functional.cross_entropy(mid(x), y).item()
        assert excess[i].item() == pytest.approx(loss - ends, abs=1e-5)


@needs_mnist
def test_width_and_training_time_write_the_page(tmp_path):
    width = load_benchmark("width")
    table = width.main(["--data", str(MNIST), "--model", "mlp", "--widths", "8,32", "--seeds", "3,2",
                        "--epochs", "1", "--limit", "600", "--lambdas", "5", "--out", str(tmp_path)])
    assert len(table) == (3 + 1) * 3  # 3 pairs at width 8, 1 at 32; three methods
    part = json.loads((tmp_path / "phenomena_width_mlp.json").read_text())
    assert part["kind"] == "mlp" and len(part["rows"]) == 12 and (tmp_path / part["plot"]).is_file()
    page = (tmp_path / "phenomena.md").read_text()
    assert "## Barrier vs width: MLP" in page and "| 8 | 3 |" in page and "--widths 8,32" in page
    assert "weight matching barrier falls with width" in page

    tt = load_benchmark("training_time")
    table = tt.main(["--data", str(MNIST), "--width", "16", "--epochs", "1", "--limit", "600",
                     "--lambdas", "5", "--out", str(tmp_path)])
    steps = sorted({r.key["step"] for r in table})
    assert steps[0] == 0 and steps[-1] == 5  # 600 * 7/8 images in batches of 128: 5 steps
    page = (tmp_path / "phenomena.md").read_text()
    assert "## Barrier vs training time" in page and "## Barrier vs width: MLP" in page
    assert "The paper's claims, point by point" in page


@needs_mnist
def test_counterexample_small_run(tmp_path):
    bench = load_benchmark("counterexample")
    payload = bench.main(["--data", str(MNIST), "--width", "16", "--small", "4", "--epochs", "1",
                          "--limit", "600", "--lambdas", "5", "--out", str(tmp_path)])
    assert payload["checks"][0].startswith("- B' computes B's function") and "(yes)" in payload["checks"][0]
    assert set(payload["exhaustive"]) == {"B", "B'"}
    # the best permutation is never worse than weight matching's
    for entry in payload["exhaustive"].values():
        assert entry["min"] <= entry["weight_matching"] + 1e-9 and entry["weight_matching_rank"] >= 1
    assert "A counterexample" in (tmp_path / "phenomena.md").read_text()
