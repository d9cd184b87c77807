"""Model-zoo sweep: infer a PermutationSpec for every timm family and every
torchvision classification model, and check it.

For each model, in its own subprocess (a crash, a hang or a memory blow-up of
one model does not stop the sweep), the worker

1. builds the model with random weights (no download) in eval mode and makes
   every parameter and buffer non-trivial (:func:`autobasin.testing.randomize_state_`);
2. makes example inputs of batch 2: timm models use ``pretrained_cfg['input_size']``
   (:func:`autobasin.trace.default_inputs`), except that a model whose configured
   size is above 256 is rebuilt with ``img_size=224`` (or 256) when it accepts that
   and runs at that size; torchvision models use 3x224x224 (299 for inception_v3,
   ``image_size`` for the ViTs);
3. times :func:`autobasin.infer.infer_spec`;
4. permutes every group at random (two seeds) and compares the outputs
   (:func:`autobasin.check_equivalence`, relative L2 <= 1e-4).

Status: ``exact`` (every check passed), ``caught`` (a permutation changed the
outputs, or the spec does not fit the state_dict: a wrong spec that would have
shipped silently without the check), ``check-error`` (the check itself failed
for another reason), ``trace-error`` (infer_spec raised), ``create-error`` (the
model cannot be built offline), ``timeout``, ``crash`` (the worker died, or
used more memory than ``--mem-gb``).

timm: one model per family (module of ``timm.models`` that registers models):
the variant with the fewest parameters (ties: the shortest name), counted on the
meta device; the choice is cached in ``OUT/zoo_models.json``.

Usage::

    python benchmarks/zoo.py [--jobs 2] [--out docs/] [--timeout 240]
        [--only NAME[,NAME]] [--timm-only | --torchvision-only] [--limit N]

A full sweep writes ``OUT/zoo.md`` (summary and one table per source) and
``OUT/zoo.json`` (the raw rows). A partial sweep (``--only``, ``--limit``,
``--timm-only``, ``--torchvision-only``) writes ``OUT/zoo_partial.md`` and
``OUT/zoo_partial.json`` instead, so the published report always comes from a
full run. ``--only`` takes timm family names, timm model names or torchvision
model names (prefix ``timm:`` or ``torchvision:`` to pick one source).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from sweep import ensure_importable, finish_row, first_line, watch, work  # noqa: E402
RTOL = 1e-4
SEEDS = (0, 1)
LOW_COVERAGE = 0.95


# =============================================================== worker side
def _timm_model(name: str):
    """Build a timm model; returns (model, inputs, note)."""
    import timm
    import torch
    from autobasin.trace import default_inputs

    cfg = timm.models.get_pretrained_cfg(name)
    size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else None
    if size is not None and max(size[-2:]) > 256:
        for s in (224, 256):
            try:
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False, img_size=s).eval()
                gen = torch.Generator().manual_seed(0)
                inputs = (torch.randn(2, size[0], s, s, generator=gen),)
                with torch.no_grad():
                    model(*inputs)
                return model, inputs, f"img_size={s} (cfg {size[-2]}x{size[-1]})"
            except Exception:  # noqa: BLE001 - does not take or run at this size
                continue
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, default_inputs(model), ""


def _torchvision_model(name: str):
    import torch
    import torchvision
    from autobasin.trace import default_inputs

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    if name == "inception_v3":
        gen = torch.Generator().manual_seed(0)
        return model, (torch.randn(2, 3, 299, 299, generator=gen),), ""
    return model, default_inputs(model), ""


def worker(source: str, name: str, result_path: str, threads: int) -> None:
    def create(row):
        model, inputs, note = (_timm_model if source == "timm" else _torchvision_model)(name)
        row["input_size"] = list(inputs[0].shape[1:]) if inputs and hasattr(inputs[0], "shape") else None
        row["note"] = note
        return model, inputs

    def describe(spec, row):
        row["blocked"] = [[str(n), str(r)[:300]] for n, r in spec.blocked[:5]]
        row["n_blocked"] = len(spec.blocked)
        row["uncovered"] = spec.fixed_reasons(3)

    work(result_path, threads, create, describe, SEEDS, RTOL)


# =============================================================== parent side
def run_one(entry: dict, timeout: float, mem_bytes: int, threads: int) -> dict:
    """Run the worker for one model in a subprocess; always returns a row."""
    row = dict(entry)
    fd, path = tempfile.mkstemp(prefix="zoo_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(HERE), "--worker", entry["source"], entry["model"],
           "--result", path, "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          start_new_session=True) as proc:
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        reader.start()

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        killed, peak = watch(proc.pid, lambda: proc.poll() is None, kill, timeout, mem_bytes)
        reader.join(timeout=5)
        log = b"".join(err_chunks).decode(errors="replace")
    wall = time.monotonic() - t0
    try:
        res = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        res = {}
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    params_meta = row.get("params")
    finish_row(row, res, killed, timeout, mem_bytes, proc.returncode, log, wall, peak)
    if row.get("params") is None:
        row["params"] = params_meta
    return row


# ----------------------------------------------------------- model selection
def timm_choices(out: Path, families: list[str] | None = None, refresh: bool = False) -> dict:
    """{family: {model, params, candidates}}: each family's smallest variant,
    cached in OUT/zoo_models.json (keyed by the timm version)."""
    import timm
    import torch

    cache_path = out / "zoo_models.json"
    cache = {}
    if cache_path.exists() and not refresh:
        try:
            cache = json.loads(cache_path.read_text())
        except ValueError:
            cache = {}
    if cache.get("timm") != timm.__version__:
        cache = {"timm": timm.__version__, "families": {}}
    fams = cache["families"]
    wanted = families if families is not None else timm.list_modules()
    changed = False
    for fam in wanted:
        if fam in fams:
            continue
        names = [n for n in timm.list_models(module=fam) if not n.startswith("test_")]
        best = None
        counts = {}
        for n in names:
            try:
                with torch.device("meta"):
                    m = timm.create_model(n, pretrained=False)
                counts[n] = sum(p.numel() for p in m.parameters())
                del m
            except Exception as e:  # noqa: BLE001
                print(f"  [meta] {n}: {first_line(e)}", file=sys.stderr)
        if counts:
            best = min(counts, key=lambda n: (counts[n], len(n), n))
        fams[fam] = {"model": best, "params": counts.get(best), "candidates": len(names)}
        changed = True
        print(f"  [select] {fam}: {best} ({counts.get(best)} params, {len(names)} variants)",
              file=sys.stderr)
    if changed:
        out.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return {f: fams[f] for f in wanted}


def build_entries(args, out: Path) -> list[dict]:
    import timm
    import torchvision
    from torchvision.models import get_model_builder, list_models

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    entries: list[dict] = []
    if not args.torchvision_only:
        families = timm.list_modules()
        if only is not None:
            pick = []
            for o in only:
                src, _, n = o.rpartition(":")
                if src in ("", "timm") and n in families:
                    pick.append(n)
            choices = timm_choices(out, sorted(set(pick)), args.refresh_models) if pick else {}
            for fam, c in choices.items():
                entries.append({"source": "timm", "family": fam, "model": c["model"],
                                "params": c["params"]})
            all_models = set(timm.list_models())
            for o in only:
                src, _, n = o.rpartition(":")
                if src in ("", "timm") and n in all_models and \
                        not any(e["model"] == n for e in entries):
                    from timm.models import _registry
                    fam = _registry._model_to_module.get(n, "?")
                    entries.append({"source": "timm", "family": fam.rpartition(".")[2],
                                    "model": n, "params": None})
        else:
            choices = timm_choices(out, families, args.refresh_models)
            for fam, c in choices.items():
                entries.append({"source": "timm", "family": fam, "model": c["model"],
                                "params": c["params"]})
    if not args.timm_only:
        for n in list_models(module=torchvision.models):
            if only is not None and not any(
                    o.rpartition(":")[2] == n and o.rpartition(":")[0] in ("", "torchvision")
                    for o in only):
                continue
            fam = get_model_builder(n).__module__.rpartition(".")[2]
            entries.append({"source": "torchvision", "family": fam, "model": n, "params": None})
    entries = [e for e in entries if e["model"]]
    if args.limit:
        entries = entries[:args.limit]
    return entries


# ------------------------------------------------------------------- report
def _fmt_params(n) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, (int, float)) else "?"


def _why(row: dict) -> str:
    if row["status"] != "exact":
        return row.get("message", "") or ""
    if row.get("coverage") is not None and row["coverage"] < LOW_COVERAGE:
        parts = [f"{r} ({f:.1%} of params)" for r, f in row.get("uncovered", [])]
        if not parts and row.get("blocked"):
            parts = [f"{n}: {r}" for n, r in row["blocked"][:2]]
        return "; ".join(parts)
    err = row.get("err")
    if isinstance(err, float) and err > RTOL:
        # check_equivalence passed: the float32 error vanished when re-run in float64
        return (f"float32 error {err:.1e} is rounding: re-run in float64 the permuted model "
                f"agrees within {RTOL:g}")
    return ""


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _stats(rows: list[dict]) -> dict:
    exact = [r for r in rows if r["status"] == "exact"]
    covs = [r["coverage"] for r in exact if r.get("coverage") is not None]
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {"total": len(rows), "exact": len(exact),
            "median_coverage": statistics.median(covs) if covs else None,
            "low_coverage": sum(1 for c in covs if c < LOW_COVERAGE),
            "caught": by_status.get("caught", 0), "by_status": by_status}


def write_report(rows: list[dict], out: Path, stem: str, argv: list[str], elapsed: float,
                 jobs: int, base: dict | None = None) -> None:
    """Write OUT/{stem}.md and .json. ``base``: the meta of the sweep that
    ``rows`` update (``--update``): its command, date and time stay the page's,
    and this run is listed under the re-runs."""
    import timm
    import torch
    import torchvision

    timm_rows = sorted([r for r in rows if r["source"] == "timm"], key=lambda r: r["family"])
    tv_rows = sorted([r for r in rows if r["source"] == "torchvision"],
                     key=lambda r: (r["family"], r["model"]))
    st_timm, st_tv = _stats(timm_rows), _stats(tv_rows)
    caught = st_timm["caught"] + st_tv["caught"]
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = "python benchmarks/zoo.py" + (" " + shlex.join(argv) if argv else "")
    reruns = []
    if base is not None:
        rerun_models = sorted(r["model"] for r in rows if r.get("rerun"))
        reruns = base.get("reruns", []) + [{"command": cmd, "date": date, "models": rerun_models}]
        cmd, date = base["command"], base["date"]
        elapsed, jobs = base.get("elapsed_min", float("nan")) * 60, base.get("jobs", jobs)

    def cov(x):
        return f"{x:.3f}" if isinstance(x, float) else "n/a"

    def status_line(st):
        return ", ".join(f"{k} {v}" for k, v in sorted(st["by_status"].items()))

    lines = ["# Model zoo: inferred permutation specs", ""]
    if stem != "zoo":
        lines += ["**Partial run** (not the published sweep).", ""]
    lines += [
        "Every timm model family (its smallest variant) and every torchvision classification "
        "model, with random weights: infer the spec, then permute every group at random "
        f"(seeds {', '.join(map(str, SEEDS))}) and compare the outputs (relative L2 <= {RTOL:g}, "
        "float32, eval mode, randomized BatchNorm statistics). Coverage (`spec.coverage()`) is "
        "the share of hidden parameter axes that some group permutes: for each floating-point "
        "parameter, the fraction of its hidden axes (not tied to the model's inputs or outputs, "
        "not kernel, spatial or vocabulary axes) that a group acts on, weighted by its elements. "
        "Every hidden axis left fixed has a reason (`spec.fixed_axes()`): \"why short\" gives the "
        "weightiest.",
        "",
        "## Summary",
        "",
        f"- **timm families exact: {st_timm['exact']} / {st_timm['total']}**; median coverage "
        f"over exact families: {cov(st_timm['median_coverage'])}; exact families with coverage "
        f"< {LOW_COVERAGE}: {st_timm['low_coverage']} ({status_line(st_timm)})",
        f"- **torchvision models exact: {st_tv['exact']} / {st_tv['total']}**; median coverage "
        f"over exact models: {cov(st_tv['median_coverage'])}; exact models with coverage "
        f"< {LOW_COVERAGE}: {st_tv['low_coverage']} ({status_line(st_tv)})",
        f"- **wrong specs caught by the equivalence check (would have shipped silently "
        f"wrong): {caught}**" + (" — must be zero" if caught else ""),
        "",
        "Produced by:",
        "",
        "```",
        cmd,
        "```",
        "",
        *[f"Rows re-run since, with `{r['command']}` ({r['date']}): "
          + ", ".join(f"`{m}`" for m in r["models"]) + "." for r in reruns],
        *([""] if reruns else []),
        f"{date}; timm {timm.__version__}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {jobs} parallel job(s); sweep took {elapsed / 60:.1f} min.",
        "",
        "Status: `exact` every check passed; `caught` a random permutation changed the outputs "
        "(or the spec did not fit the state_dict); `check-error` the check failed otherwise; "
        "`trace-error` inference raised; `create-error` the model cannot be built offline; "
        "`timeout`; `crash` the worker died or ran out of memory. \"why short\" is given for "
        f"every row that is not exact or has coverage < {LOW_COVERAGE}: the exception, or the "
        "blocking reasons of the unpermuted parameters (share of all parameter elements).",
        "",
    ]
    header = ("| family | model | params (M) | status | groups | coverage | max rel err "
              "| infer time (s) | why short |")
    sep = "|---|---|---:|---|---:|---:|---:|---:|---|"
    for title, rs in (("timm (smallest variant of each family)", timm_rows),
                      ("torchvision classification models", tv_rows)):
        if not rs:
            continue
        lines += [f"## {title}", "", header, sep]
        for r in rs:
            err = r.get("err")
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append("| " + " | ".join([
                r["family"], f"`{r['model']}`{note}", _fmt_params(r.get("params")), r["status"],
                str(r.get("groups", "")), cov(r.get("coverage")),
                f"{err:.1e}" if isinstance(err, float) else "",
                f"{r['infer_s']:.1f}" if isinstance(r.get("infer_s"), (int, float)) else "",
                _md_escape(_why(r)),
            ]) + " |")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines))
    meta = {"command": cmd, "date": date, "timm": timm.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "rtol": RTOL, "seeds": list(SEEDS),
            "elapsed_min": elapsed / 60, "jobs": jobs, "reruns": reruns,
            "summary": {"timm": st_timm, "torchvision": st_tv, "caught": caught}}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": timm_rows + tv_rows},
                                                 indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated timm families/models or torchvision models")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--timm-only", action="store_true")
    g.add_argument("--torchvision-only", action="store_true")
    p.add_argument("--limit", type=int, default=0, help="run only the first N models")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    p.add_argument("--out", default="docs/", help="output folder")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per model")
    p.add_argument("--mem-gb", type=float, default=0.0,
                   help="kill a worker above this resident memory (default: 20 GiB / jobs)")
    p.add_argument("--update", action="store_true",
                   help="with --only: replace those rows in OUT/zoo.json and rewrite OUT/zoo.md "
                        "(the page lists the re-run)")
    p.add_argument("--refresh-models", action="store_true",
                   help="recompute the smallest timm variants instead of using the cache")
    p.add_argument("--worker", nargs=2, metavar=("SOURCE", "NAME"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    ensure_importable()
    if args.worker:
        try:
            worker(args.worker[0], args.worker[1], args.result, args.threads or os.cpu_count())
        except BaseException:  # noqa: BLE001 - leave the traceback for the parent
            traceback.print_exc()
            raise
        return 0

    import warnings
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    partial = bool(args.only or args.limit or args.timm_only or args.torchvision_only)
    stem = "zoo_partial" if partial else "zoo"
    base = None
    if args.update:
        if not args.only:
            p.error("--update needs --only: the models to re-run")
        try:
            base = json.loads((out / "zoo.json").read_text())
        except (OSError, ValueError) as e:
            p.error(f"--update: cannot read {out / 'zoo.json'} ({e}); run the full sweep first")
        stem = "zoo"
    t0 = time.monotonic()
    entries = build_entries(args, out)
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    mem = int((args.mem_gb or 20.0 / jobs) * 2**30)
    print(f"{len(entries)} models, {jobs} job(s), {threads} thread(s) each", file=sys.stderr)
    rows = []
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, e, args.timeout, mem, threads): e for e in entries}
        for k, fut in enumerate(cf.as_completed(futures), 1):
            r = fut.result()
            rows.append(r)
            cov = r.get("coverage")
            print(f"[{k}/{len(entries)}] {r['source']}:{r['model']} ({r['family']}): "
                  f"{r['status']} coverage={cov if cov is None else round(cov, 4)} "
                  f"groups={r.get('groups')} infer={r.get('infer_s')}s wall={r['wall_s']}s "
                  f"rss={r['peak_rss_gb']}G {_why(r)[:200]}", file=sys.stderr, flush=True)
    if base is not None:
        for r in rows:
            r["rerun"] = True
        new = {(r["source"], r["model"]) for r in rows}
        kept = [{k: v for k, v in r.items() if k != "rerun"} for r in base["rows"]
                if (r["source"], r["model"]) not in new]
        rows = kept + rows
    write_report(rows, out, stem, argv, time.monotonic() - t0, jobs,
                 base["meta"] if base is not None else None)
    st = _stats([r for r in rows if r["source"] == "timm"])
    print(f"wrote {out / (stem + '.md')}: timm exact {st['exact']}/{st['total']}, "
          f"caught {sum(r['status'] == 'caught' for r in rows)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
