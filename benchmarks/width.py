"""Barrier vs width (Git Re-Basin's width study) on MNIST: MLPs and a ResNet with LayerNorm.

For each width, ``--seeds`` models are trained (the protocol of
``benchmarks/phenomena.py``: early stopping on a validation split), every pair of
them is aligned by each method, and the held-out loss is measured along the
straight line between A and the aligned B (:func:`autobasin.barrier_study`). The
table gives, per width and method, the mean over pairs and the range (min–max).

Usage::

    python benchmarks/width.py --data ../shared/data/mnist --model mlp \\
        [--widths 16,32,64,128,256,512,1024] [--seeds 4,4,4,4,3,3,3] [--epochs 20] [--out docs/]
    python benchmarks/width.py --data ../shared/data/mnist --model resnet \\
        [--widths 1,2,4,8] [--seeds 3,3,3,2] [--epochs 5] [--out docs/]

Writes ``OUT/phenomena_width_{mlp,resnet}.json`` and ``.png``, and rebuilds ``OUT/phenomena.md``.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence


sys.path.insert(0, str(Path(__file__).resolve().parent))
from phenomena import base_parser, check, environment, loaders, make_model, save_part, train_early_stopped  # noqa: E402

import autobasin  # noqa: E402

DEFAULTS = {
    "mlp": {"widths": "16,32,64,128,256,512,1024", "seeds": "4,4,4,4,3,3,3", "epochs": 20,
            "methods": "naive,weight,activation"},
    "resnet": {"widths": "1,2,4,8", "seeds": "3,3,3,2", "epochs": 5,
               "methods": "naive,weight,activation,weight+repair,activation+repair"},
}


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"width.py: {what} takes comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise SystemExit(f"width.py: {what} takes positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser("width.py", "Held-out loss barrier vs width, naive vs aligned.", methods="")
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="mlp",
                        help="mlp: 784-w-w-w-10 ReLU; resnet: ResNet with LayerNorm, widths 16m/32m/64m")
    parser.add_argument("--widths", help="MLP widths, or ResNet multipliers m")
    parser.add_argument("--seeds", help="models per width (one number, or one per width); "
                                        "all pairs of them are aligned")
    parser.add_argument("--epochs", type=int, help="most training epochs (early stopping picks the best)")
    parser.add_argument("--cache", type=Path, default=None, help="folder to cache trained models in")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.model].items():
        if getattr(args, name) in (None, ""):
            setattr(args, name, value)
    args.widths = _ints(args.widths, "--widths")
    seeds = _ints(args.seeds, "--seeds")
    if len(seeds) == 1:
        seeds = seeds * len(args.widths)
    if len(seeds) != len(args.widths) or min(seeds) < 2:
        parser.error("--seeds: one number >= 2, or one per width")
    args.seeds = seeds
    return check(parser, args)


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    train_set, val_set, heldout_batches, match_batches = loaders(args.data, args.limit, "width.py",
                                                                128 * args.match_batches)
    example = next(iter(match_batches))[0][:4]
    print(f"{args.model}: widths {args.widths}, seeds {args.seeds}, at most {args.epochs} epochs; "
          f"{len(train_set)} train / {len(val_set)} validation / {len(heldout_batches.dataset)} "
          f"held-out images")

    trained, infos = {}, []
    for width, n_seeds in zip(args.widths, args.seeds):
        for seed in range(n_seeds):
            model, info = train_early_stopped(make_model(args.model, width, seed), train_set, val_set,
                                              args.epochs, seed, args.cache, key=f"{args.model}{width}")
            trained[width, seed] = model
            infos.append({"width": width, "seed": seed, **info})
            print(f"  width {width} seed {seed}: best epoch {info['epoch']}, validation loss "
                  f"{info['val_loss']:.4f}" + (" (cached)" if info["cached"] else f" ({info['seconds']:.0f} s)"),
                  flush=True)

    pairs = [({"width": w, "seeds": (s, t)}, trained[w, s], trained[w, t])
             for w, n in zip(args.widths, args.seeds) for s, t in itertools.combinations(range(n), 2)]
    table = autobasin.barrier_study(pairs, heldout_batches, methods=args.methods, example_inputs=example,
                                    match_data=match_batches, lambdas=args.lambdas, progress=True)
    markdown = table.to_markdown("width")
    print(markdown)

    name = f"width_{args.model}"
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"phenomena_{name}.png"  # drawn from the rows by save_part

    n_params = {w: sum(p.numel() for p in make_model(args.model, w, 0).parameters()) for w in args.widths}
    kind = ("MLP 784-w-w-w-10 (ReLU)" if args.model == "mlp" else
            "ResNet with LayerNorm over channels (3x3 stem of stride 2, one block per stage, widths "
            "16m/32m/64m; `benchmarks/phenomena.py`), REPAIR fused into the convolutions (`+repair`)")
    description = (
        f"{kind}; widths {args.widths} ({', '.join(f'{n_params[w]:,}' for w in args.widths)} parameters), "
        f"{', '.join(map(str, args.seeds))} models per width (every pair aligned: "
        f"{', '.join(str(n * (n - 1) // 2) for n in args.seeds)} pairs), at most {args.epochs} epochs with "
        f"early stopping (best epochs {min(i['epoch'] for i in infos)}–{max(i['epoch'] for i in infos)}). "
        f"Activation matching and REPAIR read {len(match_batches.dataset)} training images; "
        f"{args.lambdas} points on each path. Cells: mean over pairs (min–max).")
    payload = {"kind": args.model, "description": description, "table": markdown,
               "plot": plot.name, "rows": [{k: v for k, v in r.items() if k != "accuracies"}
                                           for r in table.records()],
               "models": infos, "command": "python benchmarks/width.py " + shlex.join(argv),
               "environment": environment(started)}
    path = save_part(args.out, name, payload)
    print(f"wrote {path} and {plot}; rebuilt {args.out / 'phenomena.md'}")
    return table


if __name__ == "__main__":
    main()
