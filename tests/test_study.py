"""barrier_study: pairs x methods -> a table that summarises, prints, saves and plots."""
from __future__ import annotations

import json

import pytest
import torch

import autobasin
from autobasin import barrier_study
from autobasin.demo import make_mlp

from helpers import one_thread_per_module  # noqa: F401


def _data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def _planted(width, seed):
    """A model and a random permutation of it (same function)."""
    a = make_mlp(6, (width, width), 3, seed=seed)
    spec = autobasin.infer_spec(a, torch.randn(2, 6))
    perms = autobasin.random_permutation(spec, seed=seed + 7)
    return a, autobasin.permute_model(a, spec, perms)


def test_study_rows_summary_and_markdown(tmp_path):
    data = _data()
    pairs, loaded = [], []
    for width in (4, 8):
        for seed in (0, 1):
            a, b = _planted(width, seed)
            # b given lazily: loaded when its pair comes up
            pairs.append(({"width": width, "seed": seed}, a, lambda b=b: loaded.append(1) or b))
    table = barrier_study(pairs, data, methods=("naive", "weight", "activation"), match_data=data,
                          example_inputs=torch.randn(2, 6), lambdas=5, progress=False)
    assert len(table) == 4 * 3 and len(loaded) == 4
    assert table.methods() == ["naive", "weight", "activation"]
    for row in table:
        # B is a permutation of A: endpoints equal, and matching undoes the permutation
        assert row.loss_a == pytest.approx(row.loss_b, abs=1e-5)
        if row.method != "naive":
            assert abs(row.barrier) < 1e-5 and row.midpoint_loss == pytest.approx(row.loss_a, abs=1e-5)
            assert row.seconds > 0
        else:
            assert row.seconds == 0.0
    naive = [r for r in table if r.method == "naive"]
    assert max(r.barrier for r in naive) > 1e-3  # a random permutation is far from A

    summary = table.summary("width")
    assert [(e["width"], e["method"], e["n"]) for e in summary][:3] == [(4, "naive", 2), (4, "weight", 2),
                                                                         (4, "activation", 2)]
    entry = summary[0]
    values = [r.barrier for r in table if r.method == "naive" and r.key["width"] == 4]
    assert entry["mean"] == pytest.approx(sum(values) / 2)
    assert entry["min"] == min(values) and entry["max"] == max(values)

    md = table.to_markdown("width")
    assert md.splitlines()[0].startswith("| width | pairs | naive barrier | naive above chord")
    assert len(md.splitlines()) == 2 + 2 and "–" in md.splitlines()[2]

    path = tmp_path / "t.json"
    table.save(path)
    records = json.loads(path.read_text())
    assert records[0]["width"] == 4 and records[0]["method"] == "naive" and len(records[0]["losses"]) == 5
    again = autobasin.StudyTable.from_records(records)  # read back: the same table
    assert again.to_markdown("width") == md and again[1].key == {"width": 4, "seed": 0}
    assert again[0].curve.losses == table[0].curve.losses
    fig = table.plot("width", path=tmp_path / "w.png", title="t")
    assert (tmp_path / "w.png").stat().st_size > 0 and fig.axes[0].get_xscale() == "log"
    with pytest.raises(KeyError, match="epoch"):
        table.summary("epoch")


def test_study_custom_aligner_repair_and_errors():
    data = _data()
    a, b = _planted(8, 3)
    calls = []

    def reverse(model_a, model_b):  # a custom aligner is called once per pair, shared by +repair
        calls.append(1)
        return model_b

    table = barrier_study([({"p": 0}, a, b)], data, methods={"mine": reverse, "wm": "weight",
                                                             "wm+repair": "weight+repair"},
                          match_data=data, example_inputs=torch.randn(2, 6), lambdas=3, progress=False)
    assert [r.method for r in table] == ["mine", "wm", "wm+repair"] and len(calls) == 1
    assert abs(table[1].barrier) < 1e-5 and abs(table[2].barrier) < 1e-4
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        barrier_study([({"p": 0}, a, b)], data, methods=("nope",), progress=False)
    with pytest.raises(ValueError, match="needs match_data"):
        barrier_study([({"p": 0}, a, b)], data, methods=("activation",), progress=False)
    with pytest.raises(ValueError, match="repair"):
        barrier_study([({"p": 0}, a, b)], data, methods=("weight+fix",), progress=False)
