"""REPAIR on MNIST networks without normalization (Jordan et al. 2022 setting).

Three networks without any normalization layer are trained twice each (seeds 0 and 1)
on the first 8,000 images of the MNIST test set (the last 2,000 are held out):

* a deep narrow MLP, 784 -> 8 hidden layers of 128 -> 10 (ReLU);
* a small CNN: four 3x3 convolutions (32, 64, 64, 128 channels, the last three with
  stride 2), ReLU, global average pooling, a linear classifier;
* a deeper VGG-style CNN: eight 3x3 convolutions (32, 32, 64, 64, 128 x 4), same head.

Model B is aligned to model A (weight matching by default; ``--methods`` adds
activation matching). At the midpoint ``(A + B') / 2`` we report held-out accuracy
and loss after matching alone, after REPAIR (``autobasin.repair``: every hidden
channel's mean and std set to the average of A's and B's) and after the rescale-only
variant, and the share of the accuracy lost at the midpoint that REPAIR recovers:

    recovery = (acc(REPAIR) - acc(matched)) / (mean endpoint acc - acc(matched))

Usage::

    python benchmarks/repair.py --data ../shared/data/mnist [--epochs 20] [--out docs/] \\
        [--nets mlp,cnn] [--methods weight] [--cache DIR] [--limit N]

Writes ``OUT/repair.md``, ``OUT/repair_path.png`` (held-out accuracy along the path,
with and without REPAIR), ``OUT/repair_variance.png`` (variance collapse per layer)
and rebuilds ``OUT/results.md`` (see ``benchmarks/results_doc.py``).
"""
from __future__ import annotations

import argparse
import textwrap
import datetime
import platform
import shlex
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

try:
    import autobasin
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import autobasin

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_doc.py sits beside this script
import results_doc  # noqa: E402

from autobasin.barrier import evaluate
from autobasin.data import loader, mnist_benchmark_split
from autobasin.demo import make_mlp, train_or_load

LR = 1e-3
BATCH_SIZE = 128
SEEDS = (0, 1)
SMALL_LOSS = 0.03  # a midpoint within 3 accuracy points of its endpoints has little to repair


def make_deep_mlp(seed: int) -> nn.Module:
    """784 -> 8 x 128 -> 10, ReLU, no normalization."""
    return make_mlp(28 * 28, [128] * 8, 10, seed=seed)


def make_cnn(seed: int) -> nn.Module:
    """Four 3x3 convs (32, 64, 64, 128; stride 1, 2, 2, 2), ReLU, global mean pool, linear."""
    widths = [1, 32, 64, 64, 128]
    layers: list[tuple[str, nn.Module]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layers.append((f"conv{i}", nn.Conv2d(w_in, w_out, 3, stride=1 if i == 1 else 2,
                                                 padding=1)))
            layers.append((f"relu{i}", nn.ReLU()))
        layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                   ("fc", nn.Linear(widths[-1], 10))]
    return nn.Sequential(OrderedDict(layers))


def make_deep_cnn(seed: int) -> nn.Module:
    """VGG-style, no norm: eight 3x3 convs in pairs of 32, 64, 128, 128 channels (the
    first conv of each pair after the first has stride 2), ReLU, global mean pool, linear."""
    widths = [1, 32, 32, 64, 64, 128, 128, 128, 128]
    layers: list[tuple[str, nn.Module]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            stride = 2 if i in (3, 5, 7) else 1
            layers.append((f"conv{i}", nn.Conv2d(w_in, w_out, 3, stride=stride, padding=1)))
            layers.append((f"relu{i}", nn.ReLU()))
        layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                   ("fc", nn.Linear(widths[-1], 10))]
    return nn.Sequential(OrderedDict(layers))


NETS: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "mlp": ("deep narrow MLP 784-128x8-10", make_deep_mlp),
    "cnn": ("small CNN 32-64-64-128, no norm", make_cnn),
    "deepcnn": ("VGG-style CNN, 8 convs 32-32-64-64-128x4, no norm", make_deep_cnn),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/repair.py",
        description="Midpoint accuracy after matching, then after REPAIR, for nets without norm.")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="folder for repair.md, the plots and results.md (default docs/)")
    parser.add_argument("--nets", default="mlp,cnn,deepcnn", help=f"comma-separated, from {', '.join(NETS)}")
    parser.add_argument("--methods", default="weight",
                        help="matching methods, comma-separated: weight, activation (default weight)")
    parser.add_argument("--lambdas", type=int, default=11, help="points on the plotted path (default 11)")
    parser.add_argument("--limit", type=int, default=None,
                        help="smoke test: use only the first N train and first N held-out images")
    parser.add_argument("--cache", type=Path, default=None, help="folder to cache trained models in")
    args = parser.parse_args(argv)
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [n for n in args.nets if n not in NETS] + \
        [m for m in args.methods if m not in ("weight", "activation")]
    if bad or not args.nets or not args.methods:
        parser.error(f"unknown net(s)/method(s) {bad}")
    if args.epochs < 1 or args.lambdas < 3 or (args.limit is not None and args.limit < 16):
        parser.error("need --epochs >= 1, --lambdas >= 3, --limit >= 16")
    return args


def trained(net: str, seed: int, train_set, epochs: int, cache: Path | None) -> tuple[nn.Module, float]:
    return train_or_load(NETS[net][1](seed), train_set, epochs, LR, BATCH_SIZE, seed, cache,
                         key=f"repair_{net}")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def collapse(model: nn.Module, a: nn.Module, b: nn.Module, data) -> dict[str, float]:
    """Per hidden layer: mean over channels of std(model) / mean(std(A), std(B))."""
    names = list(autobasin.channel_stats(a, data))[:-1]  # the logits are not a hidden layer
    sm, sa, sb = (autobasin.channel_stats(m, data, modules=names) for m in (model, a, b))
    return {n: float((sm[n].std / ((sa[n].std + sb[n].std) / 2).clamp_min(1e-12)).mean())
            for n in names}


def run_net(net: str, method: str, models, train_set, heldout_batches, lambdas: int) -> dict:
    model_a, model_b = models
    train_batches = loader(train_set, batch_size=500)
    example = next(iter(train_batches))[0][:8]
    t0 = time.perf_counter()
    result = autobasin.auto_rebasin(model_a, model_b, example_inputs=example, method=method,
                                    data=train_batches, repair="repair", progress=False)
    match_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    repaired = result.interpolate(0.5)
    repair_seconds = time.perf_counter() - t0
    points = {
        "endpoint A": model_a,
        "endpoint B": model_b,
        "naive midpoint": autobasin.interpolate(model_a, model_b, 0.5),
        "matched midpoint": result.interpolate(0.5, repair=None),
        "matched + REPAIR": repaired,
        "matched + rescale only": result.interpolate(0.5, repair="rescale"),
    }
    scores = {name: evaluate(m, heldout_batches) for name, m in points.items()}
    end_acc = (scores["endpoint A"][1] + scores["endpoint B"][1]) / 2
    lost = end_acc - scores["matched midpoint"][1]
    recovered = scores["matched + REPAIR"][1] - scores["matched midpoint"][1]
    rescale_recovered = scores["matched + rescale only"][1] - scores["matched midpoint"][1]
    curves = {
        "naive": autobasin.loss_barrier(model_a, model_b, heldout_batches, lambdas=lambdas,
                                        progress=False),
        f"{method} matching": result.loss_barrier(heldout_batches, lambdas=lambdas, repair=None,
                                                  progress=False),
        f"{method} matching + REPAIR": result.loss_barrier(heldout_batches, lambdas=lambdas,
                                                           progress=False),
    }
    variance = {"matched midpoint": collapse(points["matched midpoint"], model_a, result.model,
                                             train_batches),
                "matched + REPAIR": collapse(repaired, model_a, result.model, train_batches)}
    return {"scores": scores, "end_acc": end_acc, "lost": lost,
            "heldout": len(heldout_batches.dataset),
            "recovery": recovered / lost if lost > 0 else float("nan"),
            "rescale_recovery": rescale_recovered / lost if lost > 0 else float("nan"),
            "curves": curves, "variance": variance, "match_seconds": match_seconds,
            "repair_seconds": repair_seconds}


def table(results: dict) -> str:
    lines = ["| network | matching | endpoints' mean acc | naive midpoint | matched midpoint "
             "| matched + REPAIR | matched + rescale | accuracy lost at midpoint | recovered by REPAIR "
             "| recovered by rescale |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (net, method), r in results.items():
        s = r["scores"]
        lines.append(
            f"| {NETS[net][0]} | {method} | {_pct(r['end_acc'])} | {_pct(s['naive midpoint'][1])} "
            f"| {_pct(s['matched midpoint'][1])} | {_pct(s['matched + REPAIR'][1])} "
            f"| {_pct(s['matched + rescale only'][1])} | {100 * r['lost']:.2f} points "
            f"| {100 * r['recovery']:.0f}% | {100 * r['rescale_recovery']:.0f}% |")
    return "\n".join(lines)


def loss_table(results: dict) -> str:
    names = ["endpoint A", "endpoint B", "naive midpoint", "matched midpoint", "matched + REPAIR",
             "matched + rescale only"]
    lines = ["| network | matching | " + " | ".join(names) + " |",
             "|---|---|" + "---:|" * len(names)]
    for (net, method), r in results.items():
        lines.append(f"| {NETS[net][0]} | {method} | "
                     + " | ".join(f"{r['scores'][n][0]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def checks(results: dict) -> list[str]:
    lines = []
    for (net, method), r in results.items():
        ok = r["recovery"] >= 0.5
        line = (f"- {NETS[net][0]}, {method} matching: REPAIR recovers at least half of the "
                f"accuracy lost at the midpoint: {'yes' if ok else 'NO'} "
                f"({100 * r['recovery']:.0f}% of {100 * r['lost']:.2f} points)")
        if not ok and r["lost"] < SMALL_LOSS:
            collapse = min(r["variance"]["matched midpoint"].values())
            line += (f". Matching alone already keeps this midpoint within "
                     f"{100 * r['lost']:.2f} points of its endpoints and its activations keep at "
                     f"least {collapse:.2f} of their std (variance plot), so there is little "
                     f"collapse for REPAIR to undo; what is left is near the resolution of the "
                     f"held-out set (one image = {100 / r['heldout']:.2f} points)")
        lines.append(line)
    return lines


def _panels(results: dict, path: Path, height: float, draw) -> None:
    """One panel per (network, method), side by side: ``draw(ax, net, method, r)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), height))
    FigureCanvasAgg(fig)
    for ax, ((net, method), r) in zip(fig.subplots(1, len(results), squeeze=False)[0],
                                      results.items()):
        draw(ax, net, method, r)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_paths(results: dict, path: Path) -> None:
    def draw(ax, net, method, r):
        for label, curve in r["curves"].items():
            ax.plot(curve.lambdas, [100 * a for a in curve.accuracies], marker="o", markersize=3,
                    label=label)
        ax.set_title(textwrap.fill(NETS[net][0], 42), fontsize=10)
        ax.set_xlabel("λ  (0 = A, 1 = B)")
        ax.set_ylabel("held-out accuracy (%)")
    _panels(results, path, 3.6, draw)


def plot_variance(results: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    def draw(ax, net, method, r):
        for label, ratios in r["variance"].items():
            ax.plot(range(1, len(ratios) + 1), list(ratios.values()), marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(textwrap.fill(f"{NETS[net][0]} ({method} matching)", 42), fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("hidden layer")
        ax.set_ylabel("std(midpoint) / mean std(A, B)")
        ax.set_ylim(0, 1.2)
    _panels(results, path, 3.6, draw)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    train_set, heldout_set = mnist_benchmark_split(args.data, args.limit, "repair")
    started = time.perf_counter()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"MNIST: {len(train_set)} train / {len(heldout_set)} held-out images; Adam lr {LR:g}, "
          f"batch {BATCH_SIZE}, {args.epochs} epochs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    heldout_batches = loader(heldout_set, batch_size=1000)
    results: dict = {}
    train_seconds: dict[str, list[float]] = {}
    for net in args.nets:
        models = []
        for seed in SEEDS:
            model, seconds = trained(net, seed, train_set, args.epochs, args.cache)
            models.append(model)
            train_seconds.setdefault(net, []).append(seconds)
            print(f"  {net} seed {seed}: " + (f"trained in {seconds:.1f} s" if seconds else "from cache"))
        for method in args.methods:
            r = run_net(net, method, models, train_set, heldout_batches, args.lambdas)
            results[(net, method)] = r
            print(f"  {net}, {method}: matched {_pct(r['scores']['matched midpoint'][1])}, "
                  f"REPAIR {_pct(r['scores']['matched + REPAIR'][1])}, "
                  f"recovery {100 * r['recovery']:.0f}%")

    acc_table, losses, lines = table(results), loss_table(results), checks(results)
    print(acc_table, "", losses, "", *lines, sep="\n")
    args.out.mkdir(parents=True, exist_ok=True)
    path_png, variance_png = args.out / "repair_path.png", args.out / "repair_variance.png"
    plot_paths(results, path_png)
    plot_variance(results, variance_png)
    total = time.perf_counter() - started
    command = "python benchmarks/repair.py " + shlex.join(argv)
    timing = "; ".join(f"{NETS[net][0]}: " + ", ".join(f"{s:.1f} s" if s else "cached" for s in secs)
                       for net, secs in train_seconds.items())
    step_times = "; ".join(f"{NETS[net][0]} ({method}): matching {r['match_seconds']:.1f} s, "
                           f"REPAIR of the midpoint {r['repair_seconds']:.1f} s"
                           for (net, method), r in results.items())
    report = "\n".join([
        "# REPAIR: midpoint accuracy of networks without normalization", "",
        f"Two models per network (seeds {SEEDS}), trained with Adam lr {LR:g}, batch "
        f"{BATCH_SIZE}, {args.epochs} epochs on the first {len(train_set)} images of the MNIST "
        f"test set; accuracy on the {len(heldout_set)} held-out images that follow. B is aligned "
        f"to A (`auto_rebasin`); the midpoint is `(A + B') / 2`. REPAIR (`autobasin.repair`, "
        f"via `result.interpolate(0.5)` with `repair=\"repair\"`) measures each hidden "
        f"Conv/Linear output channel on the {len(train_set)} training images and fuses an affine "
        f"correction into that layer's weight and bias so that the channel's mean and std become "
        f"the average of A's and B's (layers corrected one after the other, the merged network "
        f"re-measured before each); \"rescale\" matches the std only (weights and bias of the "
        f"channel multiplied by one factor). Recovery = (acc after REPAIR - acc matched) / "
        f"(endpoints' mean acc - acc matched).",
        "",
        "Held-out accuracy:", "",
        acc_table, "", *lines, "",
        "Held-out loss:", "",
        losses, "",
        f"![held-out accuracy along the path]({path_png.name})", "",
        f"![variance collapse]({variance_png.name})", "",
        "Variance collapse: for each hidden layer, the mean over channels of the midpoint's "
        "activation std divided by the average of the endpoints' (1 = no collapse), on the "
        "training images, before and after REPAIR.", "",
        "## How this was produced", "",
        "```", command, "```", "",
        f"Run on {stamp}, {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, no GPU. "
        f"Wall time {total:.0f} s. Training: {timing}. {step_times}.", ""])
    (args.out / "repair.md").write_text(report)
    results_md = results_doc.write_results(args.out)
    print(f"\nwrote {(args.out / 'repair.md').resolve()} and {results_md.resolve()} in {total:.0f} s")
    return results


if __name__ == "__main__":
    main()
