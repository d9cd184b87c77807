"""Linear assignment: the inner solver of every matcher.

Three solvers give the same optimum: :func:`scipy.optimize.linear_sum_assignment`
(always there); ``lapx`` (``pip install autobasin[fast]``; its ``lapjvr``, a
Jonker-Volgenant solver in Rust with float64 potentials, which reads a float32
matrix as it is); and src-d's ``lapjv`` package. On the assignments weight
matching solves (one run's matrices, solved again by each) lapx takes 0.45 s
on resnet50's 400 where lapjv takes 0.95 s and scipy 2.8 s, 3.8 s on
convnext_base's 44 (lapjv 4.3 s) and as long as lapjv on vit_base's 62 (3.1 s;
its MLP groups of 3072). lapx's other completions were no faster (``lapjvh``
slower on vit_base, ``lapjvs`` and ``lapjvx`` slower on all three). The
fastest installed is used; ``AUTOBASIN_LAP=scipy`` (or ``lapjv``, ``lapx``) in
the environment, or :func:`set_solver`, chooses one;
``benchmarks/scale.py`` times each one installed. We do not write a solver of
our own: these are well kept, and the assignment is not where a bespoke one
would win.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SOLVERS = ("scipy", "lapjv", "lapx")
_MODULES = {"lapjv": "lapjv", "lapx": "lap"}  # lapx installs the module ``lap``
_chosen: str | None = None


def available_solvers() -> list[str]:
    """The solvers this environment can run, scipy first."""
    return [s for s in SOLVERS if installed(s)]


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def installed(solver: str) -> bool:
    """Whether ``solver`` can run here (``lap`` without ``lapjvr`` is gatagat's
    older package of that name, or a lapx before 0.11)."""
    if solver == "scipy":
        return True
    if not importable(_MODULES[solver]):
        return False
    return solver != "lapx" or hasattr(importlib.import_module("lap"), "lapjvr")


def set_solver(name: str | None) -> None:
    """Use ``name`` ("scipy", "lapjv" or "lapx") from now on; None restores the default."""
    global _chosen
    if name is not None:
        _check(name)
    _chosen = name


def _check(name: str) -> None:
    if name not in SOLVERS:
        raise ValueError(f"unknown assignment solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if not installed(name):
        hint = "pip install 'autobasin[fast]' (or pip install lapx)" if name == "lapx" else "pip install lapjv"
        raise ValueError(f"assignment solver {name!r} is not installed: {hint}, or use 'scipy'")


def current_solver() -> str:
    """The solver :func:`solve_lap` uses: set_solver's choice, else ``AUTOBASIN_LAP``,
    else the fastest installed: lapx, lapjv, scipy."""
    name = _chosen or os.environ.get("AUTOBASIN_LAP") or None
    if name is not None:
        _check(name)
        return name
    return _fastest()


@functools.cache
def _fastest() -> str:
    return next(s for s in ("lapx", "lapjv", "scipy") if installed(s))


def solve_lap(similarity: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i similarity[i, perm[i]]``.

    ``similarity`` is a square (n, n) tensor on any device and of any floating
    dtype; it is solved on a NumPy copy by :func:`current_solver` (scipy: in
    float64; lapjv: in float64 when ``similarity`` is float64, else float32;
    lapx: float64 and float32 costs as they are, float64 potentials).
    Returns a CPU LongTensor of shape (n,). ``name`` (the group being solved)
    only appears in error messages.

    >>> solve_lap(torch.tensor([[0., 1.], [1., 0.]]))
    tensor([1, 0])
    """
    where = f" for group {name!r}" if name is not None else ""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity matrix{where} must be square, got shape {tuple(similarity.shape)}")
    s = similarity.detach().cpu()
    # one reduction first: its sum is finite when every entry is (short of overflow)
    if not math.isfinite(float(s.sum())) and not bool(torch.isfinite(s).all()):
        bad = "NaN" if bool(s.isnan().any()) else "Inf"
        raise ValueError(f"similarity matrix{where} contains {bad}; are the weights finite?")
    solver = current_solver() if s.shape[0] > 1 else "scipy"
    if solver in ("lapjv", "lapx"):
        # both minimise; a float64 similarity is solved in float64, any other in
        # float32 (the precision it was computed in; 1.5x faster than doubles)
        double = s.dtype == torch.float64
        t = s if double or s.dtype == torch.float32 else s.float()
        solve = _lapx if solver == "lapx" else _lapjv
        if t.is_contiguous() and not similarity.requires_grad:
            # negated in place and back (exact in floating point): no (n, n) copy
            t.neg_()
            try:
                cols = solve(t.numpy(), double)
            finally:
                t.neg_()
        else:
            cols = solve((-t).contiguous().numpy(), double)
        if not np.array_equal(np.sort(cols), np.arange(s.shape[0])):
            raise RuntimeError(f"{solver} returned no permutation{where}; set AUTOBASIN_LAP=scipy")
    else:
        rows, cols = linear_sum_assignment(s.double().numpy(), maximize=True)
        # rows come back sorted as 0..n-1 for a square matrix, so cols is the permutation.
        assert np.array_equal(rows, np.arange(s.shape[0]))
    return torch.from_numpy(cols.astype(np.int64))


def _lapjv(cost: np.ndarray, double: bool) -> np.ndarray:
    from lapjv import lapjv
    return np.asarray(lapjv(cost, force_doubles=double)[0])


def _lapx(cost: np.ndarray, double: bool) -> np.ndarray:
    import lap
    rows, cols = lap.lapjvr(cost, return_cost=False)  # float32 and float64 solved as given
    if not np.array_equal(rows, np.arange(cost.shape[0])):
        raise RuntimeError("lapx left a row unassigned")
    return np.asarray(cols)
