"""A counterexample: two equally good MLPs of one architecture that no permutation connects.

Git Re-Basin argues that linear mode connectivity (LMC) modulo permutations is a
property of how models are trained, not of the architecture. The construction
here makes that concrete with the scale symmetry of ReLU units:

* A and B are MLPs trained by the usual protocol (``benchmarks/phenomena.py``)
  from seeds 0 and 1; after weight matching the path between them is flat.
* B' is B with every hidden unit rescaled: in-weights and bias times s, out-weights
  divided by s, s drawn log-uniformly from [1/r, r]. ReLU is positively homogeneous,
  so B' computes exactly B's function (checked): it is a trained model of the same
  architecture, as good as B on every input.
* The path from A to B' after matching is high. For a one-hidden-layer MLP with
  ``--small`` units, *every* permutation is tried (``small!`` of them): the held-out
  loss at the midpoint of each path, minus the endpoints' mean, bounds that path's
  barrier from below, and its minimum over all permutations is far above zero.
* Why: interpolation averages a unit's in- and out-weights separately, so a unit
  rescaled by s contributes (1 + s)(1 + 1/s)/4 times its share at the midpoint
  (1 at s = 1, 4.5 at s = 16); unequal gains distort the function. Undo the
  scales (balance every unit: equal norms in and out, a function-preserving map,
  applied to A and B') and matching connects the models again.

So the architecture admits pairs of equally good (here functionally identical)
solutions with no low path modulo permutations; that standard training never
produces them is a property of its initialisation and optimiser, which keep units'
in- and out-norms comparable (gradient flow conserves each ReLU unit's difference of
squared norms, ||w_in||² − ||w_out||²).

Usage::

    python benchmarks/counterexample.py --data ../shared/data/mnist [--width 512] [--small 8] \\
        [--ratio 16] [--epochs 20] [--out docs/]

Writes ``OUT/phenomena_counterexample.json`` and ``.png``, rebuilds ``OUT/phenomena.md``.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phenomena import base_parser, environment, loaders, make_model, save_part, train_early_stopped  # noqa: E402

import autobasin  # noqa: E402


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def rescale_units(model: nn.Module, ratio: float, seed: int) -> nn.Module:
    """A copy whose hidden units are scaled by s ~ log-uniform[1/ratio, ratio]: the
    unit's in-weights and bias times s, its out-weights divided by s."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    layers = linears(model)
    with torch.no_grad():
        for layer, following in zip(layers[:-1], layers[1:]):
            s = torch.exp((2 * torch.rand(layer.out_features, generator=gen) - 1) * math.log(ratio))
            layer.weight.mul_(s[:, None])
            layer.bias.mul_(s)
            following.weight.div_(s[None, :])
    return model


def balance_units(model: nn.Module, sweeps: int = 20) -> nn.Module:
    """A copy in which every hidden unit's (weights, bias) in and weights out have
    equal norms, by the same function-preserving rescaling, repeated over the
    layers until it settles."""
    model = copy.deepcopy(model)
    layers = linears(model)
    with torch.no_grad():
        for _ in range(sweeps):
            for layer, following in zip(layers[:-1], layers[1:]):
                n_in = torch.cat([layer.weight, layer.bias[:, None]], 1).norm(dim=1)
                n_out = following.weight.norm(dim=0)
                s = torch.sqrt(n_out / n_in.clamp_min(1e-12)).clamp(1e-3, 1e3)
                layer.weight.mul_(s[:, None])
                layer.bias.mul_(s)
                following.weight.div_(s[None, :])
    return model


def midpoint_excess_all(a: nn.Module, b: nn.Module, heldout, chunk: int = 256) -> torch.Tensor:
    """For a one-hidden-layer MLP: held-out loss at the midpoint of A and P(B), minus
    the endpoints' mean loss, for every permutation P of the hidden units (in the
    order of ``itertools.permutations``)."""
    (a1, a2), (b1, b2) = linears(a), linears(b)
    x = torch.cat([bx for bx, _ in heldout]).flatten(1)
    y = torch.cat([by for _, by in heldout])
    with torch.no_grad():
        ends = [F.cross_entropy(m(x), y).item() for m in (a, b)]
        ha, hb = F.linear(x, a1.weight, a1.bias), F.linear(x, b1.weight, b1.bias)
        perms = torch.tensor(list(itertools.permutations(range(a1.out_features))))
        out = []
        for start in range(0, len(perms), chunk):
            p = perms[start:start + chunk]                                    # (C, h)
            hidden = torch.relu((ha[None] + hb[:, p].permute(1, 0, 2)) / 2)    # (C, N, h)
            w2 = (a2.weight[None] + b2.weight[:, p].permute(1, 0, 2)) / 2      # (C, 10, h)
            logits = hidden @ w2.transpose(1, 2) + (a2.bias + b2.bias) / 2     # (C, N, 10)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(len(p)),
                                   reduction="none").view(len(p), -1).mean(1)
            out.append(loss)
    return torch.cat(out) - sum(ends) / 2, perms


def permute_hidden(model: nn.Module, perm: torch.Tensor) -> nn.Module:
    """One-hidden-layer MLP with hidden unit perm[i] moved to slot i."""
    model = copy.deepcopy(model)
    first, second = linears(model)
    with torch.no_grad():
        first.weight.copy_(first.weight[perm])
        first.bias.copy_(first.bias[perm])
        second.weight.copy_(second.weight[:, perm])
    return model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser("counterexample.py", "Equally good MLPs that no permutation connects.")
    parser.add_argument("--width", type=int, default=512, help="hidden width of the 3-layer MLP (default 512)")
    parser.add_argument("--small", type=int, default=8,
                        help="hidden units of the one-layer MLP searched exhaustively (default 8: 40,320 "
                             "permutations)")
    parser.add_argument("--ratio", type=float, default=16.0, help="scales drawn from [1/r, r] (default 16)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=None, help="folder to cache trained models in")
    args = parser.parse_args(argv)
    if args.small < 2 or args.small > 9:
        parser.error("--small must be 2..9 (it enumerates small! permutations)")
    if args.ratio <= 1 or args.width < 2 or args.epochs < 1:
        parser.error("--ratio must be > 1, --width >= 2, --epochs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    train_set, val_set, heldout_batches, match_batches = loaders(args.data, args.limit, "counterexample.py", 1024)
    example = next(iter(match_batches))[0][:4]

    def trained(width: int, depth: int, seed: int) -> nn.Module:
        return train_early_stopped(make_model("mlp", width, seed, depth), train_set, val_set, args.epochs,
                                   seed, args.cache, key=f"mlp{width}" + ("" if depth == 3 else f"d{depth}"))[0]

    # ---- wide: the matchers
    a, b = trained(args.width, 3, 0), trained(args.width, 3, 1)
    b_scaled = rescale_units(b, args.ratio, seed=7)
    x = torch.cat([bx for bx, _ in heldout_batches])
    with torch.no_grad():
        same = (b(x) - b_scaled(x)).abs().max().item() / b(x).abs().max().item()
    a_bal, b_scaled_bal = balance_units(a), balance_units(b_scaled)
    # a training procedure that produces such a model: B's initialisation, rescaled (the same function)
    c, _ = train_early_stopped(rescale_units(make_model("mlp", args.width, 1), args.ratio, seed=7), train_set,
                               val_set, args.epochs, 1, args.cache, key=f"mlp{args.width}_rescaled{args.ratio:g}")
    pairs = [({"pair": "A → B (both trained)"}, a, b),
             ({"pair": f"A → B' (B with units rescaled, r = {args.ratio:g})"}, a, b_scaled),
             ({"pair": "balanced A → balanced B'"}, a_bal, b_scaled_bal),
             ({"pair": "A → C (trained from B's initialisation with units rescaled)"}, a, c),
             ({"pair": "balanced A → balanced C"}, a_bal, balance_units(c))]
    rows = []
    for some, methods in ((pairs[:2], ("naive", "weight", "activation")), (pairs[2:], ("weight", "activation"))):
        table = autobasin.barrier_study(some, heldout_batches, methods=methods, example_inputs=example,
                                        match_data=match_batches, lambdas=args.lambdas, progress=False)
        rows += [{"width": args.width, **{k: v for k, v in r.record().items() if k != "accuracies"}}
                 for r in table]
    for r in rows:
        print(f"  {r['pair']} {r['method']}: barrier {r['barrier']:.4f} ({r['barrier_linear']:.4f} above chord)")

    # ---- small: every permutation
    sa, sb = trained(args.small, 1, 0), trained(args.small, 1, 1)
    sb_scaled = rescale_units(sb, args.ratio, seed=7)
    exhaustive = {}
    for label, right in (("B", sb), ("B'", sb_scaled)):
        excess, perms = midpoint_excess_all(sa, right, heldout_batches)
        best = int(excess.argmin())
        # weight matching's permutation (one group: the hidden units), among all of them
        wm_perm, = autobasin.auto_rebasin(sa, right, example_inputs=example, progress=False).perms.values()
        wm_index = perms.tolist().index(wm_perm.tolist())
        best_model = permute_hidden(right, perms[best])
        with torch.no_grad():
            assert torch.allclose(best_model(x), right(x), rtol=1e-4, atol=1e-4)
        best_curve = autobasin.loss_barrier(sa, best_model, heldout_batches, lambdas=args.lambdas, progress=False)
        exhaustive[label] = {"excess": excess.tolist(), "min": float(excess.min()), "median": float(excess.median()),
                             "weight_matching": float(excess[wm_index]),
                             "weight_matching_rank": int((excess < excess[wm_index]).sum()) + 1,
                             "best_barrier": best_curve.barrier, "best_barrier_linear": best_curve.barrier_linear}
        print(f"  small {label}: min midpoint excess over {len(perms)} permutations {excess.min():.4f}, "
              f"weight matching {excess[wm_index]:.4f} (rank {exhaustive[label]['weight_matching_rank']})", flush=True)

    n_perms = math.factorial(args.small)
    table = "\n".join(
        ["| pair | method | barrier | above chord | midpoint loss | endpoint losses (A / B) |",
         "|---|---|---:|---:|---:|---:|"]
        + [f"| {r['pair']} | {r['method']} | {r['barrier']:.4f} | {r['barrier_linear']:.4f} | "
           f"{r['midpoint_loss']:.4f} | {r['loss_a']:.4f} / {r['loss_b']:.4f} |" for r in rows]
        + ["", f"One hidden layer of {args.small} units, all {n_perms:,} permutations of B's units "
               f"(midpoint excess = held-out loss at λ = ½ minus the endpoints' mean, a lower bound of "
               f"the path's barrier):", "",
           "| pair | lowest midpoint excess over all permutations | median | weight matching's (rank) "
           "| barrier of the best permutation's path | above chord |",
           "|---|---:|---:|---:|---:|---:|"]
        + [f"| A → {k} | {v['min']:.4f} | {v['median']:.4f} | {v['weight_matching']:.4f} "
           f"({v['weight_matching_rank']} of {n_perms:,}) | {v['best_barrier']:.4f} | {v['best_barrier_linear']:.4f} |"
           for k, v in exhaustive.items()])

    def row(pair_prefix, method):
        return next(r for r in rows if r["pair"].startswith(pair_prefix) and r["method"] == method)
    plain, scaled, balanced = (row("A → B (", "weight"), row("A → B'", "weight"), row("balanced", "weight"))
    scaled_act = row("A → B'", "activation")
    checks = [
        f"- B' computes B's function: largest output difference {same:.1e} of the largest output "
        f"({'yes' if same < 1e-4 else 'NO'}); so A → B' is a pair of equally good trained models",
        f"- matching connects A and B (barrier {plain['barrier']:.4f}) but not A and B' (weight matching "
        f"{scaled['barrier']:.4f}, activation matching {scaled_act['barrier']:.4f}): "
        f"{'yes' if scaled['barrier'] > 10 * max(plain['barrier'], 0.01) else 'NO'}",
        f"- no permutation connects the small pair A → B': the lowest midpoint excess over all "
        f"{n_perms:,} permutations is {exhaustive[chr(66) + chr(39)]['min']:.4f}, against "
        f"{exhaustive['B']['min']:.4f} for A → B "
        f"({'yes' if exhaustive[chr(66) + chr(39)]['min'] > 2 * max(exhaustive['B']['min'], 0.01) else 'NO'})",
        f"- undoing the scales (balancing both models' units) restores connectivity: barrier "
        f"{balanced['barrier']:.4f} after weight matching "
        f"({'yes' if balanced['barrier'] <= max(2 * plain['barrier'], plain['barrier'] + 0.02) else 'NO'})",
        f"- training from a rescaled initialisation (C) ends less connected to A than B: weight matching "
        f"{row('A → C', 'weight')['barrier']:.4f}, activation matching {row('A → C', 'activation')['barrier']:.4f}, "
        f"{row('balanced A → balanced C', 'weight')['barrier']:.4f} after balancing "
        f"({'yes' if row('A → C', 'weight')['barrier'] > plain['barrier'] + 0.02 else 'NO'})",
    ]
    print(table)
    print("\n".join(checks))

    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "phenomena_counterexample.png"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, data in exhaustive.items():
        ax.hist(data["excess"], bins=80, alpha=0.6, label=f"A → {label}")
        ax.axvline(data["min"], color="black", linewidth=0.8)
    ax.set_xlabel(f"midpoint loss − endpoints' mean, each of {n_perms:,} permutations")
    ax.set_ylabel("permutations")
    ax.set_title(f"one hidden layer of {args.small} units: every permutation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=110)

    description = (
        f"A and B: MLPs 784-{args.width}-{args.width}-{args.width}-10 trained from seeds 0 and 1 (the shared "
        f"protocol, at most {args.epochs} epochs). B' is B with each hidden unit's in-weights and bias "
        f"multiplied by s and its out-weights divided by s, s log-uniform in [1/{args.ratio:g}, "
        f"{args.ratio:g}]: ReLU is positively homogeneous, so B' computes B's function exactly and is as "
        f"good a trained model. C is trained by the same protocol from seed 1's initialisation rescaled "
        f"the same way (which computes what the standard initialisation computes): a training procedure "
        f"that ends in such a solution. Interpolation averages in- and out-weights separately, so a correctly "
        f"matched unit with scale s contributes (1 + s)(1 + 1/s)/4 times its share at the midpoint "
        f"(up to {(1 + args.ratio) * (1 + 1 / args.ratio) / 4:.2f}): unequal gains distort the function, "
        f"and no permutation can undo a scale. \"Balanced\" rescales every unit of A and of B' to equal "
        f"norms in and out (function-preserving) before matching. The second table repeats the "
        f"construction with one hidden layer of {args.small} units, small enough to try every "
        f"permutation.\n\nHow it bears on the paper's claim: the architecture admits pairs of equally good "
        f"(here functionally identical) solutions with no low linear path modulo permutations, so LMC "
        f"modulo permutations cannot be a property of the architecture or of the loss landscape alone. "
        f"Standard training does not produce such pairs because its initialisation gives units "
        f"comparable in- and out-norms and gradient descent keeps them so (gradient flow conserves each "
        f"ReLU unit's ||w_in||² − ||w_out||²): LMC is a property of the solutions the training procedure "
        f"reaches. The same pair is connected modulo permutations *and* scalings, the larger symmetry "
        f"group that issue 18 (generalized symmetries) adds to matching.")
    payload = {"description": description, "table": table, "checks": checks, "plot": plot.name,
               "rows": rows, "exhaustive": {k: {kk: vv for kk, vv in v.items() if kk != "excess"}
                                            for k, v in exhaustive.items()},
               "command": "python benchmarks/counterexample.py " + shlex.join(argv),
               "environment": environment(started)}
    path = save_part(args.out, "counterexample", payload)
    print(f"wrote {path} and {plot}; rebuilt {args.out / 'phenomena.md'}")
    return payload


if __name__ == "__main__":
    main()
