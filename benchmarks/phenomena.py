"""What the phenomena benchmarks share, and the page they write.

``benchmarks/width.py``, ``benchmarks/training_time.py`` and
``benchmarks/counterexample.py`` each write a JSON of their measurements (and
plots) into ``--out``; each then calls :func:`write_page`, which rebuilds
``OUT/phenomena.md`` from every JSON present, with the point-by-point comparison
against Git Re-Basin's qualitative claims computed from the numbers (so the page
is never edited by hand). ``python benchmarks/phenomena.py --out docs/`` rebuilds
it alone.

Protocol shared by the experiments (MNIST, first 8,000 test images for training,
last 2,000 held out): the last 1,000 of the 8,000 training images are a
validation split; models train on the other 7,000 with Adam (lr 1e-3, batch 128)
for at most ``epochs`` epochs and keep the epoch with the lowest validation loss
(early stopping). Why: without it, wide MLPs trained long on 7,000 images overfit by
different amounts (held-out losses of two seeds 0.20 vs 0.24 after 20 epochs at
width 1024, 0.31 vs 0.15 after 10), and the paper's barrier is then at least half
that gap whatever the matcher. Early stopping puts both endpoints near their best
held-out loss, so the barrier measures the path rather than the endpoints' overfitting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Subset

try:
    import autobasin  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autobasin.barrier import evaluate
from autobasin.data import loader, mnist_benchmark_split
from autobasin.demo import make_mlp, train_classifier

VALIDATION = 1000
LR = 1e-3
BATCH_SIZE = 128
PARTS = ("width_mlp", "width_resnet", "training_time", "counterexample")


# ------------------------------------------------------------------- data
def splits(data: Path, limit: int | None, prog: str):
    """(train, validation, held-out): the first 7,000 / next 1,000 / last 2,000 images."""
    train_all, heldout = mnist_benchmark_split(data, limit, prog)
    n_val = min(VALIDATION, len(train_all) // 8)
    n_train = len(train_all) - n_val
    return Subset(train_all, range(n_train)), Subset(train_all, range(n_train, len(train_all))), heldout


def base_parser(prog: str, description: str, methods: str | None = None) -> argparse.ArgumentParser:
    """The options every phenomena benchmark takes (--data, --out, --lambdas, --limit), and
    --methods (default ``methods``) with --match-batches when the benchmark aligns by several."""
    parser = argparse.ArgumentParser(prog=f"python benchmarks/{prog}", description=description)
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="folder for the JSON part, its plot and phenomena.md (default docs/)")
    parser.add_argument("--lambdas", type=int, default=13, help="interpolation points (default 13)")
    parser.add_argument("--limit", type=int, default=None,
                        help="smoke test: only the first N train and N held-out images")
    if methods is not None:
        parser.add_argument("--methods", default=methods,
                            help=f"comma-separated barrier_study methods (default {methods or 'by --model'})")
        parser.add_argument("--match-batches", type=int, default=8,
                            help="training batches of 128 for activation matching and REPAIR (default 8)")
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Split --methods, and refuse --epochs < 1 or --lambdas < 2."""
    if isinstance(getattr(args, "methods", None), str):
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if getattr(args, "epochs", 1) < 1 or args.lambdas < 2:
        parser.error("--epochs must be >= 1 and --lambdas >= 2")
    return args


def loaders(data: Path, limit: int | None, prog: str, match_images: int):
    """(train set, validation set, held-out batches, matching batches): the splits of
    :func:`splits`, held-out in batches of 1,000, and the first ``match_images``
    training images in batches of 128 for activation matching and REPAIR."""
    train_set, val_set, heldout = splits(data, limit, prog)
    match = loader(Subset(train_set, range(min(len(train_set), match_images))), batch_size=128)
    return train_set, val_set, loader(heldout, batch_size=1000), match


# ----------------------------------------------------------------- models
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels at every position of an (N, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """conv-LN-ReLU-conv-LN plus a shortcut (1x1 conv + LN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = LayerNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = LayerNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), LayerNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetLN(nn.Module):
    """A small ResNet with LayerNorm (the paper's ResNet20 uses LayerNorm): a 3x3 stem
    of stride 2 (28x28 -> 14x14, to fit a CPU), three stages of ``blocks`` blocks of
    widths 16m, 32m, 64m with stride 2 between stages, average pooling, one Linear."""

    def __init__(self, multiplier: int = 1, blocks: Sequence[int] = (1, 1, 1), num_classes: int = 10):
        super().__init__()
        widths = [16 * multiplier, 32 * multiplier, 64 * multiplier]
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), LayerNorm2d(widths[0]),
                                  nn.ReLU())
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stages.append(nn.Sequential(*[Block(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            c = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def make_model(kind: str, width: int, seed: int, depth: int = 3) -> nn.Module:
    """``mlp``: 784-width x depth-10 ReLU MLP; ``resnet``: :class:`ResNetLN` with multiplier
    ``width``. Initialised from ``seed``; the global RNG is left as it was."""
    if kind == "mlp":
        return make_mlp(28 * 28, (width,) * depth, 10, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNetLN(width)


# --------------------------------------------------------------- training
def train_early_stopped(model: nn.Module, train_set, val_set, epochs: int, seed: int,
                        cache: Path | None = None, key: str = "model") -> tuple[nn.Module, dict]:
    """Train with Adam for at most ``epochs`` epochs and keep the epoch (1..epochs) with
    the lowest validation loss. Returns (model in eval mode, info: best epoch, its
    validation loss, seconds; ``cached`` when loaded from ``cache``)."""
    path = None
    if cache is not None:
        path = Path(cache) / f"{key}_seed{seed}_es{epochs}_n{len(train_set)}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            model.load_state_dict(saved["state"])
            return model.eval(), {**saved["info"], "cached": True}
    steps_per_epoch = len(loader(train_set, batch_size=BATCH_SIZE))
    val_batches = loader(val_set, batch_size=1000)
    best = {"val_loss": float("inf"), "epoch": 0, "state": None}

    def keep_best(step: int, m: nn.Module) -> None:
        if step == 0 or step % steps_per_epoch:
            return
        loss, _ = evaluate(m, val_batches)
        m.train()
        if loss < best["val_loss"]:
            best.update(val_loss=loss, epoch=step // steps_per_epoch,
                        state={k: v.detach().clone() for k, v in m.state_dict().items()})

    t0 = time.perf_counter()
    train_classifier(model, train_set, epochs, lr=LR, batch_size=BATCH_SIZE, seed=seed,
                     callback=keep_best)
    model.load_state_dict(best["state"])
    info = {"epoch": best["epoch"], "val_loss": best["val_loss"], "seconds": time.perf_counter() - t0}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, path)
    return model.eval(), {**info, "cached": False}


# ------------------------------------------------------------------- plots
def plot_heights(table, x: str, xlabel: str, title: str, path: Path) -> None:
    """Two panels, the paper's barrier and the height above the chord, against key ``x``
    (:meth:`autobasin.StudyTable.plot`: mean and range over pairs, one line per method)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    for i, height in enumerate(("barrier", "barrier_linear")):
        ax = fig.add_subplot(1, 2, i + 1)
        table.plot(x, height=height, ax=ax, logx=True,
                   title=f"{'paper' if height == 'barrier' else 'above chord'}: {title}")
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: how each part's plot is drawn from its rows: (key, x label, title)
PLOTS = {"width_mlp": ("width", "MLP width", "held-out, mean and range over pairs"),
         "width_resnet": ("width", "ResNet width multiplier", "held-out, mean and range over pairs"),
         "training_time": ("epoch", "epoch (0 = initialisation; symlog scale)", "held-out, one pair")}


def plot_part(out: Path, name: str, rows: list[dict]) -> Path:
    """Draw ``out/phenomena_{name}.png`` from a part's rows (so page and plot agree)."""
    from autobasin import StudyTable
    x, xlabel, title = PLOTS[name]
    path = Path(out) / f"phenomena_{name}.png"
    plot_heights(StudyTable.from_records(rows), x, xlabel, title, path)
    return path


# ------------------------------------------------------------------- page
def save_part(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"phenomena_{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    write_page(out)
    return path


def _load(out: Path, name: str) -> dict | None:
    path = out / f"phenomena_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _per_width(part: dict, method: str, height: str = "barrier") -> dict:
    """``{width: summary entry}`` (mean, min, max, n over pairs; widths ascending) of
    ``height`` for ``method``, from :meth:`autobasin.StudyTable.summary`."""
    from autobasin import StudyTable
    entries = [e for e in StudyTable.from_records(part["rows"]).summary("width", height)
               if e["method"] == method]
    return {e["width"]: e for e in sorted(entries, key=lambda e: e["width"])}


def _width_means(part: dict, method: str, height: str = "barrier") -> dict:
    return {w: e["mean"] for w, e in _per_width(part, method, height).items()}


def width_checks(part: dict) -> list[str]:
    """The issue's targets for a width sweep, in words, from the rows."""
    lines = []
    weight = _per_width(part, "weight")
    chord = _width_means(part, "weight", "barrier_linear")
    widths = list(weight)
    means = [weight[w]["mean"] for w in widths]
    spread = {w: e["max"] - e["min"] for w, e in weight.items()}
    # seed noise between two widths: the larger of their ranges over pairs
    rises = [(widths[i], widths[i + 1]) for i in range(len(widths) - 1)
             if means[i + 1] > means[i] + max(spread[widths[i]], spread[widths[i + 1]])]
    lines.append("- weight matching barrier falls with width (each width's mean at most the narrower one's "
                 "plus seed noise, the larger of the two widths' ranges over pairs): "
                 + ("yes" if not rises else f"NO at {rises}")
                 + f" ({' → '.join(f'{m:.3f}' for m in means)}; above the chord "
                 + " → ".join(f"{chord[w]:.3f}" for w in widths) + ")")
    lines.append(f"- clearly above zero at the narrowest width {widths[0]}: "
                 f"{'yes' if means[0] > 0.05 else 'NO'} ({means[0]:.4f})")
    if part["kind"] == "mlp":
        lines.append(f"- ≤ 0.02 at the widest MLP ({widths[-1]}): {'yes' if means[-1] <= 0.02 else 'NO'} "
                     f"({means[-1]:.4f} paper's barrier, {chord[widths[-1]]:.4f} above the chord)")
    naive = _width_means(part, "naive")
    lowest = min(naive, key=naive.get)
    lines.append(f"- naive interpolation stays high at every width (≥ 0.3): "
                 f"{'yes' if naive[lowest] >= 0.3 else 'NO'} (lowest {naive[lowest]:.3f} at width {lowest})")
    return lines


def training_checks(rows: list[dict]) -> list[str]:
    """The issue's target in words: the barrier after matching shrinks as training goes on."""
    lines = []
    for method in ("weight", "activation"):
        curve = sorted((r["epoch"], r["barrier"], r["barrier_linear"]) for r in rows if r["method"] == method)
        if not curve:
            continue
        peak = max(curve, key=lambda c: c[1])
        final = curve[-1]
        after = [c for c in curve if c[0] >= peak[0]]
        # after the peak, the height above the chord (what the endpoints' overfitting gap leaves alone)
        rises = [(e1, e2) for (e1, _, h1), (e2, _, h2) in zip(after, after[1:]) if h2 > h1 + 0.02]
        lines.append(f"- {method} matching: the barrier peaks at {peak[1]:.3f} (epoch {peak[0]:g}) and ends at "
                     f"{final[1]:.3f} (epoch {final[0]:g}; {final[2]:.3f} above the chord): "
                     f"{'shrinks' if final[1] < peak[1] / 2 else 'does NOT shrink by half'} as training goes on; "
                     f"after the peak the height above the chord "
                     + ("never rises by more than 0.02" if not rises else f"rises by more than 0.02 at {rises}")
                     + f" (lowest {min(c[2] for c in after):.3f}, first at or below 0.01 at epoch "
                     + next((f"{c[0]:g}" for c in after if c[2] <= 0.01), "never") + ")")
    naive = sorted((r["epoch"], r["barrier"]) for r in rows if r["method"] == "naive")
    if naive:
        lines.append(f"- naive interpolation: barrier {naive[-1][1]:.3f} at the end "
                     f"(highest {max(b for _, b in naive):.3f}): it does not shrink with training")
    return lines


def _trend(means: dict) -> str:
    return " → ".join(f"{v:.3f}" for v in means.values())


def paper_claims(parts: dict) -> list[str]:
    """Git Re-Basin's qualitative claims, each with what the parts here show."""
    out = []
    widths = [(n, parts[n]) for n in ("width_mlp", "width_resnet") if parts.get(n)]
    if widths:
        out.append("1. *The barrier after matching falls as models get wider.*")
        for name, part in widths:
            label = "MLP" if part["kind"] == "mlp" else "ResNet with LayerNorm"
            for method in ("weight", "activation"):
                m = _width_means(part, method)
                if not m:
                    continue
                first, last = list(m.values())[0], list(m.values())[-1]
                verdict = "reproduces" if last < first / 4 else "does NOT reproduce"
                out.append(f"   - {label}, {method} matching: {verdict} (widths {', '.join(map(str, m))}: "
                           f"{_trend(m)})")
        out.append("2. *Zero barrier is reached only at large width.*")
        for name, part in widths:
            label = "MLP" if part["kind"] == "mlp" else "ResNet with LayerNorm"
            m = _width_means(part, "weight")
            chord = _width_means(part, "weight", "barrier_linear")
            # the widths from which on every wider one is within 0.01 of the chord
            zero = [w for i, w in enumerate(chord) if all(v <= 0.01 for v in list(chord.values())[i:])]
            widest = list(chord)[-1]
            gap = ("is half the endpoints' loss gap there" if chord[widest] <= 1e-3 else
                   f"is {chord[widest]:.4f} above the chord")
            out.append(f"   - {label}: weight matching's path is within 0.01 of the chord from width "
                       f"{zero[0] if zero else 'none'} on (heights above the chord {_trend(chord)}); "
                       f"the paper's barrier at the widest, {m[widest]:.4f}, {gap}: "
                       f"{'reproduces' if zero and zero[0] != list(chord)[0] else 'does NOT reproduce'}")
        out.append("3. *Naive interpolation keeps a high barrier at every width.*")
        for name, part in widths:
            label = "MLP" if part["kind"] == "mlp" else "ResNet with LayerNorm"
            m = _width_means(part, "naive")
            out.append(f"   - {label}: {'reproduces' if min(m.values()) >= 0.3 else 'does NOT reproduce'} "
                       f"(lowest {min(m.values()):.3f})")
        resnet = parts.get("width_resnet")
        if resnet:
            w, a = _width_means(resnet, "weight"), _width_means(resnet, "activation")
            worse = [k for k in w if w[k] > _width_means(resnet, "naive")[k]]
            if worse:
                out.append(f"   - not in the paper's figures: on the narrow ResNets (width {', '.join(map(str, worse))}) "
                           f"weight matching ends above naive interpolation, while activation matching "
                           f"lowers the barrier at every width ({_trend(a)})")
            rep = _width_means(resnet, "activation+repair")
            if rep:
                helped = [k for k in rep if rep[k] < a[k]]
                out.append(f"   - not a Git Re-Basin claim: REPAIR (Jordan et al.) after activation matching "
                           f"lowers the barrier at width {', '.join(map(str, helped)) or 'none'} of "
                           f"{', '.join(map(str, rep))} ({_trend(rep)} against {_trend(a)} without it)")
    tt = parts.get("training_time")
    if tt:
        rows = tt["rows"]
        curve = sorted((r["epoch"], r["barrier"], r["barrier_linear"]) for r in rows if r["method"] == "weight")
        peak = max(curve, key=lambda c: c[1])
        after = [c for c in curve if c[0] > peak[0]]
        flat = next((c[0] for i, c in enumerate(after) if all(d[2] <= 0.01 for d in after[i:])), None)
        start = curve[0]
        out.append("4. *Connectivity after matching appears only after enough training.*")
        out.append(f"   - {'reproduces' if flat is not None else 'does NOT reproduce'}: after weight matching "
                   f"the barrier rises from {start[1]:.3f} at initialisation to {peak[1]:.3f} at epoch "
                   f"{peak[0]:g}, then falls; the path stays within 0.01 of the chord from epoch "
                   f"{flat if flat is not None else 'never'} on. At initialisation every model predicts "
                   f"nearly uniformly, so any path is flat: the barrier that matters is the one once the "
                   f"models have learned")
    ce = parts.get("counterexample")
    if ce:
        ex = ce["exhaustive"]
        scaled = next(r for r in ce["rows"] if r["pair"].startswith("A → B'") and r["method"] == "weight")
        plain = next(r for r in ce["rows"] if r["pair"].startswith("A → B (") and r["method"] == "weight")
        out.append("5. *Linear mode connectivity is an emergent property of training, not of the architecture.*")
        ok = ex["B'"]["min"] > 2 * max(ex["B"]["min"], 0.01) and scaled["barrier"] > 10 * max(plain["barrier"], 0.01)
        out.append(f"   - {'supported' if ok else 'NOT supported'} by the counterexample: a model that computes "
                   f"exactly what a connected one computes is not connected (weight matching "
                   f"{scaled['barrier']:.3f} against {plain['barrier']:.3f}; no permutation of the small "
                   f"network's units brings the midpoint excess below {ex[chr(66) + chr(39)]['min']:.3f}); "
                   f"the architecture allows it, standard training does not produce it")
    return out


def write_page(out: Path) -> Path:
    """Rebuild ``out/phenomena.md`` (and the plots drawn from rows) from the parts present."""
    out = Path(out)
    parts = {name: _load(out, name) for name in PARTS}
    for name, part in parts.items():
        if part is not None and name in PLOTS:
            plot_part(out, name, part["rows"])
    lines = ["# Git Re-Basin's phenomena, reproduced on MNIST",
             "",
             "Ainsworth, Hayase & Srinivasa (ICLR 2023) report that the loss barrier after "
             "matching falls as models get wider, that it appears only after enough training, "
             "and argue by counterexample that linear mode connectivity (LMC) modulo "
             "permutations is a property of how models are trained, not of their architecture. "
             "This page is written by `benchmarks/width.py`, `benchmarks/training_time.py` and "
             "`benchmarks/counterexample.py` (each rebuilds it from the JSON files beside it); "
             "nothing on it is edited by hand.",
             "",
             "Two heights for every path: **barrier** is the paper's (highest held-out loss "
             "on the path minus the endpoints' mean) and **above chord** is the largest height "
             "of the path above the straight line between the endpoints' losses. "
             "Protocol (all experiments unless said otherwise): the first 8,000 MNIST test "
             "images train (the last 1,000 of them as a validation split), the last 2,000 are "
             "held out and give every number; Adam, lr 1e-3, batch 128, at most E epochs, "
             "keeping the epoch of lowest validation loss (early stopping). Without early "
             "stopping, wide MLPs overfit by different amounts (held-out losses 0.20 vs 0.24 "
             "for two seeds after 20 epochs at width 1024) and the paper's barrier is then "
             "half that gap whatever the matcher.",
             ""]
    claims: list[str] = []
    for name, title in (("width_mlp", "Barrier vs width: MLP"), ("width_resnet", "Barrier vs width: ResNet with LayerNorm")):
        part = parts[name]
        if part is None:
            continue
        lines += [f"## {title}", "", part["description"], "", part["table"], "",
                  f"![barrier vs width]({part['plot']})", "", *width_checks(part), "",
                  "Produced by:", "", "```", part["command"], "```", "", part["environment"], ""]
    part = parts["training_time"]
    if part is not None:
        lines += ["## Barrier vs training time", "", part["description"], "", part["table"], "",
                  f"![barrier vs training]({part['plot']})", "", *training_checks(part["rows"]), "",
                  "Produced by:", "", "```", part["command"], "```", "", part["environment"], ""]
    part = parts["counterexample"]
    if part is not None:
        lines += ["## A counterexample: equally good models that no permutation connects", "",
                  part["description"], "", part["table"], "", *part["checks"], "",
                  *([f"![counterexample]({part['plot']})", ""] if part.get("plot") else []),
                  "Produced by:", "", "```", part["command"], "```", "", part["environment"], ""]
    claims = paper_claims(parts)
    if claims:
        lines += ["## The paper's claims, point by point", "",
                  "Each verdict and figure is computed from the parts above.", "", *claims]
    path = out / "phenomena.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def environment(started: float) -> str:
    import platform
    return (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.machine()}; "
            f"the run took {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python benchmarks/phenomena.py",
                                     description="Rebuild OUT/phenomena.md from the JSON parts in OUT.")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    print(write_page(parser.parse_args().out))
