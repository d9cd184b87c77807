"""Assemble ``docs/results.md`` from the reports the benchmarks write.

``benchmarks/merge_many.py`` writes ``merge_many.md`` and ``benchmarks/repair.py``
writes ``repair.md``; each then calls :func:`write_results`, which rebuilds
``results.md`` in the same folder with every part present included in full
(tables, checks, plot links and the command that produced them), so one page
holds all the results whichever script ran last.
"""
from __future__ import annotations

import re
from pathlib import Path

PARTS = (
    ("merge_many.md", "MergeMany, calibration and model patching", "benchmarks/merge_many.py"),
    ("repair.md", "REPAIR on networks without normalization", "benchmarks/repair.py"),
)
ELSEWHERE = (
    ("mnist_mlp.md", "MNIST MLP loss barrier, naive vs aligned"),
    ("zoo.md", "model zoo: spec inference on timm and torchvision"),
)


def _demote(markdown: str) -> str:
    """Every heading one level down, so a part's title nests under results.md's."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,5} ", line):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def write_results(folder: Path) -> Path:
    """Rewrite ``folder/results.md`` from the parts in ``folder``; returns its path."""
    folder = Path(folder)
    present = [(name, title, script) for name, title, script in PARTS if (folder / name).is_file()]
    out = ["# Results", "",
           "Generated: each benchmark script rewrites its own report and then this page, "
           "which includes every report in full. Regenerate with:", "", "```"]
    out += [f"python {script} --data ../shared/data/mnist" for _, _, script in PARTS]
    out += ["```", ""]
    for name, title, _ in present:
        out.append(f"- [{title}](#{_anchor(name, folder)}) (also as [{name}]({name}))")
    for name, title in ELSEWHERE:
        if (folder / name).is_file():
            out.append(f"- {title}: [{name}]({name})")
    out.append("")
    for name, _, _ in present:
        out.append(_demote((folder / name).read_text()))
    path = folder / "results.md"
    path.write_text("\n".join(out))
    return path


def _anchor(name: str, folder: Path) -> str:
    """GitHub's anchor for the first heading of ``folder/name``."""
    for line in (folder / name).read_text().splitlines():
        if line.startswith("# "):
            text = line[2:].strip().lower()
            text = re.sub(r"[^\w\- ]", "", text)
            return text.replace(" ", "-")
    return ""
