"""Barrier vs training time (Git Re-Basin's training-time study) on MNIST.

Two models (seeds 0 and 1) train side by side with the same protocol
(``benchmarks/phenomena.py``: Adam lr 1e-3, batch 128, on 7,000 images), and are
saved at a fixed list of optimizer steps, from initialisation to ``--epochs``
epochs. At every checkpoint, B is aligned to A by each method and the held-out
barrier is measured (:func:`autobasin.barrier_study`): when does connectivity
after matching appear?

Usage::

    python benchmarks/training_time.py --data ../shared/data/mnist [--model mlp] [--width 512] \\
        [--epochs 20] [--out docs/]

Writes ``OUT/phenomena_training_time.json`` and ``.png``, and rebuilds ``OUT/phenomena.md``.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence


sys.path.insert(0, str(Path(__file__).resolve().parent))
from phenomena import (BATCH_SIZE, LR, base_parser, check, environment, loaders, make_model,  # noqa: E402
                       save_part, training_checks)

import autobasin  # noqa: E402
from autobasin.barrier import evaluate  # noqa: E402
from autobasin.demo import train_classifier  # noqa: E402

SEEDS = (0, 1)


def checkpoint_steps(steps_per_epoch: int, epochs: int) -> list[int]:
    """Steps at which to keep the models: 0, a few early steps, then roughly
    log-spaced epochs up to ``epochs``."""
    early = [1, 3, 10, 25]
    fractions = [0.5, 1, 2, 3, 5, 8, 12, 20, 30, 50, 80]
    steps = {0, *[s for s in early if s < steps_per_epoch]}
    steps |= {round(f * steps_per_epoch) for f in fractions if f <= epochs}
    steps.add(epochs * steps_per_epoch)
    return sorted(steps)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser("training_time.py", "Held-out loss barrier after matching vs training time.",
                         methods="naive,weight,activation")
    parser.add_argument("--model", choices=("mlp", "resnet"), default="mlp")
    parser.add_argument("--width", type=int, default=512, help="MLP width or ResNet multiplier (default 512)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    args = check(parser, parser.parse_args(argv))
    if args.width < 1:
        parser.error("--width must be >= 1")
    return args


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    train_set, _, heldout_batches, match_batches = loaders(args.data, args.limit, "training_time.py",
                                                          128 * args.match_batches)
    steps_per_epoch = math.ceil(len(train_set) / BATCH_SIZE)
    keep = checkpoint_steps(steps_per_epoch, args.epochs)
    print(f"{args.model} width {args.width}, seeds {SEEDS}, {args.epochs} epochs of {steps_per_epoch} steps; "
          f"checkpoints at steps {keep}")

    snapshots: dict[int, dict[int, dict]] = {s: {} for s in SEEDS}
    train_losses = {}
    for seed in SEEDS:
        model = make_model(args.model, args.width, seed)

        def save(step, m, seed=seed):
            if step in keep:
                snapshots[seed][step] = {k: v.detach().clone() for k, v in m.state_dict().items()}

        t0 = time.perf_counter()
        train_losses[seed] = train_classifier(model, train_set, args.epochs, lr=LR, batch_size=BATCH_SIZE,
                                              seed=seed, callback=save)
        print(f"  seed {seed}: trained in {time.perf_counter() - t0:.0f} s", flush=True)

    def restore(seed: int, step: int):
        def load():
            model = make_model(args.model, args.width, seed)
            model.load_state_dict(snapshots[seed][step])
            return model.eval()
        return load

    pairs = [({"step": step, "epoch": round(step / steps_per_epoch, 3)}, restore(SEEDS[0], step),
              restore(SEEDS[1], step)) for step in keep]
    table = autobasin.barrier_study(pairs, heldout_batches, methods=args.methods,
                                    example_inputs=next(iter(match_batches))[0][:4],
                                    match_data=match_batches, lambdas=args.lambdas, progress=True)
    markdown = table.to_markdown(["step", "epoch"])
    endpoint = {}
    for step in keep:
        losses = [evaluate(restore(s, step)(), heldout_batches) for s in SEEDS]
        endpoint[step] = losses
    # endpoints' held-out losses and accuracies beside the barriers
    lines = markdown.splitlines()
    lines[0] += " endpoint held-out losses (A / B) | endpoint accuracies (A / B) |"
    lines[1] += "---:|---:|"
    for i, step in enumerate(keep):
        (la, aa), (lb, ab) = endpoint[step]
        lines[i + 2] += f" {la:.4f} / {lb:.4f} | {100 * aa:.1f}% / {100 * ab:.1f}% |"
    markdown = "\n".join(lines)
    print(markdown)

    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "phenomena_training_time.png"  # drawn from the rows by save_part

    rows = [{k: v for k, v in r.items() if k != "accuracies"} for r in table.records()]
    kind = "MLP 784-w-w-w-10 (ReLU)" if args.model == "mlp" else "ResNet with LayerNorm"
    description = (f"{kind}, width {args.width}, seeds {SEEDS}, trained {args.epochs} epochs (no early "
                   f"stopping: the checkpoints are the point) on {len(train_set)} images; "
                   f"{steps_per_epoch} steps per epoch. At each checkpoint B is aligned to A and the held-out "
                   f"loss measured at {args.lambdas} points. Cells: the single pair's value.")
    payload = {"description": description, "table": markdown, "plot": plot.name, "rows": rows,
               "checks": training_checks(rows), "train_losses": train_losses,
               "command": "python benchmarks/training_time.py " + shlex.join(argv),
               "environment": environment(started)}
    path = save_part(args.out, "training_time", payload)
    print("\n".join(payload["checks"]))
    print(f"wrote {path} and {plot}; rebuilt {args.out / 'phenomena.md'}")
    return table


if __name__ == "__main__":
    main()
