"""Scale: speed against a floor and the peer, memory, a memory cap, and a distributed run.

Four parts, each in fresh subprocesses with ``torch.set_num_threads(THREADS)``
(models are two random initialisations of a timm architecture, seeds 0 and 1):

* ``speed``: ``auto_rebasin(a, b, x)`` with weight matching end to end (spec
  inference, matching to convergence, applying, verification), with the greedy
  start alone and with the default (greedy, then identity, keep the higher);
  against the *floor* (every group's full products ``A_m @ B_m^T`` on
  pre-gathered rows plus one assignment, with the fastest solver installed,
  times the sweeps taken) and against ``rebasin`` (snimu/rebasin from PyPI:
  ``PermutationCoordinateDescent`` constructor, its tracing, plus ``rebasin()``),
  which handles ResNets but not the timm ViT / ConvNeXt norms. Objective: the
  paper's ``sum <A_T, P(B_T)>`` over parameters.
* ``memory``: the growth of the peak resident set during ``weight_matching``
  (``VmHWM`` reset through ``/proc/self/clear_refs``, after freed memory is
  handed back with ``malloc_trim``), against the two models'
  state size.
* ``lowmem``: ``autobasin align --low-memory`` and ``merge --low-memory`` on two checkpoints of a model
  whose two copies exceed a memory cap set on the process: a cgroup (v1
  ``memory.limit_in_bytes``, or v2 ``memory.max``) the benchmark creates and
  moves the child into before it starts; the kernel OOM-kills the process if
  its memory (anonymous plus the file pages it holds, which it reclaims first)
  exceeds the cap. The same commands without ``--low-memory`` run under the
  same cap for comparison. Needs permission to create cgroups (root here);
  elsewhere ``systemd-run --scope -p MemoryMax=...`` sets the same cap.
* ``distributed``: ``autobasin align --method activation --data digits`` in one
  process and under ``torchrun --nproc-per-node 2`` (gloo), on a file-factory
  MLP: the same permutations, and the wall times.

Usage::

    python benchmarks/scale.py [--parts speed,memory,lowmem,distributed] [--out docs/]
        [--models resnet50,vit_base_patch16_224,convnext_base] [--cap-gb 1.8]

Prints the tables and writes ``OUT/scale.md`` (and ``OUT/scale.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import weight_matching_speed as wms  # noqa: E402  (its workers: models, floor, rebasin, memory)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet50", "vit_base_patch16_224", "convnext_base"]
PEER = {"resnet50"}  # rebasin cannot trace timm's ViT and ConvNeXt norms (KeyError on LayerNorm)
MEMORY_MODELS = ["resnet50", "convnext_tiny"]
LOWMEM_MODEL = "vit_large_patch16_224"


# ------------------------------------------------------------------ workers
def work_speed(name: str) -> dict:
    import torch
    from autobasin import auto_rebasin
    from autobasin.match import lap
    a, b = wms._models(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    sd_a = a.state_dict()
    out = {"solver": lap.current_solver()}
    for init in ("greedy", "best"):
        times = []
        for _ in range(wms.repeats()):  # the fastest run counts (the results are equal)
            t0 = time.perf_counter()
            run = auto_rebasin(a, b, x, progress=False, init=init)
            times.append(time.perf_counter() - t0)
            if times[-1] == min(times):
                r = run
        seconds = min(times)
        m = r.matching
        out[init] = dict(seconds=seconds, seconds_all=times, match_seconds=m.seconds, sweeps=m.sweeps,
                         lap_seconds=m.lap_seconds, similarity_seconds=m.similarity_seconds,
                         init_seconds=m.init_seconds, verify_error=r.verify_error,
                         objective=wms.paper_objective(a, sd_a, r.state_dict),
                         distance=wms._distance(sd_a, r.state_dict))
        spec = r.spec
    out["objective_before"] = wms.paper_objective(a, sd_a, b.state_dict())
    out["distance_before"] = wms._distance(sd_a, b.state_dict())
    floors = {}
    for solver in lap.available_solvers():
        lap.set_solver(solver)
        floors[solver] = min((wms.floor_sweep(spec, sd_a, b.state_dict(), solve=lap.solve_lap)
                              for _ in range(2)), key=lambda f: f["sweep_seconds"])
    lap.set_solver(None)
    out["floors"] = floors
    return out


def work_memory(name: str) -> dict:
    import gc
    from autobasin.infer import infer_spec
    from autobasin.match.weight import weight_matching
    a, b = wms._models(name)
    spec = infer_spec(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    models = wms._state_bytes(a) + wms._state_bytes(b)
    out = {"models_bytes": models}
    for init in ("greedy", "best"):
        gc.collect()
        with wms.PeakMemory() as mem:
            weight_matching(spec, sd_a, sd_b, progress=False, init=init)
        out[init] = mem.peak
    return out


WORKERS = {"speed": work_speed, "memory": work_memory, "rebasin": wms.work_rebasin}


def run_worker(kind: str, name: str, threads: int, timeout: float) -> dict:
    return wms.run_worker(kind, name, threads, timeout, script=__file__)


# ------------------------------------------------------------------ memory cap
class Cgroup:
    """A memory cgroup with a limit, created for one child process, or None when the
    machine does not let us (no cgroup file system, or no permission)."""

    def __init__(self, limit: int):
        self.limit, self.path, self.version = limit, None, None
        name = f"autobasin-scale-{os.getpid()}-{time.monotonic_ns()}"
        for version, base, limit_file in ((1, Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                                          (2, Path("/sys/fs/cgroup"), "memory.max")):
            if version == 2 and not (base / "cgroup.controllers").exists():
                continue
            try:
                path = base / name
                path.mkdir()
                (path / limit_file).write_text(str(limit))
                if version == 1 and (path / "memory.memsw.limit_in_bytes").exists():
                    try:
                        (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
                    except OSError:
                        pass
                self.path, self.version = path, version
                return
            except OSError:
                try:
                    path.rmdir()
                except OSError:
                    pass

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        for f in ("memory.max_usage_in_bytes", "memory.peak"):
            if (self.path / f).exists():
                return int((self.path / f).read_text())
        return None

    def anonymous(self) -> int:
        """Current anonymous memory (not file pages, which the kernel can drop)."""
        text = (self.path / "memory.stat").read_text()
        key = "rss" if self.version == 1 else "anon"
        return next(int(line.split()[1]) for line in text.splitlines() if line.split()[0] == key)

    def oom_kills(self) -> int:
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        for line in f.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_capped(cmd: list[str], limit: int, timeout: float) -> dict:
    group = Cgroup(limit)
    if group.path is None:
        return {"ok": False, "error": "no memory cgroup could be created here (needs permission)"}
    import threading
    anon, done = [0], threading.Event()

    def sample() -> None:  # the anonymous peak, every 50 ms
        while not done.wait(0.05):
            try:
                anon[0] = max(anon[0], group.anonymous())
            except (OSError, StopIteration):
                pass
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=group.enter, cwd=ROOT)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        code, out, err = None, "", f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    result = {"ok": code == 0, "returncode": code, "seconds": seconds, "peak_bytes": group.peak(),
              "anonymous_peak_bytes": anon[0],
              "oom_kills": group.oom_kills(), "limit_bytes": limit, "cgroup": f"v{group.version}",
              "stdout_tail": out.strip().splitlines()[-6:], "stderr_tail": err.strip().splitlines()[-2:]}
    group.remove()
    return result


def _drop_from_page_cache(path: Path) -> None:
    """Written, synced and dropped from the file cache: the capped process reads the
    pages itself, so they are charged to its cgroup (a page is charged to the group
    that first brings it in), and the cap has to make room for them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def part_lowmem(cap_gb: float, threads: int) -> dict:
    import torch
    from safetensors.torch import save_file
    import timm
    tmp = Path(tempfile.mkdtemp(prefix="autobasin-lowmem-"))
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = timm.create_model(LOWMEM_MODEL, pretrained=False)
        path = tmp / f"{'ab'[seed]}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
        _drop_from_page_cache(path)
        files.append(path)
        size = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        del m
    limit = int(cap_gb * 2**30)
    base = [sys.executable, "-m", "autobasin", "align", f"timm:{LOWMEM_MODEL}", "--a", str(files[0]),
            "--b", str(files[1]), "--input-size", "3", "224", "224", "-q", "--threads", str(threads)]
    out = {"model": LOWMEM_MODEL, "model_bytes": size, "limit_bytes": limit}
    out["low_memory"] = run_capped(base + ["--out", str(tmp / "lean.safetensors"), "--low-memory"],
                                   limit, 3600)
    out["in_memory"] = run_capped(base + ["--out", str(tmp / "full.safetensors")], limit, 3600)
    merge = [sys.executable, "-m", "autobasin", "merge", f"timm:{LOWMEM_MODEL}", str(files[0]),
             str(files[1]), "--input-size", "3", "224", "224", "-q", "--threads", str(threads)]
    out["merge_low_memory"] = run_capped(merge + ["--out", str(tmp / "merged.safetensors"),
                                                  "--low-memory"], limit, 3600)
    out["merge_in_memory"] = run_capped(merge + ["--out", str(tmp / "merged_full.safetensors")],
                                        limit, 3600)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return out


# ------------------------------------------------------------------ distributed
MLP_SOURCE = '''
from torch import nn
def mlp(hidden=1024):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
'''


def part_distributed(threads: int) -> dict:
    import torch
    tmp = Path(tempfile.mkdtemp(prefix="autobasin-dist-"))
    (tmp / "models.py").write_text(MLP_SOURCE)
    from autobasin.models import build_model
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(build_model(f"{tmp / 'models.py'}:mlp").state_dict(), tmp / f"{seed}.pt")
    common = ["-m", "autobasin", "align", f"{tmp / 'models.py'}:mlp", "--a", str(tmp / "0.pt"),
              "--b", str(tmp / "1.pt"), "--method", "activation", "--data", "digits", "-q",
              "--threads", str(threads)]
    out = {}
    for label, launcher in (("one process", []),
                            ("torchrun, 2 ranks (gloo)", ["-m", "torch.distributed.run", "--standalone",
                                                          "--nproc-per-node", "2"])):
        dest = tmp / f"{len(launcher)}.safetensors"
        cmd = [sys.executable, *launcher, *common, "--out", str(dest)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        out[label] = {"ok": proc.returncode == 0, "seconds": time.perf_counter() - t0,
                      "error": proc.stderr.strip().splitlines()[-1:] if proc.returncode else None}
    from autobasin.io import load_perms
    try:
        a, b = (load_perms(tmp / f"{n}.perms.safetensors") for n in (0, 5))
        out["same_permutations"] = set(a) == set(b) and all(torch.equal(a[g], b[g]) for g in a)
        out["units_differing"] = {g: int((a[g] != b[g]).sum()) for g in a}
        out["only_constant_units_differ"] = _only_ties(tmp, a, b)
    except Exception as e:  # noqa: BLE001 - reported in the table
        out["same_permutations"] = f"not compared: {e}"
    return out


def _only_ties(tmp: Path, a: dict, b: dict) -> bool:
    """Whether every unit the two runs pair differently is constant on the matching
    data in A (a dead ReLU): its correlations are all zero, so any pairing among
    such units is optimal, and which one a solver picks follows rounding elsewhere."""
    import torch
    from autobasin.data import resolve_data
    from autobasin.io import load_into, load_state_dict
    from autobasin.models import build_model
    model = load_into(build_model(f"{tmp / 'models.py'}:mlp"), load_state_dict(tmp / "0.pt")).eval()
    seen: dict[str, list] = {}
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(o))
             for n, m in relus]
    with torch.no_grad():
        for x, _ in resolve_data("digits", model, split="train").train:
            model(x)
    for h in hooks:
        h.remove()
    # the groups are named after the Linear before each ReLU: "1:out" -> ReLU "2"
    for g in a:
        relu = str(int(g.split(":")[0]) + 1)
        constant = torch.cat(seen[relu]).std(0).le(0)
        if bool((~constant[(a[g] != b[g]).nonzero().flatten()]).any()):
            return False
    return True


# ------------------------------------------------------------------ report
def _gb(x) -> str:
    return f"{x / 2**30:.2f}"


def _floor(s: dict, g: dict) -> tuple[str, float]:
    """The fastest solver's floor sweep times the greedy run's sweeps."""
    solver = min(s["floors"], key=lambda k: s["floors"][k]["sweep_seconds"])
    return solver, s["floors"][solver]["sweep_seconds"] * g["sweeps"]


def speed_table(rows: dict) -> str:
    head = ("| model | autobasin s: greedy start (match s, sweeps) | default: both starts | "
            "floor s (solver) | greedy / floor | rebasin s | speed-up vs rebasin: greedy / default "
            "| J before | J: greedy | J: default | J: rebasin | verified |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        s, rb = r["speed"], r.get("rebasin", {"ok": False, "error": "not run"})
        if not s.get("ok"):
            lines.append(f"| {name} | failed: {s.get('error')} |" + " |" * 10)
            continue
        g, d = s["greedy"], s["best"]
        solver, floor = _floor(s, g)
        if rb.get("ok"):
            rb_s, rb_j = f"{rb['seconds']:.1f}", f"{rb['objective']:.1f}"
            sp = f"{rb['seconds'] / g['seconds']:.1f}× / {rb['seconds'] / d['seconds']:.1f}×"
        else:
            rb_s, rb_j, sp = f"– ({rb.get('error')})", "–", "–"
            if name not in PEER:
                rb_s = "– (fails on timm's LayerNorm: docs/performance.md)"
        lines.append(
            f"| {name} | {g['seconds']:.2f} ({g['match_seconds']:.2f}, {g['sweeps']}) "
            f"| {d['seconds']:.2f} ({d['match_seconds']:.2f}) | {floor:.2f} ({solver}) "
            f"| {g['match_seconds'] / floor:.2f} | {rb_s} | {sp} | {s['objective_before']:.1f} "
            f"| {g['objective']:.1f} | {d['objective']:.1f} | {rb_j} "
            f"| {max(g['verify_error'], d['verify_error']):.1e} |")
    return "\n".join(lines)


def floor_table(rows: dict) -> str:
    head = "| model | solver | one sweep s | of which products | of which assignments |"
    lines = [head, "|---|---|---|---|---|"]
    for name, r in rows.items():
        for solver, f in r["speed"].get("floors", {}).items():
            lines.append(f"| {name} | {solver} | {f['sweep_seconds']:.3f} | {f['products_seconds']:.3f} "
                         f"| {f['lap_seconds']:.3f} |")
    return "\n".join(lines)


def memory_table(rows: dict) -> str:
    head = "| model | two models MB | extra peak MB: greedy start | default | peak / models: greedy | default |"
    lines = [head, "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed: {r.get('error')} | | | | |")
            continue
        m = r["models_bytes"]
        lines.append(f"| {name} | {m / 2**20:.0f} | {r['greedy'] / 2**20:.0f} | {r['best'] / 2**20:.0f} "
                     f"| {r['greedy'] / m:.2f} | {r['best'] / m:.2f} |")
    return "\n".join(lines)


def lowmem_table(r: dict) -> str:
    head = ("| command | exit | peak GiB, all charged (cap) | of which anonymous, peak | OOM kills "
            "| s | last line |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for label, key in (("align --low-memory", "low_memory"), ("align (in memory)", "in_memory"),
                       ("merge --low-memory", "merge_low_memory"), ("merge (in memory)", "merge_in_memory")):
        x = r.get(key, {"error": "not run"})
        if "peak_bytes" not in x:
            lines.append(f"| {label} | – | – | – | – | – | {x.get('error')} |")
            continue
        last = (x["stdout_tail"][-1:] or x["stderr_tail"][-1:] or [""])[0].replace("|", "/")[:90]
        lines.append(f"| {label} | {x['returncode']} | {_gb(x['peak_bytes'] or 0)} ({_gb(x['limit_bytes'])}) "
                     f"| {_gb(x['anonymous_peak_bytes'])} | {x['oom_kills']} | {x['seconds']:.0f} | {last} |")
    return "\n".join(lines)


def dist_table(r: dict) -> str:
    lines = ["| run | ok | s |", "|---|---|---|"]
    for label, x in r.items():
        if isinstance(x, dict) and "ok" in x:
            lines.append(f"| {label} | {'yes' if x['ok'] else x['error']} | {x['seconds']:.1f} |")
    differ = {g: k for g, k in (r.get("units_differing") or {}).items() if k}
    if r.get("same_permutations") is True:
        verdict = "the same permutations from both."
    elif differ and r.get("only_constant_units_differ") is True:
        verdict = (f"the same permutations on every unit that varies on the data; "
                   f"{sum(differ.values())} units constant on it in A (dead ReLUs, in "
                   f"{', '.join(differ)}) are paired differently: all their correlations are 0, "
                   f"so every pairing of them is optimal, and which one the solver returns "
                   f"follows the last bits of the summed moments.")
    else:
        verdict = f"DIFFERENT permutations: {r.get('units_differing')} ({r.get('same_permutations')})."
    return "\n".join(lines) + "\n\n`align --method activation --data digits`, MLP 64-1024x3-10: " + verdict


def targets(speed: dict, memory: dict, lowmem: dict | None) -> list[str]:
    out = []
    for name, r in speed.items():
        s, rb = r["speed"], r.get("rebasin", {})
        if not s.get("ok"):
            continue
        g, d = s["greedy"], s["best"]
        solver, floor = _floor(s, g)
        line = f"- {name}: matching within 1.5× of the floor: {'yes' if g['match_seconds'] <= 1.5 * floor else 'NO'} ({g['match_seconds'] / floor:.2f}×)"
        if rb.get("ok"):
            for label, run in (("greedy start", g), ("default", d)):
                fast = rb["seconds"] / run["seconds"]
                better = run["objective"] >= rb["objective"]
                line += (f"; ≥ 5× rebasin end to end ({label}): {'yes' if fast >= 5 else 'NO'} "
                         f"({fast:.1f}×, objective {'≥' if better else '<'} rebasin's)")
        out.append(line)
    for name, r in memory.items():
        if r.get("ok"):
            worst = max(r["greedy"], r["best"]) / r["models_bytes"]
            out.append(f"- {name}: extra peak memory ≤ 0.5× the two models: "
                       f"{'yes' if worst <= 0.5 else 'NO'} ({worst:.2f}×)")
    if lowmem:
        two = 2 * lowmem["model_bytes"]
        for command in ("align", "merge"):
            prefix = "" if command == "align" else "merge_"
            if prefix + "low_memory" not in lowmem:
                continue
            lean, full = lowmem[prefix + "low_memory"], lowmem.get(prefix + "in_memory", {})
            out.append(f"- {lowmem['model']}: two copies {_gb(two)} GiB > cap "
                       f"{_gb(lowmem['limit_bytes'])} GiB; {command} --low-memory under the cap: "
                       f"{'yes' if lean.get('ok') else 'NO'}; in-memory {command} under the cap: "
                       f"{'completes' if full.get('ok') else 'fails'} (exit {full.get('returncode')}, "
                       f"OOM kills {full.get('oom_kills')})")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="speed,memory,lowmem,distributed")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--memory-models", default=",".join(MEMORY_MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap-gb", type=float, default=1.8,
                   help=f"memory cap in GiB for the lowmem part (two {LOWMEM_MODEL} are 2.27 GiB)")
    p.add_argument("--out", default=None, help="folder to write scale.md and scale.json into")
    p.add_argument("--rebasin-timeout", type=float, default=1500.0)
    p.add_argument("--repeats", type=int, default=3,
                   help="speed: time each end-to-end run this often in its process, keep the "
                        "fastest (autobasin and rebasin alike; default 3)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        wms._worker_main(args.worker[0], args.worker[1], args.threads, WORKERS)
        return {}
    parts = set(args.parts.split(",")) - {"", "none"}  # none: re-render the page from OUT/scale.json
    load_start, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M")
    res: dict = {"speed": {}, "memory": {}, "lowmem": None, "distributed": None, "runs": {}}
    previous = Path(args.out) / "scale.json" if args.out else None
    if previous is not None and previous.is_file():  # parts not run now keep their last results
        old = json.loads(previous.read_text())
        res.update({k: v for k, v in old.items() if k not in parts})
        res["runs"] = {k: v for k, v in old.get("runs", {}).items() if k not in parts}
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/scale.py", *(argv or sys.argv[1:])])
    if "speed" in parts:
        os.environ["BENCH_REPEATS"] = str(args.repeats)  # read by the workers
        res["speed"] = {}
        for name in args.models.split(","):
            row = {"speed": run_worker("speed", name, args.threads, 3600)}
            if name in PEER:
                row["rebasin"] = run_worker("rebasin", name, args.threads, args.rebasin_timeout)
            res["speed"][name] = row
            print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    if "memory" in parts:
        res["memory"] = {name: run_worker("memory", name, args.threads, 3600)
                         for name in args.memory_models.split(",")}
    if "lowmem" in parts:
        res["lowmem"] = part_lowmem(args.cap_gb, args.threads)
    if "distributed" in parts:
        res["distributed"] = part_distributed(args.threads)
    load_end = os.getloadavg()
    for part in parts:
        res["runs"][part] = {"command": command, "started": started,
                             "load": [round(x, 2) for x in (*load_start, *load_end)]}
    checks = targets(res["speed"], res["memory"], res["lowmem"])
    sections = []
    if res["speed"]:
        sections.append("## Speed\n\n" + speed_table(res["speed"]) + "\n\nThe floor per sweep:\n\n"
                        + floor_table(res["speed"]))
    if res["memory"]:
        sections.append("## Memory\n\n" + memory_table(res["memory"]))
    if res["lowmem"]:
        sections.append(f"## Two checkpoints larger than the memory cap\n\n{LOWMEM_MODEL}: "
                        f"{_gb(res['lowmem']['model_bytes'])} GiB a checkpoint, cap "
                        f"{_gb(res['lowmem']['limit_bytes'])} GiB on the whole process (interpreter and "
                        f"libraries included).\n\n" + lowmem_table(res["lowmem"]))
    if res["distributed"]:
        sections.append("## Distributed statistics\n\n" + dist_table(res["distributed"]))
    body = "\n\n".join(sections)
    used = ", ".join(sorted({r["speed"]["solver"] for r in res["speed"].values()
                             if r.get("speed", {}).get("ok")})) or "–"
    speed_repeats = max((len(r["speed"].get("greedy", {}).get("seconds_all", [0]))
                         for r in res["speed"].values() if r.get("speed", {}).get("ok")), default=1)
    runs = "\n".join(
        f"- {part}: `{r['command']}`, run {r['started']}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in r['load'][:3])} at the start, "
        f"{'/'.join(f'{x:.2f}' for x in r['load'][3:])} at the end"
        for part, r in sorted(res["runs"].items()))
    print(body)
    print("\n".join(checks))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(res, indent=1))
        text = f"""# Scale

Written by `benchmarks/scale.py` (its docstring has the method); nothing here is edited by hand.

Targets:

{chr(10).join(checks)}

{body}

Columns. *autobasin s*: `auto_rebasin(a, b, x, init=...)` end to end (spec inference, weight
matching to convergence, applying the permutations, verification); *match s*: matching alone.
*greedy start*: `init="greedy"`; *default*: `init="best"` (a second descent from the identity,
the higher objective kept). *floor*: one sweep's full products and assignments times the
greedy run's sweeps, with the solver (of those installed from PyPI: scipy, src-d's lapjv,
lapx's lapjvr) whose floor sweep is fastest, as the second table shows; autobasin uses the
fastest installed too ({used}), and updates kept similarities by the columns that moved, so it
can run below the floor. *J*: the paper's objective over parameters. *rebasin s*: its
constructor (tracing) and `rebasin()`. Each end-to-end time (autobasin's and rebasin's
alike) is the fastest of {speed_repeats} runs in one fresh process per method and model (the
first run pays the process's cold start; `scale.json` keeps every run's time). Extra peak
memory: `VmHWM` growth during `weight_matching`, each model in a fresh process.

Runs (each part keeps its last run; other jobs may have shared the machine, which slows
every column alike):

{runs}

Machine: {wms._cpu()}, {os.cpu_count()} cores, CPU only, `torch.set_num_threads({args.threads})`.

Versions: {wms._versions()}, lapjv {_version('lapjv')}, lapx {_version('lapx')}.
"""
        (out / "scale.md").write_text(text)
        print(f"wrote {out / 'scale.md'}")
    return res


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    main()
