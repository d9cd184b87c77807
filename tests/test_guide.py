"""docs/guide.md stays true: its rule example runs and does what it says, and every
``autobasin.*`` name and command-line option it mentions exists."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def _section(title: str) -> str:
    text = GUIDE.read_text()
    assert f"\n## {title}\n" in text, f"section {title!r} is gone from the guide"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_rule_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", _section("Adding a rule for a new op"), re.S)
    assert len(blocks) == 2
    scope: dict = {"__name__": "guide_rule_example"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.warns(UserWarning, match="CheckedScale"):
        exec(compile(blocks[0], "guide.md: the model", "exec"), scope)
        before = printed.getvalue()
        exec(compile(blocks[1], "guide.md: the rule", "exec"), scope)
    assert before.startswith("PermutationSpec: 0 groups") and "no rule for module CheckedScale" \
        in before
    spec = scope["spec"]
    assert list(spec.groups) == ["0:out"] and spec.groups["0:out"].size == 16
    members = {(m.param, m.axis) for m in spec.groups["0:out"].members}
    assert members == {("0.weight", 0), ("0.bias", 0), ("1.scale", 0), ("3.weight", 1)}
    # the comments in the guide show what really prints
    for line in printed.getvalue().splitlines():
        if line.startswith(("PermutationSpec:", "0:out")):
            assert f"# {line}" in blocks[0] + blocks[1], line
    # the rule is right even when no parameter is trivially initialised
    from autobasin import check_equivalence
    from autobasin.testing import randomize_state_
    model = randomize_state_(scope["model"], seed=1)
    assert check_equivalence(model, spec, scope["x"]) < 1e-4


def _resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if not hasattr(obj, part):
            obj = importlib.import_module(".".join(parts[: i + 1]))
        else:
            obj = getattr(obj, part)
    return obj


def test_names_in_the_guide_exist():
    text = GUIDE.read_text()
    names = set(re.findall(r"\bautobasin(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
    assert {"autobasin.auto_rebasin", "autobasin.merge_many",
            "autobasin.check_equivalence"} <= names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"the guide names what autobasin does not have: {missing}"
    # and `from autobasin... import a, b` lines import
    for module, imported in re.findall(r"^from (autobasin[\w.]*) import ([\w, ]+)$", text, re.M):
        for name in imported.split(","):
            assert hasattr(importlib.import_module(module), name.strip()), (module, name)


def test_cli_options_in_the_guide_exist():
    from autobasin.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    options = {name: {o for a in sub._actions for o in a.option_strings}
               for name, sub in commands.choices.items()}
    text = GUIDE.read_text()
    uses = re.findall(r"autobasin (inspect|align|barrier|merge|demo)\b([^\n`]*)", text)
    assert {cmd for cmd, _ in uses} == set(options)      # every subcommand has an example
    for cmd, rest in uses:
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
            assert flag in options[cmd], f"`autobasin {cmd}` has no option {flag}"
    for flag in re.findall(r"`(--[a-z][a-z-]*)", text):   # options named on their own
        assert any(flag in opts for opts in options.values()), flag


def test_hugging_face_example_prints_what_the_guide_shows():
    (block,) = re.findall(r"```python\n(.*?)```", _section("Hugging Face transformers"), re.S)
    scope: dict = {"__name__": "guide_hf_example"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "guide.md: Hugging Face", "exec"), scope)
    lines = printed.getvalue().splitlines()
    assert f"# {lines[0]}" in block                       # the summary line, verbatim
    shown = [ln[2:] for ln in block.splitlines() if ln.startswith("# model.")]
    for line in shown:                                    # each group shown: name and size
        name_and_size = line.split("  model.")[0].rstrip(" .")
        assert any(out.startswith(name_and_size) for out in lines), line
    assert "inv_freq" in lines[-1]                        # the fixed q/k head-dim and why
    spec = scope["spec"]
    assert spec.capture == "export" and len(spec.groups) == 9


def test_the_tour_shows_what_its_commands_print(tmp_path):
    """The tour's console blocks are generated by benchmarks/guide_tour.py; re-running the
    tour (train mlp.py, then inspect / align / barrier / merge) prints the same lines,
    numbers aside."""
    import importlib.util
    script = GUIDE.parents[1] / "benchmarks" / "guide_tour.py"
    spec = importlib.util.spec_from_file_location("guide_tour", script)
    tour = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tour)
    text = GUIDE.read_text()
    new = tour.run_tour(text, tmp_path)
    assert tour.without_numbers(new) == tour.without_numbers(text)
    # and the check can fail: a pasted line that the commands do not print is caught
    pasted = text.replace("wrote merged.safetensors\n", "wrote merged.safetensors\nwrote extra\n", 1)
    assert pasted != text and tour.without_numbers(new) != tour.without_numbers(pasted)
