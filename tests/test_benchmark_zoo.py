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
