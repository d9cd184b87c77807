"""Straight-through estimator matching: learn the permutation that makes the
midpoint of A and B a good model (Git Re-Basin, Ainsworth et al. 2023, §3.3).

A free copy ``θ̃`` of the parameters starts at ``θ_A``. Each step

1. projects ``θ̃`` onto the permutations of B: ``π = weight_matching(θ̃, θ_B)``
   (warm-started at the previous ``π``), so ``θ_Bπ = π(θ_B)`` is the permuted B
   closest to ``θ̃``;
2. evaluates the loss of the midpoint ``½ (θ_A + θ_Bπ)`` on a batch, with the
   straight-through substitution ``θ_Bπ → θ̃ + (θ_Bπ − θ̃).detach()``: the
   forward value is exactly the permuted B, the gradient flows to ``θ̃``;
3. takes an Adam step on ``θ̃``.

The first projection (``θ̃ = θ_A``) is plain weight matching. Candidate
permutations are scored by their midpoint loss on a fixed evaluation slice
(the first ``eval_batches`` batches of ``data``): the weight-matching one, then
every ``eval_every`` steps and at the end of each epoch whenever ``π`` is new;
the best one is returned, so on that slice STE is never worse than weight
matching.

Parameters and buffers
----------------------
Only floating-point *parameters* are optimised. Buffers are not: the
projection target uses A's buffers (so the BatchNorm statistics terms of
weight matching pull towards A), and the midpoint uses the interpolated
buffers ``½ (A + π(B))`` for floating buffers (A's value for integer ones),
as fresh copies that the forward pass may update without touching A or B.
The midpoint runs with every module in eval mode except BatchNorm layers,
which use batch statistics (train mode): the midpoint's own running
statistics are unknown, which is why merged models get
:func:`autobasin.reset_bn_stats` before evaluation.

Under torch.distributed (torchrun), each rank's ``data`` is its shard and the
steps are data-parallel: every step averages the gradients of the ranks' batches
(as DistributedDataParallel does), ranks take the same number of steps (as many
as the shortest shard has batches), the evaluation loss sums every rank's
evaluation batches, and every rank returns rank 0's permutations. So N ranks
equal one process whose step-t batch joins the ranks' step-t batches (equal
batch sizes), not one process stepping through every batch in turn.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ..distributed import (all_sum_floats, average_gradients, broadcast, lockstep,
                           mean_over_ranks, require_every_rank)
from ..guard import check_model_finite, check_model_materialized, unwrap_model
from ..permute import check_perm, apply_permutation
from ..batches import batch_inputs, batch_target, default_loss_fns, model_device
from ..spec import PermutationSpec, Perms
from .result import STEMatching, fill_stats
from .weight import weight_matching



def _key(perms: Perms) -> tuple:
    return tuple((k, tuple(p.tolist())) for k, p in sorted(perms.items()))


def ste_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, data: Iterable,
                 loss_fn: Callable | None = None, epochs: int = 1, lr: float = 1e-3,
                 seed: int = 0, progress: bool = True, stats: dict | None = None,
                 max_steps: int | None = None, *, eval_batches: int = 8, eval_every: int = 10,
                 init: Mapping[str, torch.Tensor] | None = None, max_iter: int = 100,
                 input_fn: Callable | None = None, target_fn: Callable | None = None
                 ) -> STEMatching:
    """Permutations of B's groups that minimise the loss of the A-B midpoint.

    Args:
        spec: the groups to permute.
        a, b: the two models; neither is modified (modes restored). Wrappers
            (``nn.DataParallel``, DDP, ``torch.compile``) are looked through; the
            spec must fit both (:meth:`PermutationSpec.check_fits`, else a
            :class:`SpecError` naming the tensor).
        data: a re-iterable of ``(input, target)`` batches (a DataLoader), read
            ``epochs`` times; see ``input_fn``/``target_fn`` for other layouts.
        loss_fn: ``loss_fn(output, target) -> scalar``; default cross-entropy.
        epochs: passes over ``data``.
        lr: Adam learning rate on ``θ̃``.
        seed: seeds weight matching's sweep order and torch's RNG inside; equal
            seeds (and data order) give equal results.
        progress: show a tqdm bar over steps.
        stats: kept for compatibility: a dict given here receives the result's
            fields (:meth:`~autobasin.match.result.Matching.as_dict`).
        max_steps: stop after this many steps in all.
        eval_batches: how many leading batches of ``data`` score candidates.
        eval_every: score the current ``π`` every this many steps (if new).
        init: starting permutations for the first projection.
        max_iter: most sweeps of each projection.
        input_fn: ``batch -> input tensor or tuple of positional inputs``.
        target_fn: ``batch -> target`` (default: element 1, or a dict's
            ``target``/``label``/... key).

    Returns:
        an :class:`~autobasin.match.result.STEMatching`: the best permutation
        found, ``{group name: CPU LongTensor (n,)}``, with the loss histories as
        attributes.
    """
    start = time.perf_counter()
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    a, b = unwrap_model(a), unwrap_model(b)
    for label, model in (("a", a), ("b", b)):
        check_model_materialized(model, "STE matching", f"model {label}")
        check_model_finite(model, label)
        spec.check_fits(model.state_dict(), f"model {label}")  # a spec of another model
    if loss_fn is None and target_fn is None:  # LM batches: next-token / masked-token loss
        target_fn, loss_fn = default_loss_fns(next(iter(data), None)) or (None, None)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if target_fn is None:
        def target_fn(batch):
            try:
                return batch_target(batch)
            except TypeError:
                raise TypeError(f"STE matching computes a loss, so it needs (input, target) "
                                f"batches (or a dict with a 'target'/'label' key); got a "
                                f"{type(batch).__name__}: pass target_fn=... (and input_fn=...)"
                                ) from None
    device = model_device(a)
    sd_a = {k: v.detach() for k, v in a.state_dict().items()}
    sd_b = {k: v.detach().to(device) for k, v in b.state_dict().items()}

    # θ̃: one leaf per distinct floating parameter, under every name it has
    named = list(a.named_parameters(remove_duplicate=False))
    leaf_of: dict[int, torch.Tensor] = {}
    param_names: dict[str, torch.Tensor] = {}
    for name, p in named:
        if not p.is_floating_point():
            continue
        if id(p) not in leaf_of:
            leaf_of[id(p)] = p.detach().clone().requires_grad_(True)
        param_names[name] = leaf_of[id(p)]
    leaves = list(leaf_of.values())
    if not leaves:
        raise ValueError("model a has no floating-point parameters to optimise")
    buffer_names = [k for k in sd_a if k not in param_names]

    # evaluation slice: the first batches of data, kept
    eval_set = []
    for i, batch in enumerate(data):
        if i >= eval_batches:
            break
        eval_set.append((batch_inputs(batch, input_fn, device, model=a),
                         target_fn(batch).to(device)))
    require_every_rank(bool(eval_set), "ste_matching got no batch on this rank")
    if not eval_set:
        raise ValueError("ste_matching got no batches from data")
    eval_samples = sum(int(t.shape[0]) if t.dim() else 1 for _, t in eval_set)

    modes = {m: m.training for m in a.modules()}

    def set_midpoint_mode():
        a.eval()
        for m in a.modules():
            if isinstance(m, _BatchNorm):
                m.train()

    def project(init_perms):
        target = dict(sd_a)
        for name, t in param_names.items():
            target[name] = t.detach()
        # no init: weight matching's own default start (the plain weight-matching answer)
        kw = {} if init_perms is None else {"init": init_perms}
        return weight_matching(spec, target, sd_b, max_iter=max_iter, seed=seed,
                               progress=False, **kw)

    def midpoint_state(perms, straight_through: bool):
        b_pi = apply_permutation(spec, perms, sd_b)
        state, done = {}, {}
        for name, t in param_names.items():
            if id(t) in done:  # a tied parameter: one tensor under all its names
                state[name] = done[id(t)]  # (functional_call refuses two values for it)
                continue
            other = t + (b_pi[name] - t).detach() if straight_through else b_pi[name]
            state[name] = done[id(t)] = 0.5 * (sd_a[name] + other)
        for name in buffer_names:
            ta = sd_a[name]
            if ta.is_floating_point():
                state[name] = 0.5 * (ta + b_pi[name])
            else:
                state[name] = ta.clone()
        return state

    def eval_loss(perms) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            state = midpoint_state(perms, straight_through=False)
            for args, target in eval_set:
                out = functional_call(a, state, args.args, args.kwargs)
                n = int(target.shape[0]) if target.dim() else 1
                total += float(loss_fn(out, target)) * n
                count += n
        total, count = all_sum_floats(total, count)  # every rank's evaluation batches
        return total / count

    history: list[float] = []
    eval_history: list[tuple[int, float]] = []
    seen: set = set()
    best: tuple[float, int, Perms] | None = None
    perm_changes = 0
    step = 0

    def consider(perms, at_step):
        nonlocal best
        key = _key(perms)
        if key in seen:
            return
        seen.add(key)
        value = eval_loss(perms)
        eval_history.append((at_step, value))
        if best is None or value < best[0]:
            best = (value, at_step, {k: v.clone() for k, v in perms.items()})

    optimizer = torch.optim.Adam(leaves, lr=lr)
    init_perms = None
    if init is not None:
        init_perms = {k: check_perm(k, v, spec.groups[k].size) for k, v in init.items()
                      if k in spec.groups}
    total = max_steps
    if total is None and hasattr(data, "__len__"):
        total = epochs * len(data)
    bar = tqdm(total=total, desc="STE matching", unit="step", disable=not progress)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            set_midpoint_mode()
            perms = project(init_perms)
            consider(perms, 0)
            done = False
            for _ in range(epochs):
                for batch in lockstep(data):  # ranks take the same steps
                    if max_steps is not None and step >= max_steps:
                        done = True
                        break
                    if step > 0:
                        new = project(perms)
                        if any(not torch.equal(new[k], perms[k]) for k in perms):
                            perm_changes += 1
                        perms = new
                    args = batch_inputs(batch, input_fn, device, model=a)
                    target = target_fn(batch).to(device)
                    state = midpoint_state(perms, straight_through=True)
                    loss = loss_fn(functional_call(a, state, args.args, args.kwargs), target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    average_gradients(leaves)  # under torch.distributed: data-parallel steps
                    optimizer.step()
                    history.append(mean_over_ranks(float(loss.detach())))
                    step += 1
                    if eval_every and step % eval_every == 0:
                        consider(perms, step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
                # the projection of the epoch's final θ̃
                perms = project(perms)
                consider(perms, step)
                if done:
                    break
    finally:
        bar.close()
        for m, training in modes.items():
            m.training = training

    value, best_step, best_perms = best
    best_perms = broadcast(best_perms)  # solved once: rank 0's, on every rank
    result = STEMatching(
        perms={k: v.long().cpu() for k, v in best_perms.items()}, method="ste", steps=step,
        epochs=epochs, loss_history=history, eval_history=eval_history,
        weight_matching_eval_loss=eval_history[0][1], best_eval_loss=value, best_step=best_step,
        perm_changes=perm_changes, eval_samples=eval_samples, seconds=time.perf_counter() - start)
    fill_stats(stats, result)
    return result
