"""Symmetry kinds beyond permutations on Hugging Face model types.

For each type (built from a tiny config by ``benchmarks/zoo_hf.py``'s harness,
every floating parameter perturbed so no gain is 1 and no bias 0): fold the
norms (``autobasin.fold_norms(model, x, untie=True)``; a ``FoldError`` is
recorded and the unfolded model used), infer the spec with
``symmetries="all"``, and check it with random elements of every group's kind
(``check_equivalence``, seeds 0 and 1): a spec whose groups claim more than
the model allows would show here as *caught*. Writes ``docs/kinds_hf.md``.

    python benchmarks/kinds_hf.py --out docs/ [--types llama,gpt2,...]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import autobasin  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import zoo_hf  # noqa: E402  - the tiny-config harness of the transformers zoo
from autobasin import EquivalenceError, check_equivalence, fold_norms, infer_spec  # noqa: E402
from autobasin.fold import FoldError  # noqa: E402

TYPES = ("llama,mistral,qwen2,qwen3,gemma,gemma2,phi3,stablelm,starcoder2,olmo2,granite,cohere,"
         "persimmon,gpt2,gpt_bigcode,gptj,gpt_neox,codegen,opt,bloom,falcon,mpt,mixtral,olmoe,"
         "qwen2_moe,llama4_text,jamba,mamba,t5,bart,whisper,bert,roberta,distilbert,albert,electra,deberta-v2,"
         "vit,deit,beit,dinov2,swin,convnext,resnet,levit,mobilevit,segformer,clip_vision_model,"
         "siglip_vision_model,wav2vec2")
RTOL = 1e-4


def run_type(model_type: str) -> dict:
    row: dict = {"type": model_type}
    t0 = time.perf_counter()
    try:
        model, inputs, info = zoo_hf.build(model_type, False)
    except Exception as e:  # noqa: BLE001 - a type that does not build is reported
        row.update(status="create-error", error=str(e).splitlines()[0][:200])
        return row
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    outputs = ["logits"] if info["head"] and "logits" in info["output_keys"] else None
    try:
        folded = fold_norms(model, inputs, untie=True)
        row["folded"] = len(folded.folded_norms)
    except FoldError as e:
        folded, row["folded"] = model, 0
        row["fold_error"] = str(e).splitlines()[0][:160]
    try:
        spec = infer_spec(folded, inputs, symmetries="all", outputs=outputs)
        row["kinds"] = dict(Counter(g.kind for g in spec.groups.values()))
        stream = zoo_hf.residual_probe(folded, inputs)
        row["stream"] = next((g.kind for g in spec.groups.values() for m in g.members
                              if (m.param, m.axis) == stream), None)
        row["error"] = max(check_equivalence(folded, spec, inputs, seed=s, rtol=RTOL)
                           for s in (0, 1))
        row["status"] = "exact"
    except EquivalenceError as e:
        row.update(status="caught", error=str(e)[:200])
    except Exception as e:  # noqa: BLE001
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    row["seconds"] = time.perf_counter() - t0
    return row


def render(rows: list[dict], seconds: float, when: str, argv: list[str]) -> str:
    built = [r for r in rows if r["status"] != "create-error"]
    exact = [r for r in built if r["status"] == "exact"]
    caught = [r for r in built if r["status"] == "caught"]
    folded = [r for r in built if r.get("folded")]
    general = [r for r in exact if any(k != "permutation" for k in r.get("kinds", {}))]
    orth = [r for r in exact if r.get("stream") == "orthogonal"]
    rope = [r for r in exact if {"rotary", "rotation"} & set(r.get("kinds", {}))]
    lines = [
        "# Symmetry kinds beyond permutations on Hugging Face model types", "",
        "Each type built from a tiny config by `benchmarks/zoo_hf.py`'s harness (nothing "
        "downloaded), every floating parameter perturbed (no gain 1, no bias 0); norms folded "
        "with `fold_norms(model, x, untie=True)` (a `FoldError` recorded and the unfolded model "
        "used); the spec inferred with `symmetries=\"all\"`; checked with a random element of "
        "every group's kind (orthogonal, invertible, signed or scaled permutations, rotations "
        "(times scales) of RoPE's frequency pairs), seeds 0 and "
        f"1, relative output error ≤ {RTOL:g}. *stream*: the kind of the group acting on the "
        "residual stream (the word embedding's columns, else the first layer's outputs).", "",
        "## Summary", "",
        f"- types tried: {len(rows)}; built: **{len(built)}**",
        f"- specs exact under random elements of every kind: **{len(exact)} / {len(built)}**; "
        f"caught (a kind the model does not admit): **{len(caught)}**",
        f"- with a group beyond permutations: {len(general)}; residual stream orthogonal: "
        f"{len(orth)}; norms folded: {len(folded)} types (a `FoldError` — post-norm residuals, "
        "norms read by other ops, streams that are outputs — on "
        f"{sum(1 for r in built if r.get('fold_error'))})",
        f"- RoPE head dims with rotations (times scales) of their frequency pairs (`rotary`, "
        f"`rotation`): {len(rope)} types (a q/k norm with a gain before RoPE admits none: "
        "that head dim stays fixed)", "",
        "| type | status | norms folded | stream | groups by kind | max rel err | time (s) | "
        "note |", "|---|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(r.get("kinds", {}).items()))
        err = f"{r['error']:.1e}" if isinstance(r.get("error"), float) else ""
        note = r.get("fold_error") or (r.get("error") if not isinstance(r.get("error"), float)
                                       else "")
        note = (note or "").replace("|", "\\|")
        lines.append(f"| `{r['type']}` | {r['status']} | {r.get('folded', '')} | "
                     f"{r.get('stream') or ''} | {kinds} | {err} | "
                     f"{r.get('seconds', 0):.1f} | {note} |")
    lines += ["", "Produced by:", "", "```", "python benchmarks/kinds_hf.py " + " ".join(argv),
              "```", "", f"{when}; torch {torch.__version__}, Python "
              f"{platform.python_version()}, {platform.machine()}; took {seconds / 60:.1f} min.",
              ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--types", default=TYPES, help="comma-separated model types")
    args = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for t in [x.strip() for x in args.types.split(",") if x.strip()]:
        rows.append(run_type(t))
        r = rows[-1]
        print(f"{t}: {r['status']} folded={r.get('folded')} stream={r.get('stream')} "
              f"kinds={r.get('kinds')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M")
    (args.out / "kinds_hf.md").write_text(render(rows, time.perf_counter() - t0, when, argv))
    (args.out / "kinds_hf.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out / 'kinds_hf.md'}")
    return rows


if __name__ == "__main__":
    main()
