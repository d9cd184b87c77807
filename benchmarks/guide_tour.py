"""Run the guide's command-line tour and write what it prints into ``docs/guide.md``.

The tour (section "A tour" of the guide) saves a ``mlp.py``, trains two MLPs with
it, then runs ``autobasin inspect``, ``align``, ``barrier`` and ``merge`` on them.
This script does exactly that in a temporary folder: the ``mlp.py`` it runs is
the guide's own code block, and each console block of the tour is replaced by
the command's real standard output. The training time the guide quotes is the
one measured here. So the guide shows what a user sees, not a pasted run.

    python benchmarks/guide_tour.py              # rewrite docs/guide.md
    python benchmarks/guide_tour.py --check      # exit 1 if the guide differs
                                                 # (numbers aside: they vary by machine)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import tempfile
import time
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
TOUR = "### A tour"
_CONSOLE = re.compile(r"```console\n\$ (autobasin [^\n]*)\n(.*?)```", re.S)
_TRAINING = re.compile(r"\(about [^)]* on [^)]*CPU\)")


def _tour(text: str) -> tuple[int, int]:
    """Start and end offsets of the tour in the guide's text."""
    start = text.index(TOUR)
    end = text.find("\n## ", start)
    return start, end if end >= 0 else len(text)


def _run_cli(command: str) -> str:
    """Standard output of ``autobasin ...`` run in this process (stderr: progress, left out)."""
    from autobasin.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(shlex.split(command)[1:])
    if code:
        raise SystemExit(f"guide tour: `{command}` exited with {code}")
    return out.getvalue()


def run_tour(text: str, workdir: Path) -> str:
    """The guide's text with the tour's console blocks and training time regenerated."""
    start, end = _tour(text)
    tour = text[start:end]
    code = re.search(r"```python\n(.*?)```", tour, re.S)
    if code is None:
        raise SystemExit("guide tour: no mlp.py code block in the tour")
    (workdir / "mlp.py").write_text(code.group(1))
    cwd = os.getcwd()
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path("mlp.py", run_name="__main__")
        seconds = time.perf_counter() - t0
        outputs = {m.group(1): _run_cli(m.group(1)) for m in _CONSOLE.finditer(tour)}
    finally:
        os.chdir(cwd)
        sys.path.remove(str(workdir))
    tour = _CONSOLE.sub(lambda m: f"```console\n$ {m.group(1)}\n{outputs[m.group(1)]}```", tour)
    tour = _TRAINING.sub(f"(about {max(1, round(seconds))} seconds on a 2-core CPU)", tour, count=1)
    return text[:start] + tour + text[end:]


def without_numbers(text: str) -> str:
    """``text`` with every number replaced by ``#`` (figures vary by machine and version)."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guide", type=Path, default=GUIDE, help="the guide to rewrite or check")
    p.add_argument("--check", action="store_true",
                   help="compare instead of writing; exit 1 when the outputs (numbers aside) differ")
    args = p.parse_args(argv)
    text = args.guide.read_text()
    with tempfile.TemporaryDirectory(prefix="autobasin-tour-") as tmp:
        new = run_tour(text, Path(tmp))
    if args.check:
        if without_numbers(new) != without_numbers(text):
            import difflib
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), "guide", "tour",
                                        lineterm="", n=1)
            print("\n".join(diff))
            return 1
        print("the guide's tour shows what the commands print")
        return 0
    args.guide.write_text(new)
    print(f"wrote {args.guide}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
