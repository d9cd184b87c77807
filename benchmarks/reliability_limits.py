"""Resource limits: inspect a billion-parameter model on meta, weight-match a
300M-parameter model within a memory budget, and survive Ctrl-C while saving.

    python benchmarks/reliability_limits.py            # all three, rewrites docs/reliability.md
    python benchmarks/reliability_limits.py --quick    # small models, prints only

(a) ``infer_spec`` on timm ``vit_giant_patch14_224`` (1.0B parameters) built
    under ``torch.device("meta")``: time, groups, coverage.
(b) ``weight_matching`` of two randomly initialised timm
    ``vit_large_patch16_224`` (304M parameters, seeds 0 and 1), in a fresh
    subprocess: peak resident memory (``VmHWM`` after ``5 > /proc/self/clear_refs``
    resets it) before and during matching, against the size of one model's state.
(c) Ctrl-C: a subprocess saves a large state dict over an existing file with
    :func:`autobasin.save_state_dict` and gets SIGINT while the temporary file
    is being written; the old file must be intact and no partial file left.

Each measurement runs in its own subprocess so peaks do not mix. Linux only
(``/proc``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- reliability_limits:start -->", "<!-- reliability_limits:end -->"
GIB = 1024 ** 3


# ------------------------------------------------------------------ children
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child_inspect(name: str) -> dict:
    import timm
    import torch

    from autobasin import infer_spec
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = timm.create_model(name)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    spec = infer_spec(model)
    seconds = time.perf_counter() - t0
    return {"model": name, "params": params, "build_seconds": built, "infer_seconds": seconds,
            "groups": len(spec.groups), "coverage": spec.coverage(),
            "peak_rss_gib": _status_kib("VmHWM") / 2 ** 20}


def child_match(name: str) -> dict:
    import timm
    import torch

    from autobasin import apply_permutation, infer_spec, weight_matching
    torch.manual_seed(0)
    with torch.device("meta"):
        spec = infer_spec(timm.create_model(name))  # the spec from a meta model: no activations
    sds = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sds.append(timm.create_model(name).state_dict())
    state_bytes = sum(t.numel() * t.element_size() for t in sds[0].values())
    params = sum(t.numel() for t in sds[0].values())
    _reset_peak()
    before = _status_kib("VmRSS") / 2 ** 20
    t0 = time.perf_counter()
    perms = weight_matching(spec, sds[0], sds[1], progress=False)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") / 2 ** 20
    # a sanity check that the permutations are usable: applying them keeps B's norm
    aligned = apply_permutation(spec, perms, sds[1])
    same_norm = all(torch.allclose(aligned[k].float().norm(), sds[1][k].float().norm(), rtol=1e-5)
                    for k in list(sds[1])[:8])
    model_gib = state_bytes / GIB
    return {"model": name, "params": params, "model_gib": model_gib, "rss_before_gib": before,
            "peak_rss_gib": peak, "growth_gib": peak - before,
            "peak_over_model": peak / model_gib, "growth_over_model": (peak - before) / model_gib,
            "seconds": seconds, "sweeps": perms.sweeps, "groups": len(spec.groups),
            "init_seconds": perms.init_seconds, "norm_kept": same_norm}


def child_save(path: str, gib: float) -> None:
    """Save a large state dict over ``path`` (the parent interrupts it)."""
    import torch

    from autobasin import save_state_dict
    n = int(gib * GIB / 4 / 64)
    state = {f"w{i}": torch.ones(n) for i in range(64)}
    print("saving", flush=True)
    save_state_dict(state, path)
    print("saved", flush=True)


def _run_child(*args: str, timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------- parent
def ctrl_c(gib: float) -> dict:
    """Interrupt a save in the middle of writing its temporary file."""
    import torch

    from autobasin import load_state_dict, save_state_dict
    folder = Path(tempfile.mkdtemp(prefix="autobasin-ctrlc-"))
    path = folder / "aligned.safetensors"
    save_state_dict({"old": torch.arange(10.0)}, path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, __file__, "--child", "save", str(path), str(gib)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        tmps = list(folder.glob(".aligned.safetensors.*.tmp"))
        size = tmps[0].stat().st_size if tmps else 0
        if size > 0:
            partial = size
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    interrupted = "KeyboardInterrupt" in err and "saved" not in out
    intact = path.read_bytes() == before and torch.equal(load_state_dict(path)["old"],
                                                         torch.arange(10.0))
    leftovers = sorted(p.name for p in folder.iterdir() if p.name != path.name)
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return {"interrupted": interrupted, "partial_bytes_when_interrupted": partial,
            "old_file_intact": intact, "leftover_files": leftovers, "returncode": proc.returncode}


def _lines(inspect: dict, match: dict, cc: dict, command: str) -> list[str]:
    ok = "yes" if match["growth_over_model"] < 3 else "NO"
    return [
        START,
        "",
        f"Generated by `{command}` on {os.cpu_count()} CPU cores "
        f"(torch {__import__('torch').__version__}); each measurement in a fresh subprocess.",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| (a) `infer_spec` of `{inspect['model']}` on meta ({inspect['params'] / 1e9:.2f}B "
        f"parameters) | {inspect['infer_seconds']:.1f} s (model built in "
        f"{inspect['build_seconds']:.1f} s), {inspect['groups']} groups, coverage "
        f"{inspect['coverage']:.3f}, peak RSS {inspect['peak_rss_gib']:.2f} GiB |",
        f"| (b) `weight_matching` of two `{match['model']}` ({match['params'] / 1e6:.0f}M "
        f"parameters, {match['model_gib']:.2f} GiB each) | {match['seconds']:.0f} s "
        f"(greedy start {match['init_seconds']:.0f} s, then {match['sweeps']} descent sweep(s), "
        f"{match['groups']} groups) |",
        f"| (b) resident memory | {match['rss_before_gib']:.2f} GiB before matching (both "
        f"models loaded), peak {match['peak_rss_gib']:.2f} GiB: matching adds "
        f"{match['growth_gib']:.2f} GiB = **{match['growth_over_model']:.2f}x** one model's "
        f"state (target < 3x: {ok}); whole process peak = {match['peak_over_model']:.2f}x one "
        f"model = {match['peak_over_model'] / 2:.2f}x the two models' states |",
        f"| (c) SIGINT while `save_state_dict` writes {cc['gib']:.1f} GiB over an existing "
        f"file | interrupted: {cc['interrupted']} (while the temporary file existed, "
        f"{cc['partial_bytes_when_interrupted'] / 2**20:.0f} MiB on disk), old "
        f"file intact: {cc['old_file_intact']}, files left behind: {cc['leftover_files'] or 'none'} |",
        "",
        END,
    ]


def write_doc(lines: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else ""
    block = "\n".join(lines)
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Resource limits (measured)\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models; print only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "save":
            child_save(rest[0], float(rest[1]))
            return
        result = {"inspect": child_inspect, "match": child_match}[kind](*rest)
        print(json.dumps(result))
        return
    big, large, gib = ("vit_giant_patch14_224", "vit_large_patch16_224", 2.0)
    if args.quick:
        big, large, gib = ("vit_base_patch16_224", "vit_small_patch16_224", 0.3)
    inspect = _run_child("inspect", big)
    print("(a)", json.dumps(inspect), flush=True)
    match = _run_child("match", large)
    print("(b)", json.dumps(match), flush=True)
    cc = ctrl_c(gib)
    cc["gib"] = gib
    print("(c)", json.dumps(cc), flush=True)
    if not args.quick:
        write_doc(_lines(inspect, match, cc, "python benchmarks/reliability_limits.py"))
        print(f"wrote {DOC}")
    failed = not (cc["interrupted"] and cc["old_file_intact"] and not cc["leftover_files"]
                  and match["norm_kept"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
