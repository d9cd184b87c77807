"""Weight matching speed: autobasin vs its own floor vs the ``rebasin`` package.

For each timm model, A and B are two random initialisations (``torch.manual_seed``
0 and 1 before ``timm.create_model``), so they are independent networks. We
align B to A three ways, each in a fresh subprocess (so memory peaks do not
mix) with ``torch.set_num_threads(THREADS)``:

* ``autobasin``: ``weight_matching(infer_spec(A), A.state_dict(), B.state_dict(),
  init="greedy")``, one start (the default ``init="best"`` runs a second descent
  from the identity, timed in the objective table); its wall time, the descent sweeps it
  took (``result.sweeps``) and the greedy initialisation's share of the time;
* the *floor*: the same spec's pure work for one sweep -- for every group, the
  products ``A_m @ B_m^T`` of its members (rows pre-gathered, contiguous) and one
  ``scipy.optimize.linear_sum_assignment`` -- with nothing else, times the sweeps
  autobasin took (the greedy initialisation is not counted in the floor).
  Measured in the same process as autobasin, the two alternated twice, best
  of each, so that both see the same machine load;
* ``rebasin`` (snimu/rebasin from PyPI): ``PermutationCoordinateDescent(A, B',
  x)`` then ``.rebasin()``, where ``x`` is one random 224x224 image; its time is
  split into the constructor (tracing, the analogue of our ``infer_spec``) and
  ``rebasin()`` (the matching).

A second table compares the results by the paper's objective ``J = sum <A_T,
P(B_T)>`` over every floating parameter (buffers left out: they are not
weights), for both starts of autobasin's descent, the one it keeps (its
default), the greedy start with buffers matched too (``match_buffers=True``,
the default before buffers left the objective) and ``rebasin``. Each model is
run twice: with BatchNorm statistics at their initial values (mean 0, variance
1: the same in every channel, so they cannot sway a matching) and with
statistics gathered as training does (four batches of eight random images in
train mode, cumulative average), where they differ per channel.

Distances are ``||A - B||`` over every floating state_dict entry, before and
after alignment; each aligned B is checked to compute what B computes. Peak
memory is the growth of the process's peak resident set during the call:
freed memory is handed back first (``malloc_trim``), ``/proc/self/clear_refs``
resets ``VmHWM`` just before, and we report ``VmHWM`` after minus ``VmRSS``
before, against the two models' state size.

Usage::

    python benchmarks/weight_matching_speed.py [--models resnet18,resnet50,...]
        [--threads 2] [--out docs/] [--rebasin-timeout 1500]

Prints a markdown table and writes ``OUT/performance.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["resnet18", "resnet50", "vit_small_patch16_224", "convnext_tiny"]
SEEDS = (0, 1)


# ------------------------------------------------------------------ helpers
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakMemory:
    """Growth of the peak resident set over a ``with`` block, in bytes, from a
    baseline taken after freed memory went back to the system
    (:func:`autobasin.alloc.release_freed`). Without it, pages freed by earlier
    work (inference's recorded activations) stay resident and the block reuses
    them without growing the resident set: its growth then reads lower than
    what it needs."""

    def __enter__(self):
        import gc
        from autobasin.alloc import release_freed
        gc.collect()
        release_freed()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
        self.before = _proc_status()["VmRSS"]
        return self

    def __exit__(self, *exc):
        self.peak = _proc_status()["VmHWM"] - self.before
        return False


def repeats() -> int:
    """How many times a worker times its call, keeping the fastest (``BENCH_REPEATS``
    in the environment, default 1). The first run in a fresh process pays its cold
    start (first allocations, lazy imports); on a shared machine the fastest of a
    few is the steadiest figure, and each method gets the same treatment."""
    return max(1, int(os.environ.get("BENCH_REPEATS", "1")))


def _models(name: str):
    import timm
    import torch
    out = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        out.append(timm.create_model(name, pretrained=False).eval())
    return out


def _distance(sd_a, sd_b) -> float:
    total = 0.0
    for k, v in sd_a.items():
        if v.is_floating_point():
            total += float((v.double() - sd_b[k].double()).pow(2).sum())
    return total ** 0.5


def _state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _function_error(b, aligned) -> float:
    import torch
    from autobasin.permute import relative_error
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return relative_error(b(x), aligned(x))


# ------------------------------------------------------------------ workers
def floor_sweep(spec, sd_a, sd_b, solve=None) -> dict:
    """One sweep's products and assignments with nothing else around them.

    Every group's member rows are gathered (contiguous, float32) beforehand; the
    timed part is ``C = sum_m A_m @ B_m^T`` and one ``linear_sum_assignment(C)``
    (or ``solve(C)``) per group of size > 1.
    """
    import numpy as np  # noqa: F401  (scipy needs it; imported outside the timing)
    from scipy.optimize import linear_sum_assignment
    work = []
    for g in spec.groups.values():
        if g.size > 1 and g.members:
            work.append([(m.gather(sd_a[m.param].float()).contiguous(),
                          m.gather(sd_b[m.param].float()).contiguous()) for m in g.members])
    mm = lap = 0.0
    for mats in work:
        t0 = time.perf_counter()
        c = None
        for am, bm in mats:
            c = am @ bm.T if c is None else c.addmm_(am, bm.T)
        t1 = time.perf_counter()
        if solve is None:
            linear_sum_assignment(c.double().numpy(), maximize=True)
        else:
            solve(c)
        t2 = time.perf_counter()
        mm += t1 - t0
        lap += t2 - t1
    del work
    return dict(sweep_seconds=mm + lap, products_seconds=mm, lap_seconds=lap)


def work_autobasin(name: str, repeats: int = 2) -> dict:
    """weight_matching and its floor, alternated ``repeats`` times in one process (best of each)."""
    import copy
    from autobasin.infer import infer_spec
    from autobasin.match.weight import weight_matching
    from autobasin.permute import apply_permutation
    a, b = _models(name)
    t0 = time.perf_counter()
    spec = infer_spec(a)
    infer_s = time.perf_counter() - t0
    sd_a, sd_b = a.state_dict(), b.state_dict()
    best = None
    floors = []
    for i in range(repeats):
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            perms = weight_matching(spec, sd_a, sd_b, progress=False, init="greedy")
            seconds = time.perf_counter() - t0
        if best is None or seconds < best[0]:
            best = (seconds, perms.as_dict(), perms)
        if i == 0:  # later runs start with the floor's freed buffers in the allocator
            peak = mem.peak
        floors.append(floor_sweep(spec, sd_a, sd_b))
    seconds, stats, perms = best
    floor = min(floors, key=lambda f: f["sweep_seconds"])
    aligned_sd = apply_permutation(spec, perms, sd_b)
    aligned = copy.deepcopy(b)
    aligned.load_state_dict(aligned_sd)
    return dict(seconds=seconds, infer_seconds=infer_s, sweeps=stats["sweeps"],
                init_seconds=stats["init_seconds"], similarity_seconds=stats["similarity_seconds"],
                lap_seconds=stats["lap_seconds"], converged=stats["converged"],
                groups=len(spec.groups), coverage=spec.coverage(),
                floor_sweep_seconds=floor["sweep_seconds"], floor_products_seconds=floor["products_seconds"],
                floor_lap_seconds=floor["lap_seconds"],
                dist_before=_distance(sd_a, sd_b), dist_after=_distance(sd_a, aligned_sd),
                function_error=_function_error(b, aligned), peak_bytes=peak,
                models_bytes=_state_bytes(a) + _state_bytes(b),
                sweep_seconds=stats["sweep_seconds"],
                objectives=[stats["initial_objective"], *stats["objective_history"]])


def paper_objective(model_a, sd_a, sd_b) -> float:
    """``sum <A_T, B_T>`` over every floating parameter of ``model_a`` (no buffers)."""
    return sum(float((sd_a[k].double() * sd_b[k].double()).sum())
               for k, v in model_a.named_parameters() if v.is_floating_point())


def gather_statistics(model, seed: int, batches: int = 4, batch: int = 8) -> None:
    """BatchNorm running statistics as training leaves them: ``batches`` batches of
    random images in train mode, averaged (momentum None); per channel they differ."""
    import torch
    from torch import nn
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, 224, 224, generator=gen))
    model.eval()


def work_objective(name: str) -> dict:
    """The paper's objective after each start, and with buffers matched, with
    BatchNorm statistics at init and gathered from data."""
    from autobasin.infer import infer_spec
    from autobasin.match.weight import weight_matching
    from autobasin.permute import apply_permutation
    a, b = _models(name)
    spec = infer_spec(a)
    out = {}
    for setting in ("init", "data"):
        if setting == "data":
            gather_statistics(a, 0)
            gather_statistics(b, 1)
        sd_a, sd_b = a.state_dict(), b.state_dict()
        row = {"objective_before": paper_objective(a, sd_a, sd_b)}
        for label, kw in (("greedy", dict(init="greedy")), ("identity", dict(init="identity")),
                          ("buffers", dict(init="greedy", match_buffers=True))):
            t0 = time.perf_counter()
            perms = weight_matching(spec, sd_a, sd_b, progress=False, **kw)
            seconds = time.perf_counter() - t0
            aligned = apply_permutation(spec, perms, sd_b)
            row[label] = dict(objective=paper_objective(a, sd_a, aligned), seconds=seconds,
                              distance=_distance(sd_a, aligned))
        out[setting] = row
    return out


def distance_curve(ours: dict) -> list[tuple[float, float]]:
    """(seconds into weight_matching, ||A - P(B)||) after the initialisation and
    after each sweep. Permutations keep ||B||, so ``d^2 = d_final^2 + 2 (J_final - J)``
    for the objective ``J = <A, P(B)>``."""
    objs, final = ours["objectives"], ours["dist_after"] ** 2
    return [(t, max(final + 2 * (objs[-1] - j), 0.0) ** 0.5)
            for t, j in zip(ours["sweep_seconds"], objs)]


def time_to_distance(ours: dict, target: float) -> float | None:
    """Seconds until autobasin's distance is at most ``target`` (None: never)."""
    return next((t for t, d in distance_curve(ours) if d <= target * (1 + 1e-9)), None)


def work_rebasin(name: str) -> dict:
    import copy
    import torch
    import rebasin
    a, b = _models(name)
    sd_a = a.state_dict()
    dist_before = _distance(sd_a, b.state_dict())
    runs = []
    for _ in range(repeats()):  # the fastest run counts (see repeats)
        aligned = copy.deepcopy(b)
        torch.manual_seed(0)  # rebasin draws its group order from the global RNG
        x = torch.randn(1, 3, 224, 224)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            pcd = rebasin.PermutationCoordinateDescent(a, aligned, x)
            t1 = time.perf_counter()
            pcd.rebasin()
            t2 = time.perf_counter()
        runs.append((t2 - t0, t1 - t0, t2 - t1))
    t_all, t_init, t_run = min(runs)
    return dict(init_seconds=t_init, rebasin_seconds=t_run, seconds=t_all,
                seconds_all=[r[0] for r in runs],
                objective=paper_objective(a, sd_a, aligned.state_dict()),
                dist_before=dist_before, dist_after=_distance(sd_a, aligned.state_dict()),
                function_error=_function_error(b, aligned), peak_bytes=mem.peak)


WORKERS = {"autobasin": work_autobasin, "rebasin": work_rebasin, "objective": work_objective}


def _worker_main(method: str, name: str, threads: int, workers: dict | None = None) -> None:
    """Run ``workers[method](name)`` (this script's WORKERS by default) and print its
    result as one ``RESULT`` JSON line for :func:`run_worker`; errors are reported."""
    import warnings
    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    try:
        load = os.getloadavg()[0]
        result = {"ok": True, **(workers or WORKERS)[method](name)}
        result["load"] = (load, os.getloadavg()[0])
    except Exception as e:  # report, never crash the table
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print("RESULT " + json.dumps(result))


def run_worker(method: str, name: str, threads: int, timeout: float, script: str = __file__) -> dict:
    """``script --worker METHOD NAME`` in a fresh process; its RESULT line, or the error."""
    cmd = [sys.executable, script, "--worker", method, name, "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:200]}"}


# ------------------------------------------------------------------ report
def _mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    parts = [f"python {platform.python_version()}"]
    for pkg in ("autobasin", "torch", "timm", "scipy", "rebasin"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(rows: list[dict]) -> str:
    head = ("| model | params (M) | autobasin s (init s) | sweeps | floor s | autobasin / floor "
            "| rebasin s (trace + match) | speed-up, match only | speed-up, end to end "
            "| autobasin s to rebasin's ‖A−B‖ | speed-up at equal ‖A−B‖ "
            "| ‖A−B‖ before | after: autobasin | after: rebasin | peak MB: autobasin / rebasin "
            "| two models MB | peak / models |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ours, rb = r["autobasin"], r["rebasin"]
        if not ours.get("ok"):
            lines.append(f"| {r['model']} | | autobasin failed: {ours.get('error')} |" + " |" * 14)
            continue
        floor_s = ours["floor_sweep_seconds"] * ours["sweeps"]
        if rb.get("ok"):
            rb_s = f"{rb['seconds']:.1f} ({rb['init_seconds']:.1f} + {rb['rebasin_seconds']:.1f})"
            sp_match = f"{rb['rebasin_seconds'] / ours['seconds']:.1f}×"
            sp_all = f"{rb['seconds'] / (ours['seconds'] + ours['infer_seconds']):.1f}×"
            rb_after = f"{rb['dist_after']:.2f}"
            rb_mem = _mb(rb["peak_bytes"])
            reach = time_to_distance(ours, rb["dist_after"])
            reach_s = f"{reach:.2f}" if reach is not None else "never"
            sp_equal = f"{rb['rebasin_seconds'] / reach:.1f}×" if reach else "–"
        else:
            rb_s = f"failed: {rb.get('error')}"
            sp_match = sp_all = rb_after = rb_mem = reach_s = sp_equal = "–"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {ours['seconds']:.2f} ({ours['init_seconds']:.2f}) "
            f"| {ours['sweeps']} | {floor_s:.2f} | {ours['seconds'] / floor_s:.2f} | {rb_s} "
            f"| {sp_match} | {sp_all} | {reach_s} | {sp_equal} | {ours['dist_before']:.2f} | {ours['dist_after']:.2f} "
            f"| {rb_after} | {_mb(ours['peak_bytes'])} / {rb_mem} | {_mb(ours['models_bytes'])} "
            f"| {ours['peak_bytes'] / ours['models_bytes']:.2f} |")
    return "\n".join(lines)


def objective_table(rows: list[dict]) -> str:
    head = ("| model | BN statistics | J before | J: greedy start | J: identity start "
            "| J: kept (default) | J: buffers matched | buffers matched vs kept "
            "| J: rebasin | ‖A−B‖ after: kept | s: greedy + identity |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        res = r.get("objective", {})
        if not res.get("ok"):
            lines.append(f"| {r['model']} | | failed: {res.get('error')} |" + " |" * 8)
            continue
        for setting, label in (("init", "at init"), ("data", "from data")):
            row = res[setting]
            g, i, buf = row["greedy"], row["identity"], row["buffers"]
            kept = g if g["objective"] >= i["objective"] else i
            which = "greedy" if kept is g else "identity"
            rb = r["rebasin"]
            rb_j = f"{rb['objective']:.1f}" if setting == "init" and rb.get("ok") else "–"
            gap = 100 * (buf["objective"] - kept["objective"]) / abs(kept["objective"])
            lines.append(
                f"| {r['model']} | {label} | {row['objective_before']:.1f} | {g['objective']:.1f} "
                f"| {i['objective']:.1f} | {kept['objective']:.1f} ({which}) | {buf['objective']:.1f} "
                f"| {gap:+.2f}% | {rb_j} | {kept['distance']:.2f} "
                f"| {g['seconds']:.2f} + {i['seconds']:.2f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """Yes/NO lines for the targets: resnet50 at least 5x faster than rebasin with
    at least its distance reduction, within 2x of the floor, and every model's
    peak memory under 3x the two models' size."""
    lines = []
    for r in rows:
        ours, rb = r["autobasin"], r["rebasin"]
        if not ours.get("ok"):
            lines.append(f"- {r['model']}: autobasin failed, no target can be met")
            continue
        ratio = ours["seconds"] / (ours["floor_sweep_seconds"] * ours["sweeps"])
        mem = ours["peak_bytes"] / ours["models_bytes"]
        line = (f"- {r['model']}: within 2x of the floor: {'yes' if ratio <= 2 else 'NO'} "
                f"({ratio:.2f}x); peak memory under 3x the two models: "
                f"{'yes' if mem < 3 else 'NO'} ({mem:.2f}x)")
        if rb.get("ok"):
            full = rb["rebasin_seconds"] / ours["seconds"]
            reach = time_to_distance(ours, rb["dist_after"])
            equal = rb["rebasin_seconds"] / reach if reach else 0.0
            closer = ours["dist_after"] <= rb["dist_after"]
            line += (f"; at least rebasin's distance reduction: {'yes' if closer else 'NO'}; "
                     f"5x faster than rebasin, run to convergence: {'yes' if full >= 5 else 'NO'} "
                     f"({full:.1f}x); to rebasin's distance: {'yes' if equal >= 5 else 'NO'} "
                     f"({equal:.1f}x)")
        lines.append(line)
    return lines


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="folder to write performance.md into")
    p.add_argument("--no-rebasin", action="store_true")
    p.add_argument("--rebasin-timeout", type=float, default=1500.0)
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker_main(args.worker[0], args.worker[1], args.threads)
        return []

    import timm
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in args.models.split(","):
        params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        row = {"model": name, "params": params}
        row["autobasin"] = run_worker("autobasin", name, args.threads, 3600)
        row["rebasin"] = ({"ok": False, "error": "not run (--no-rebasin)"} if args.no_rebasin else
                          run_worker("rebasin", name, args.threads, args.rebasin_timeout))
        row["objective"] = run_worker("objective", name, args.threads, 3600)
        rows.append(row)
        print(f"{name}: " + json.dumps({k: row[k] for k in ("autobasin", "rebasin", "objective")}),
              file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    md = table(rows)
    notes = []
    for r in rows:
        for method in ("autobasin", "rebasin"):
            res = r[method]
            if res.get("ok") and not res["function_error"] <= 1e-4:
                notes.append(f"- {r['model']}: {method}'s aligned B computes something else "
                             f"(relative output error {res['function_error']:.2g}).")
            if not res.get("ok"):
                notes.append(f"- {r['model']}: {method} failed: {res.get('error')}")
    command = "python " + " ".join(shlex.quote(a) for a in
                                   ["benchmarks/weight_matching_speed.py", *(argv or sys.argv[1:])])
    load = (f"load average (1/5/15 min) {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f} "
            f"at the start, {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at the end")
    checks = targets(rows)
    objectives = objective_table(rows)
    print(md)
    print(objectives)
    print("\n".join(checks))
    print(load)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = f"""# Weight matching speed

Two independent random initialisations (seeds 0 and 1) of each timm model; B is
aligned to A by autobasin's `weight_matching` (default greedy initialisation,
then permutation coordinate descent) and by the `rebasin` package's
`PermutationCoordinateDescent` (snimu/rebasin, from PyPI).

{md}

Targets (2-core CPU):

{chr(10).join(checks)}

## The objective

The paper's objective `J = Σ ⟨A_T, P(B_T)⟩` over every floating parameter
(higher is better; `J before` is at the identity) after descent from each start,
the one `weight_matching` keeps by default (`init="best"`: the higher), the
greedy start with buffers matched too (`match_buffers=True`), and rebasin's
result. BN statistics *at init* are equal across channels; *from data* they
were gathered by four batches of eight random images in train mode.

{objectives}

Columns:

- **autobasin s (init s)**: wall time of `weight_matching` (the spec is
  inferred beforehand and not counted; inference took
  {", ".join(f"{r['model']} {r['autobasin']['infer_seconds']:.1f} s" for r in rows if r['autobasin'].get('ok'))});
  in brackets the greedy initialisation's share.
- **sweeps**: coordinate-descent sweeps after the initialisation (the last one
  finds nothing to improve).
- **floor s**: one sweep's pure work -- every group's products `A_m @ B_m^T` on
  pre-gathered contiguous rows plus one `linear_sum_assignment` -- times the
  sweeps taken. The greedy initialisation is extra work the floor leaves out;
  groups whose inputs did not change are skipped by autobasin but counted in the floor.
- **rebasin s**: its constructor (tracing the model with torchview, the analogue
  of our spec inference) plus `rebasin()` (the matching). *Speed-up, match
  only* is `rebasin()` over `weight_matching`; *end to end* is rebasin's total
  over `infer_spec` + `weight_matching`.
- **autobasin s to rebasin's ‖A−B‖**: the time into `weight_matching` at the
  end of the first stage (the greedy initialisation, then each sweep) whose
  distance is at most rebasin's final distance; descent goes on from there
  until a sweep improves nothing. *Speed-up at equal ‖A−B‖* is `rebasin()`
  over that time. `weight_matching(..., tol=1e-4)` stops once a sweep gains
  less than that share of the objective.
- **‖A−B‖**: L2 distance over every floating state_dict entry, before and after
  alignment (autobasin's and rebasin's B' both compute what B computes{"" if not notes else ", except as noted below"}).
- **peak MB**: growth of the process's peak resident set (`VmHWM` after the
  call, reset through `/proc/self/clear_refs` just before, minus `VmRSS`
  before, freed memory handed back with `malloc_trim` first), each method in
  its own fresh process; **two models MB** is the
  state_dict size of A and B together.
{chr(10).join(notes)}

Command: `{command}`

Machine: {_cpu()}, {os.cpu_count()} cores, CPU only, `torch.set_num_threads({args.threads})`;
{load} (other jobs may have shared the machine; timings taken under load
are pessimistic for every column alike). Run {started}.

Versions: {_versions()}.
"""
        (out / "performance.md").write_text(text)
        print(f"wrote {out / 'performance.md'}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
