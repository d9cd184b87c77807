"""Git Re-Basin in one minute: ``python -m autobasin.demo [--out DIR] [--quick]``.

Trains two small MLPs (64-256-256-10, ReLU) from different seeds on
scikit-learn's bundled 8x8 digits, aligns the second to the first with
:func:`autobasin.auto_rebasin` (weight matching), and compares the held-out
loss along the straight line between them before and after alignment. Prints a
table and writes ``barrier.png`` with both curves. Runs offline on a laptop CPU.

The small helpers here (:func:`make_mlp`, :func:`train_classifier`,
:func:`barrier_table`) are reused by ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .data import digits_split, loader


def make_mlp(in_features: int, hidden: Sequence[int], num_classes: int, seed: int) -> nn.Sequential:
    """A ReLU MLP ``flatten -> fc1 -> relu1 -> ... -> fc{k+1}``, initialised from ``seed``.

    Input (N, *) with ``prod(*) == in_features``; output logits (N, num_classes).
    The global RNG is left as it was.
    """
    widths = [in_features, *hidden, num_classes]
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(w_in, w_out)))
            if i < len(widths) - 1:
                layers.append((f"relu{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def train_classifier(model: nn.Module, dataset: Dataset, epochs: int, lr: float = 1e-3,
                     batch_size: int = 128, seed: int = 0,
                     callback: Callable[[int, nn.Module], None] | None = None) -> list[float]:
    """Train ``model`` in place with Adam and cross-entropy; ``seed`` fixes the batch order.

    ``callback(step, model)`` is called before the first
    step (``step = 0``) and after every optimizer step, in train mode; it may
    evaluate or save the model (put it back in train mode if it switches modes).
    Returns the mean training loss of each epoch. Leaves the model in eval mode.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = loader(dataset, batch_size=batch_size, shuffle=True, seed=seed)
    epoch_losses = []
    model.train()
    step = 0
    if callback is not None:
        callback(step, model)
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.item() * len(y)
            count += len(y)
            if callback is not None:
                callback(step, model)
        epoch_losses.append(total / max(count, 1))
    model.eval()
    return epoch_losses


def train_or_load(model: nn.Module, dataset: Dataset, epochs: int, lr: float = 1e-3,
                  batch_size: int = 128, seed: int = 0, cache: Path | None = None,
                  key: str = "model") -> tuple[nn.Module, float]:
    """:func:`train_classifier`, or load the result a previous run saved under ``cache``.

    The file is ``cache/{key}_seed{seed}_ep{epochs}_n{len(dataset)}.pt`` (``key``
    names the architecture and the data). Returns (model in eval mode, training
    seconds; 0.0 when loaded).
    """
    path = None
    if cache is not None:
        path = Path(cache) / f"{key}_seed{seed}_ep{epochs}_n{len(dataset)}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval(), 0.0
    t0 = time.perf_counter()
    train_classifier(model, dataset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), seconds


def _pct(x: float) -> str:
    return f"{100.0 * float(x):.2f}%"


def barrier_table(rows: Mapping[str, tuple[object, float]]) -> str:
    """A markdown table, one row per method.

    ``rows`` maps a method name to ``(BarrierResult, matching seconds)``.
    "loss barrier" is ``BarrierResult.barrier``, the paper's
    ``max_lam L(lam) - (L(0) + L(1)) / 2``; "above chord" is
    ``BarrierResult.barrier_linear``, ``max_lam [L(lam) - ((1 - lam) L(0) + lam L(1))]``.
    The two differ when the endpoints' losses differ: then the paper's barrier is
    at least half their gap even for a path that never rises above the chord.
    Endpoint values are those at lambda = 0 (model A) and lambda = 1 (model B).
    """
    lines = ["| method | held-out loss barrier | above chord | midpoint held-out loss "
             "| midpoint held-out acc | endpoint losses (A / B) | endpoint accs (A / B) "
             "| matching time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (res, seconds) in rows.items():
        losses = list(res.losses)
        accs = list(res.accuracies) if res.accuracies is not None else None
        above_chord = getattr(res, "barrier_linear", float("nan"))
        mid_acc = _pct(res.midpoint_accuracy) if res.midpoint_accuracy is not None else "n/a"
        end_accs = f"{_pct(accs[0])} / {_pct(accs[-1])}" if accs else "n/a"
        lines.append(f"| {name} | {res.barrier:.4f} | {above_chord:.4f} | {res.midpoint_loss:.4f} "
                     f"| {mid_acc} | {losses[0]:.4f} / {losses[-1]:.4f} | {end_accs} "
                     f"| {seconds:.2f} |")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autobasin.demo",
        description="Align two MLPs trained on sklearn digits and compare loss barriers.")
    parser.add_argument("--out", type=Path, default=Path("autobasin-demo"),
                        help="folder for barrier.png (default: ./autobasin-demo/)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer training epochs, for CI (a few seconds)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per model (default 20, or 3 with --quick)")
    parser.add_argument("--lambdas", type=int, default=25,
                        help="number of interpolation points in [0, 1] (default 25)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the demo; returns ``{"naive": BarrierResult, "weight": BarrierResult, "plot": Path}``."""
    import autobasin

    args = _parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 20)
    started = time.perf_counter()

    train, heldout = digits_split(seed=0)
    print(f"sklearn digits: {len(train)} train / {len(heldout)} held-out images (8x8)")
    models = []
    for seed in (0, 1):
        model = make_mlp(64, [256, 256], 10, seed=seed)
        losses = train_classifier(model, train, epochs=epochs, lr=1e-3, batch_size=64, seed=seed)
        print(f"trained MLP 64-256-256-10, seed {seed}: {epochs} epochs, "
              f"final train loss {losses[-1]:.4f}")
        models.append(model)
    model_a, model_b = models

    example = train.tensors[0][:4]
    t0 = time.perf_counter()
    result = autobasin.auto_rebasin(model_a, model_b, example_inputs=example,
                                    method="weight", seed=0, progress=False)
    match_seconds = time.perf_counter() - t0
    print(f"auto_rebasin (weight matching) in {match_seconds:.2f} s: {result.spec!r}")

    heldout_batches = loader(heldout, batch_size=512)
    naive = autobasin.loss_barrier(model_a, model_b, heldout_batches,
                                   lambdas=args.lambdas, progress=False)
    aligned = autobasin.loss_barrier(model_a, result.model, heldout_batches,
                                     lambdas=args.lambdas, progress=False)

    print()
    print(barrier_table({"naive": (naive, 0.0), "weight matching": (aligned, match_seconds)}))
    print()

    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "barrier.png"
    autobasin.plot_barrier({"naive": naive, "weight matching": aligned}, path=plot_path,
                           title="MLP on sklearn digits: held-out loss")
    print(f"wrote {plot_path.resolve()}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return {"naive": naive, "weight": aligned, "plot": plot_path}


if __name__ == "__main__":
    main()
