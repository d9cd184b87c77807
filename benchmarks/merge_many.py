"""MergeMany and model patching on MNIST (Ainsworth et al. 2023, Sections 5.3-5.4 settings).

**MergeMany.** N MLPs 784-512-512-512-10 (ReLU; Adam lr 1e-3, batch 128) are trained,
each from its own seed, on its own random half of the 8,000 training images (the
first 8,000 of the MNIST test set; the last 2,000 are held out). They are merged with
``autobasin.merge_many`` (weight matching, Algorithm 3) and compared on the held-out
images with each parent, the naive average of the weights, the merge followed by
REPAIR (``autobasin.repair``) and the ensemble (mean of the parents' softmax outputs):
loss, accuracy and expected calibration error (15 bins).

**Model patching.** Model A is trained on the training images of digits 0-4 plus a
small share (``--patch-extra``, default 10%) of those of 5-9, model B on the digits
5-9 plus the same share of 0-4 (the paper's biased split), and, in a second setting,
on the digits 5-9 only. B is aligned to A by weight matching; the naive and aligned
midpoints (and the aligned midpoint with REPAIR, on the union of both training sets)
are compared with each parent on all ten digits. The accuracy along the whole path
is plotted.

Usage::

    python benchmarks/merge_many.py --data ../shared/data/mnist [--models 5] [--epochs 20] \\
        [--out docs/] [--cache DIR] [--limit N] [--patching both|biased|b-only|none]

Writes ``OUT/merge_many.md``, ``OUT/merge_many_reliability.png``,
``OUT/patching_accuracy.png``, ``OUT/patching_accuracy_b_only.png`` and rebuilds
``OUT/results.md``
(see ``benchmarks/results_doc.py``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

try:
    import autobasin
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import autobasin

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_doc.py sits beside this script
import results_doc  # noqa: E402

from autobasin.calibration import predict
from autobasin.data import loader, mnist_benchmark_split
from autobasin.demo import make_mlp, train_or_load
from autobasin.infer import infer_spec

HIDDEN = (512, 512, 512)
LR = 1e-3
BATCH_SIZE = 128
N_BINS = 15


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/merge_many.py",
        description="MergeMany vs parents vs naive average vs ensemble; model patching.")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("--models", type=int, default=5, help="models to merge (default 5)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="folder for merge_many.md, the plots and results.md (default docs/)")
    parser.add_argument("--patch-extra", type=float, default=0.1,
                        help="share of the other half's training images each patching model also "
                             "sees (default 0.1; B sees none in the second setting)")
    parser.add_argument("--lambdas", type=int, default=11,
                        help="interpolation points of the patching path (default 11)")
    parser.add_argument("--limit", type=int, default=None,
                        help="smoke test: use only the first N train and first N held-out images")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder to cache trained models in (keyed by role, seed, epochs, data)")
    parser.add_argument("--patching", choices=("both", "biased", "b-only", "none"), default="both",
                        help="model patching settings to run: the biased split, B on 5-9 only, "
                             "both (default) or none")
    args = parser.parse_args(argv)
    if args.models < 2 or args.epochs < 1 or args.lambdas < 3 or not 0 <= args.patch_extra <= 1 \
            or (args.limit is not None and args.limit < 16):
        parser.error("need --models >= 2, --epochs >= 1, --lambdas >= 3, "
                     "0 <= --patch-extra <= 1, --limit >= 16")
    return args


# ------------------------------------------------------------------- training
def trained_mlp(tag: str, seed: int, train_set, epochs: int, cache: Path | None
                ) -> tuple[nn.Module, float]:
    """An MLP trained from ``seed`` on ``train_set``; from ``cache`` when there.

    Returns (model, training seconds; 0 when cached)."""
    return train_or_load(make_mlp(28 * 28, HIDDEN, 10, seed=seed), train_set, epochs, LR,
                         BATCH_SIZE, seed, cache, key=f"mergemany_{tag}")


def mean_state(models: Sequence[nn.Module]) -> nn.Module:
    """The plain average of the models' weights (no alignment)."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return out


# ----------------------------------------------------------------- evaluation
def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out loss (NLL), accuracy and ECE of probabilities (N, 10)."""
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    cal = autobasin.reliability(probs, labels, n_bins=N_BINS, probs=True)
    return {"loss": loss, "acc": cal.accuracy, "ece": cal.ece, "calibration": cal}


def model_probs(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = predict(model, batches)
    return logits.double().softmax(-1), labels


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def score_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | held-out loss | held-out acc | ECE |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['loss']:.4f} | {_pct(r['acc'])} | {_pct(r['ece'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ MergeMany
def run_merge_many(args, train_set, heldout_set) -> dict:
    n = len(train_set)
    half = n // 2
    parents, train_seconds = [], []
    for i in range(args.models):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + i))
        subset = Subset(train_set, order[:half].tolist())
        model, seconds = trained_mlp(f"half{i}", i, subset, args.epochs, args.cache)
        parents.append(model)
        train_seconds.append(seconds)
        print(f"  parent {i + 1}: seed {i}, {half} images, "
              + (f"trained in {seconds:.1f} s" if seconds else "from cache"))

    train_batches = loader(train_set, batch_size=500)
    heldout_batches = loader(heldout_set, batch_size=1000)
    example = next(iter(train_batches))[0][:8]
    spec = infer_spec(parents[0], example)

    t0 = time.perf_counter()
    info: dict = {}
    merged = autobasin.merge_many(parents, seed=0, spec=spec, progress=False, stats=info)
    merge_seconds = time.perf_counter() - t0
    aligned = []
    for model, perm in zip(parents, info["perms"]):
        endpoint = copy.deepcopy(model)
        endpoint.load_state_dict(autobasin.apply_permutation(spec, perm, model.state_dict()))
        aligned.append(endpoint)
    t0 = time.perf_counter()
    repaired = autobasin.repair(merged, aligned, train_batches)
    repair_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    act_info: dict = {}
    act_merged = autobasin.merge_many(parents, method="activation", data=train_batches, seed=0,
                                      spec=spec, progress=False, stats=act_info)
    act_seconds = time.perf_counter() - t0
    print(f"  merge_many: {info['rounds']} rounds in {merge_seconds:.1f} s; "
          f"REPAIR in {repair_seconds:.1f} s; by activation matching: {act_info['rounds']} "
          f"rounds in {act_seconds:.1f} s")

    rows: dict[str, dict] = {}
    parent_probs = []
    for i, model in enumerate(parents):
        probs, labels = model_probs(model, heldout_batches)
        parent_probs.append(probs)
        rows[f"parent {i + 1}"] = scores(probs, labels)
    parent_rows = [rows[f"parent {i + 1}"] for i in range(args.models)]
    rows["parents (mean of the rows above)"] = {
        k: sum(r[k] for r in parent_rows) / len(parent_rows) for k in ("loss", "acc", "ece")}
    rows["naive weight average"] = scores(*model_probs(mean_state(parents), heldout_batches))
    rows["**MergeMany**"] = scores(*model_probs(merged, heldout_batches))
    rows["MergeMany + REPAIR"] = scores(*model_probs(repaired, heldout_batches))
    rows["MergeMany, activation matching"] = scores(*model_probs(act_merged, heldout_batches))
    rows["ensemble (mean of softmax)"] = scores(torch.stack(parent_probs).mean(0), labels)
    return {"rows": rows, "parent_rows": parent_rows, "rounds": info["rounds"],
            "merge_seconds": merge_seconds, "repair_seconds": repair_seconds,
            "activation_rounds": act_info["rounds"], "activation_seconds": act_seconds,
            "train_seconds": train_seconds, "half": half}


def merge_checks(res: dict) -> list[str]:
    rows, parents = res["rows"], res["parent_rows"]
    merged, naive = rows["**MergeMany**"], rows["naive weight average"]
    best_parent = min(r["loss"] for r in parents)
    worst_parent = max(r["loss"] for r in parents)
    mean_acc = sum(r["acc"] for r in parents) / len(parents)
    gap = 100 * (merged["acc"] - mean_acc)
    return [
        f"- merged held-out loss below every parent's: "
        f"{'yes' if merged['loss'] < best_parent else 'NO'} "
        f"({merged['loss']:.4f} vs parents {best_parent:.4f} .. {worst_parent:.4f})",
        f"- merged accuracy at most 1.5 points below the parents' mean: "
        f"{'yes' if gap >= -1.5 else 'NO'} "
        f"({_pct(merged['acc'])} vs {_pct(mean_acc)}: {gap:+.2f} points)",
        f"- naive averaging far worse (loss above every parent's, accuracy 10+ points below "
        f"their mean): {'yes' if naive['loss'] > worst_parent and naive['acc'] < mean_acc - 0.10 else 'NO'} "
        f"(loss {naive['loss']:.4f}, accuracy {_pct(naive['acc'])})",
    ]


# ------------------------------------------------------------------- patching
def _share(indices: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))]
    return order[: round(share * len(indices))]


def run_patching(args, train_set, heldout_set, extra_a: float, extra_b: float) -> dict:
    labels = torch.as_tensor([int(train_set[i][1]) for i in range(len(train_set))])
    low = torch.nonzero(labels < 5).flatten()
    high = torch.nonzero(labels >= 5).flatten()
    more_a, more_b = _share(high, extra_a, seed=7), _share(low, extra_b, seed=8)
    set_a = Subset(train_set, sorted(low.tolist() + more_a.tolist()))
    set_b = Subset(train_set, sorted(high.tolist() + more_b.tolist()))
    model_a, sec_a = trained_mlp(f"patchA{extra_a:g}", 10, set_a, args.epochs, args.cache)
    model_b, sec_b = trained_mlp(f"patchB{extra_b:g}", 11, set_b, args.epochs, args.cache)
    print(f"  A: {len(set_a)} images (digits 0-4 + {len(more_a)} of 5-9), "
          + (f"{sec_a:.1f} s" if sec_a else "cached")
          + f"; B: {len(set_b)} images (digits 5-9 + {len(more_b)} of 0-4), "
          + (f"{sec_b:.1f} s" if sec_b else "cached"))

    union = loader(Subset(train_set, sorted(set(set_a.indices) | set(set_b.indices))), batch_size=500)
    example = next(iter(union))[0][:8]
    t0 = time.perf_counter()
    result = autobasin.auto_rebasin(model_a, model_b, example_inputs=example, method="weight",
                                    data=union, repair="repair", progress=False)
    match_seconds = time.perf_counter() - t0

    held_labels = torch.as_tensor([int(heldout_set[i][1]) for i in range(len(heldout_set))])
    splits = {
        "all": loader(heldout_set, batch_size=1000),
        "0-4": loader(Subset(heldout_set, torch.nonzero(held_labels < 5).flatten().tolist()), 1000),
        "5-9": loader(Subset(heldout_set, torch.nonzero(held_labels >= 5).flatten().tolist()), 1000),
    }
    candidates = {
        "model A": model_a,
        "model B": model_b,
        "naive midpoint": autobasin.interpolate(model_a, model_b, 0.5),
        "**aligned midpoint**": result.interpolate(0.5, repair=None),
        "aligned midpoint + REPAIR": result.interpolate(0.5),
    }
    rows: dict[str, dict[str, float]] = {}
    for name, model in candidates.items():
        rows[name] = {}
        for split, batches in splits.items():
            loss, acc = autobasin.barrier.evaluate(model, batches)
            rows[name][split] = acc
            if split == "all":
                rows[name]["loss"] = loss
    rows["ensemble of A and B (reference)"] = {}
    for split, batches in splits.items():
        pa, y = model_probs(model_a, batches)
        pb, _ = model_probs(model_b, batches)
        s = scores((pa + pb) / 2, y)
        rows["ensemble of A and B (reference)"][split] = s["acc"]
        if split == "all":
            rows["ensemble of A and B (reference)"]["loss"] = s["loss"]

    curves = {
        "naive": autobasin.loss_barrier(model_a, model_b, splits["all"], lambdas=args.lambdas,
                                        progress=False),
        "aligned": result.loss_barrier(splits["all"], lambdas=args.lambdas, repair=None,
                                       progress=False),
        "aligned + REPAIR": result.loss_barrier(splits["all"], lambdas=args.lambdas,
                                                progress=False),
    }
    return {"rows": rows, "curves": curves, "match_seconds": match_seconds,
            "train_seconds": [sec_a, sec_b],
            "sizes": (len(set_a), len(set_b), len(more_a), len(more_b))}


def patching_table(rows: dict) -> str:
    lines = ["| model | acc, all digits | acc, 0-4 | acc, 5-9 | loss, all digits |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {_pct(r['all'])} | {_pct(r['0-4'])} | {_pct(r['5-9'])} "
                     f"| {r['loss']:.4f} |")
    return "\n".join(lines)


def patching_checks(res: dict) -> list[str]:
    rows = res["rows"]
    a, b = rows["model A"]["all"], rows["model B"]["all"]
    aligned, naive = rows["**aligned midpoint**"]["all"], rows["naive midpoint"]["all"]
    repaired = rows["aligned midpoint + REPAIR"]["all"]
    curve = res["curves"]["aligned"]
    best = max(range(len(curve.lambdas)), key=lambda i: curve.accuracies[i])
    return [
        f"- aligned midpoint beats both parents on all ten digits: "
        f"{'yes' if aligned > max(a, b) else 'NO'} "
        f"({_pct(aligned)} vs A {_pct(a)}, B {_pct(b)})",
        f"- aligned midpoint beats the naive midpoint: {'yes' if aligned > naive else 'NO'} "
        f"({_pct(aligned)} vs {_pct(naive)}); with REPAIR: {_pct(repaired)}",
        f"- best point of the aligned path (chosen on the held-out images, so optimistic): "
        f"lambda = {curve.lambdas[best]:.2f}, {_pct(curve.accuracies[best])} on all ten digits, "
        f"{'above' if curve.accuracies[best] > max(a, b) else 'NOT above'} both parents",
    ]


def plot_patching(curves: dict, path: Path, title: str) -> None:
    autobasin.plot_barrier(curves, path=path, metric="accuracy", title=title)


# ------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    train_set, heldout_set = mnist_benchmark_split(args.data, args.limit, "merge_many")
    started = time.perf_counter()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"MNIST: {len(train_set)} train / {len(heldout_set)} held-out images; "
          f"MLP 784-{'-'.join(map(str, HIDDEN))}-10, Adam lr {LR:g}, batch {BATCH_SIZE}, "
          f"{args.epochs} epochs; torch {torch.__version__}, {torch.get_num_threads()} threads")

    print("MergeMany")
    merge = run_merge_many(args, train_set, heldout_set)
    merge_table = score_table(merge["rows"])
    checks = merge_checks(merge)
    print(merge_table, "", *checks, sep="\n")
    args.out.mkdir(parents=True, exist_ok=True)
    reliability_path = args.out / "merge_many_reliability.png"
    rows = merge["rows"]
    autobasin.reliability_plot(
        {"parent 1": rows["parent 1"]["calibration"],
         "naive average": rows["naive weight average"]["calibration"],
         "MergeMany": rows["**MergeMany**"]["calibration"],
         "MergeMany + REPAIR": rows["MergeMany + REPAIR"]["calibration"],
         "ensemble": rows["ensemble (mean of softmax)"]["calibration"]},
        path=reliability_path, title=f"Held-out reliability, {args.models} MNIST MLPs")

    patches: dict[str, dict] = {}
    patch_lines: list[str] = []
    settings = {
        "biased split (the paper's)": (args.patch_extra, args.patch_extra, "patching_accuracy.png"),
        "B on 5-9 only": (args.patch_extra, 0.0, "patching_accuracy_b_only.png"),
    }
    if args.patching != "none":
        patch_lines = [
            "## Model patching", "",
            "Model A (seed 10) is trained on the training images of digits 0-4 plus a share of "
            "those of 5-9; model B (seed 11) on digits 5-9 plus the same share of 0-4 (the "
            "paper's biased split), or on 5-9 only; same MLP and training as above. B is aligned "
            "to A by weight matching (`auto_rebasin(..., repair=\"repair\")`); midpoints are "
            "`(A + B) / 2` (naive) and `(A + aligned B) / 2` (`result.interpolate(0.5)`), "
            "REPAIR on the union of the two training sets. Accuracy on the 2,000 held-out "
            "images (about 1,000 per half). The plots are `loss_barrier` accuracies along "
            "`(1 - lambda) A + lambda B` (naive), `(1 - lambda) A + lambda B'` (aligned) and the "
            "same with every point REPAIRed (`result.loss_barrier(...)`).", ""]
    wanted = {"both": list(settings), "biased": list(settings)[:1], "b-only": list(settings)[1:],
              "none": []}[args.patching]
    for setting in wanted:
        extra_a, extra_b, png = settings[setting]
        print(f"Model patching, {setting}")
        patch = run_patching(args, train_set, heldout_set, extra_a, extra_b)
        patches[setting] = patch
        table = patching_table(patch["rows"])
        pchecks = patching_checks(patch)
        print(table, "", *pchecks, sep="\n")
        plot_patching(patch["curves"], args.out / png,
                      title=f"Model patching, {setting}: held-out accuracy, all digits")
        size_a, size_b, more_a, more_b = patch["sizes"]
        patch_lines += [
            f"### {setting[0].upper() + setting[1:]}", "",
            f"A: {size_a} images (digits 0-4 + {more_a} of 5-9); B: {size_b} images (digits 5-9 "
            f"+ {more_b} of 0-4); matching {patch['match_seconds']:.1f} s.", "",
            table, "", *pchecks, "",
            f"![accuracy along the path A -> B, {setting}]({png})", ""]
    patch = patches or None

    total = time.perf_counter() - started
    command = "python benchmarks/merge_many.py " + shlex.join(argv)
    train_times = ", ".join(f"{s:.1f} s" if s else "cached" for s in merge["train_seconds"])
    report = "\n".join([
        "# MergeMany on MNIST: merged vs parents vs naive average vs ensemble", "",
        f"{args.models} MLPs 784-{'-'.join(map(str, HIDDEN))}-10 (ReLU), seeds 0..{args.models - 1}, "
        f"each trained on its own random half ({merge['half']} images) of the first "
        f"{len(train_set)} images of the MNIST test set (Adam lr {LR:g}, batch {BATCH_SIZE}, "
        f"{args.epochs} epochs); scores on the {len(heldout_set)} held-out images that follow. "
        f"MergeMany is `autobasin.merge_many` (weight matching, {merge['rounds']} rounds, "
        f"{merge['merge_seconds']:.1f} s); REPAIR (`autobasin.repair`, "
        f"{merge['repair_seconds']:.1f} s) sets every hidden channel of the merge to the mean of "
        f"the aligned parents' activation mean and std, measured on the {len(train_set)} training "
        f"images. \"MergeMany, activation matching\" aligns each parent to the model whose weights "
        f"are the mean of the others by correlating activations on the training images "
        f"(`merge_many(..., method=\"activation\")`, {merge['activation_rounds']} rounds, "
        f"{merge['activation_seconds']:.1f} s). The ensemble averages the parents' softmax outputs (five forward passes). Loss is "
        f"the mean negative log-likelihood; ECE the expected calibration error with "
        f"{N_BINS} equal-width bins on the top-1 confidence.",
        "",
        merge_table, "", *checks, "",
        f"![reliability diagram]({reliability_path.name})", "",
        *patch_lines,
        "## How this was produced", "",
        "```", command, "```", "",
        f"Run on {stamp}, {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, no GPU. "
        f"Wall time {total:.0f} s; training of the merged parents: {train_times}"
        + "".join(f"; patching models, {setting}: "
                  + ", ".join(f"{s:.1f} s" if s else "cached" for s in p["train_seconds"])
                  for setting, p in patches.items())
        + ".", ""])
    (args.out / "merge_many.md").write_text(report)
    results = results_doc.write_results(args.out)
    print(f"\nwrote {(args.out / 'merge_many.md').resolve()} and {results.resolve()} "
          f"in {total:.0f} s")
    return {"merge": merge, "patching": patch}


if __name__ == "__main__":
    main()
