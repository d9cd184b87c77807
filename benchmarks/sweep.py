"""What the zoo sweeps (``zoo.py``: timm and torchvision, ``zoo_hf.py``:
transformers) share: each model runs in a process of its own, watched for
time and memory, and its spec is checked by permuting and comparing.

Not a benchmark by itself; the sweeps import it (they put this folder on
``sys.path`` first, as running them as scripts does).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve()


def ensure_importable() -> None:
    """Import autobasin from this checkout when it is not pip-installed."""
    try:
        import autobasin  # noqa: F401 - is it importable?
    except ImportError:
        sys.path.insert(0, str(HERE.parents[1]))


def first_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_spec(model, spec, inputs, row: dict, seeds, rtol: float, more_inputs=()) -> None:
    """Permute every group at random (one seed after another) and compare the
    outputs, on ``inputs`` and each of ``more_inputs``; sets ``row["status"]``:
    ``exact``, ``caught`` (a wrong spec the check stopped), or ``check-error``
    (the check could not judge: the model varies by itself, a tie was broken the
    other way, or something else failed), with ``err`` and ``message``."""
    from autobasin.permute import (EquivalenceError, NondeterministicModelError, TieBreakError,
                                   check_equivalence)
    from autobasin.spec import SpecError
    from autobasin.testing import randomize_state_
    errs: list[float] = []

    def run() -> None:
        for each in [inputs, *more_inputs]:
            for seed in seeds:
                errs.append(check_equivalence(model, spec, each, seed=seed, rtol=rtol))
    try:
        try:
            run()
        except TieBreakError as e:
            # a selection (top-k, argmax) picked among equal values: near their
            # initialisation some models compute one value at many positions. The
            # spec claims to hold for every value of the state_dict, so judge it on
            # weights drawn farther from the initialisation (once)
            row["check_note"] = f"re-checked on weights perturbed by 0.1 N(0, 1) after: {first_line(e, 200)}"
            errs.clear()
            randomize_state_(model, seed=1, scale=0.1)
            run()
        row.update(status="exact", err=max(errs))
    except (NondeterministicModelError, TieBreakError) as e:  # the check cannot judge
        row.update(status="check-error", message=first_line(e, 500))
    except (EquivalenceError, SpecError) as e:
        row.update(status="caught", message=first_line(e, 500), err=max(errs) if errs else None)
    except Exception as e:  # noqa: BLE001
        row.update(status="check-error", message=first_line(e, 500))


def work(result_path: str, threads: int, create: Callable[[dict], tuple],
         describe: Callable[[object, dict], None], seeds, rtol: float, limit: int = 300) -> None:
    """One model's run in a worker, its row saved to ``result_path`` after
    every phase (so the parent learns how far it got if the worker dies):
    ``create(row)`` builds ``(model, inputs)`` or ``(model, inputs, more_inputs)``
    (further input sets, inferred and checked on too) and may add to the row (its
    ``outputs`` are passed to inference); the spec is inferred and timed,
    ``describe(spec, row)`` records what the sweep reports of it, and the spec
    is checked (:func:`check_spec`). Error messages are cut to ``limit``."""
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, threads))
    ensure_importable()
    from autobasin.infer import infer_spec
    from autobasin.testing import randomize_state_

    row: dict = {"status": None, "phase": "create"}

    def save(phase: str | None = None):
        if phase is not None:
            row["phase"] = phase
        Path(result_path).write_text(json.dumps(row))

    save()
    t_start = time.perf_counter()
    try:
        model, inputs, *more = create(row)
        more = more[0] if more else ()
        randomize_state_(model)
    except Exception as e:  # noqa: BLE001
        row.update(status="create-error", message=first_line(e, limit))
        return save()
    row["params"] = sum(p.numel() for p in model.parameters())
    row["create_s"] = round(time.perf_counter() - t_start, 2)
    save("infer")
    t0 = time.perf_counter()
    try:
        spec = infer_spec(model, inputs, outputs=row.get("outputs"), more_inputs=more)
    except Exception as e:  # noqa: BLE001
        row.update(status="trace-error", message=first_line(e, limit),
                   infer_s=round(time.perf_counter() - t0, 2))
        return save()
    row["infer_s"] = round(time.perf_counter() - t0, 2)
    row["groups"] = len(spec.groups)
    row["coverage"] = spec.coverage()
    describe(spec, row)
    save("check")
    check_spec(model, spec, inputs, row, seeds, rtol, more)
    row["total_s"] = round(time.perf_counter() - t_start, 2)
    save("done")


def watch(pid: int, alive: Callable[[], bool], kill: Callable[[], None], timeout: float,
          mem_bytes: int) -> tuple[str | None, int]:
    """Wait for a worker process, killing it past ``timeout`` seconds or
    ``mem_bytes`` of resident memory (0: no limit). Returns why it was killed
    (``"timeout"``, ``"memory"`` or None) and its peak resident memory."""
    t0 = time.monotonic()
    peak = 0
    while alive():
        time.sleep(0.5)
        rss = rss_bytes(pid)
        peak = max(peak, rss)
        killed = "timeout" if time.monotonic() - t0 > timeout else \
            "memory" if mem_bytes and rss > mem_bytes else None
        if killed:
            kill()
            return killed, peak
    return None, peak


def finish_row(row: dict, res: dict, killed: str | None, timeout: float, mem_bytes: int,
               exit_code, log: str, wall: float, peak: int) -> dict:
    """Fill ``row`` from the worker's result ``res`` and how it ended."""
    row.update(res)
    row["wall_s"] = round(wall, 1)
    row["peak_rss_gb"] = round(peak / 2**30, 2)
    phase = res.get("phase", "start")
    if killed == "timeout":
        row["status"] = "timeout"
        row["message"] = f"no result after {timeout:.0f} s (in phase {phase})"
    elif killed == "memory":
        row["status"] = "crash"
        row["message"] = f"used more than {mem_bytes / 2**30:.1f} GiB of memory (in phase {phase})"
    elif not res.get("status"):
        tail = log.strip().splitlines()
        row["status"] = "crash"
        row["message"] = (f"worker exited with code {exit_code} in phase {phase}: "
                          + (tail[-1][:300] if tail else ""))
    row.pop("phase", None)
    return row
