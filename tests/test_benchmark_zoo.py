"""benchmarks/zoo.py: one model end to end, and --update merging re-run rows into a sweep."""
from __future__ import annotations

import json

import pytest

from helpers import REPO, load_benchmark


def test_update_replaces_rows_and_lists_the_rerun(tmp_path):
    zoo = load_benchmark("zoo")
    with pytest.raises(SystemExit):
        zoo.main(["--update", "--out", str(tmp_path)])              # --update needs --only
    with pytest.raises(SystemExit):
        zoo.main(["--only", "timm:test_vit", "--update", "--out", str(tmp_path)])  # no sweep yet
    published = json.loads((REPO / "docs" / "zoo.json").read_text())
    base_rows = [r for r in published["rows"] if r["source"] == "timm"][:3]
    stale = dict(base_rows[0], status="crash", coverage=None)      # a row to re-run
    (tmp_path / "zoo.json").write_text(json.dumps(
        {"meta": dict(published["meta"], command="python benchmarks/zoo.py --jobs 2"),
         "rows": [stale, *base_rows[1:]]}))
    assert zoo.main(["--only", f"timm:{stale['model']},timm:test_vit", "--update",
                     "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "zoo.json").read_text())
    rows = {r["model"]: r for r in doc["rows"]}
    assert set(rows) == {r["model"] for r in base_rows} | {"test_vit"}
    assert rows[stale["model"]]["status"] == "exact" and rows["test_vit"]["status"] == "exact"
    assert doc["meta"]["command"] == "python benchmarks/zoo.py --jobs 2"   # the sweep's
    assert doc["meta"]["reruns"][-1]["models"] == sorted([stale["model"], "test_vit"])
    page = (tmp_path / "zoo.md").read_text()
    assert "Rows re-run since, with `python benchmarks/zoo.py --only" in page
    assert "timm families exact: 4 / 4" in page and "Partial run" not in page


def test_check_rejudges_a_tie_on_weights_farther_from_their_initialisation():
    """A top-k among scores equal but for rounding (a zero-initialised scorer over
    a sum that cancels, as PP-DocLayout's anchors near their initialisation) cannot
    judge a spec; the sweep re-checks on perturbed weights and says so, and still
    catches a wrong spec."""
    import torch
    from torch import nn

    from autobasin import Group, infer_spec

    sweep = load_benchmark("sweep")

    class PicksAmongTies(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.score, self.out = nn.Linear(16, 64), nn.Linear(64, 1), nn.Linear(64, 3)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            score = 10 + h.sum(-1) - (h * 3).sum(-1) / 3 + self.score(h).squeeze(-1)
            idx = score.topk(5, dim=1)[1]
            return self.out(torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1])))

    def tied(seed):
        torch.manual_seed(seed)
        model = PicksAmongTies().eval()
        with torch.no_grad():
            model.score.weight.zero_()
        return model

    torch.manual_seed(1)
    x = torch.randn(2, 50, 16)
    spec = infer_spec(tied(1), x)
    row: dict = {}
    sweep.check_spec(tied(1), spec, x, row, seeds=(0, 1), rtol=1e-4)
    assert row["status"] == "exact", row
    assert row["check_note"].startswith("re-checked on weights perturbed")
    assert "TieBreakError" in row["check_note"]

    # drop the member on out: permuting fc's units no longer reaches it
    g = next(g for g in spec.groups.values() if any(m.param == "out.weight" for m in g.members))
    spec.groups[g.name] = Group(g.name, g.size, [m for m in g.members if m.param != "out.weight"])
    bad: dict = {}
    sweep.check_spec(tied(1), spec, x, bad, seeds=(0, 1), rtol=1e-4)
    assert bad["status"] == "caught"
