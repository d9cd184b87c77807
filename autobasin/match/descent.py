"""Permutation coordinate descent: the loop weight and activation matching share.

Each sweep visits the groups in a random order (seeded); for a group ``g`` it
asks the caller for ``g``'s similarity matrix at the other groups' current
permutations, solves the linear assignment, and takes the new permutation only
when it raises ``sum_i S[i, perm[i]]`` by more than a relative 1e-12 (so
rounding cannot make it cycle). It stops after a sweep that changed nothing, or
when the caller's ``after_sweep`` says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..spec import Perms
from .lap import solve_lap

REL_TOL = 1e-12


@dataclass
class Descent:
    sweeps: int = 0
    converged: bool = False
    lap_seconds: float = 0.0


def gain(s: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> float | None:
    """How much ``new`` beats ``old`` on ``sum_i s[i, perm[i]]`` (in float64), or
    None when it does not by more than rounding."""
    rows = torch.arange(s.shape[0], device=s.device)
    old_v = float(s[rows, old.to(s.device)].double().sum())
    new_v = float(s[rows, new].double().sum())
    return new_v - old_v if new_v - old_v > REL_TOL * max(abs(old_v), abs(new_v)) else None


def coordinate_descent(names: Sequence[str], similarity: Callable[[str], torch.Tensor | None],
                       perms: Perms, *, max_iter: int, seed: int,
                       on_change: Callable[[str], None] | None = None,
                       after_sweep: Callable[[float], bool] | None = None) -> Descent:
    """Improve ``perms`` (in place) one group at a time.

    ``similarity(g)``: group ``g``'s (n, n) similarity at the current ``perms``,
    or None to skip ``g`` this time (nothing would change). ``on_change(g)`` is
    called after ``perms[g]`` took a new value; ``after_sweep(gain)`` after every
    sweep with the sum of its steps' gains in ``sum_i S[i, perm[i]]``, and a True
    answer stops the descent as converged (a tolerance).
    The new permutation is put on the device of ``perms[g]``.
    """
    out = Descent()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        out.sweeps += 1
        improved, total = False, 0.0
        for k in torch.randperm(len(names), generator=gen).tolist():
            g = names[k]
            s = similarity(g)
            if s is None:
                continue
            t0 = time.perf_counter()
            new = solve_lap(s, name=g).to(s.device)
            out.lap_seconds += time.perf_counter() - t0
            step = gain(s, perms[g], new)
            if step is not None:
                perms[g] = new.to(perms[g].device)
                improved, total = True, total + step
                if on_change is not None:
                    on_change(g)
        stop = after_sweep(total) if after_sweep is not None else False
        if not improved or stop:
            out.converged = True
            break
    return out
