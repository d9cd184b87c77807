"""Linear assignment: the inner solver of every matcher.

Two solvers give the same optimum: :func:`scipy.optimize.linear_sum_assignment`
(always there) and the ``lapjv`` package (src-d's Jonker-Volgenant with AVX2,
``pip install autobasin[fast]``), which on weight matching's similarity
matrices is 2.5x faster (resnet50's 400 assignments: 1.1 s vs 2.8 s on two
cores; ``benchmarks/scale.py`` measures it). ``lapjv`` is used when it is
installed; ``AUTOBASIN_LAP=scipy`` (or ``lapjv``) in the environment, or
:func:`set_solver`, chooses one. We do not write a solver of our own: both
are well kept, and the assignment is not where a bespoke one would win.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SOLVERS = ("scipy", "lapjv")
_chosen: str | None = None


def available_solvers() -> list[str]:
    """The solvers this environment can run, scipy first."""
    return [s for s in SOLVERS if s == "scipy" or importable(s)]


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def set_solver(name: str | None) -> None:
    """Use ``name`` ("scipy" or "lapjv") from now on; None restores the default."""
    global _chosen
    if name is not None:
        _check(name)
    _chosen = name


def _check(name: str) -> None:
    if name not in SOLVERS:
        raise ValueError(f"unknown assignment solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if name == "lapjv" and not importable("lapjv"):
        raise ValueError("assignment solver 'lapjv' is not installed: pip install 'autobasin[fast]' "
                         "(or pip install lapjv), or use 'scipy'")


def current_solver() -> str:
    """The solver :func:`solve_lap` uses: set_solver's choice, else ``AUTOBASIN_LAP``,
    else lapjv when installed, else scipy."""
    name = _chosen or os.environ.get("AUTOBASIN_LAP") or None
    if name is not None:
        _check(name)
        return name
    return "lapjv" if importable("lapjv") else "scipy"


def solve_lap(similarity: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i similarity[i, perm[i]]``.

    ``similarity`` is a square (n, n) tensor on any device and of any floating
    dtype; it is solved on a NumPy copy by :func:`current_solver` (scipy: in
    float64; lapjv: in float64 when ``similarity`` is float64, else float32).
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
    if s.shape[0] > 1 and current_solver() == "lapjv":
        from lapjv import lapjv
        # it minimises; a float64 similarity is solved in float64, any other in
        # float32 (the precision it was computed in; 1.5x faster than doubles)
        double = s.dtype == torch.float64
        t = s if double or s.dtype == torch.float32 else s.float()
        if t.is_contiguous() and not similarity.requires_grad:
            # negated in place and back (exact in floating point): no (n, n) copy
            t.neg_()
            try:
                cols = np.asarray(lapjv(t.numpy(), force_doubles=double)[0])
            finally:
                t.neg_()
        else:
            cols = np.asarray(lapjv((-t).contiguous().numpy(), force_doubles=double)[0])
        if not np.array_equal(np.sort(cols), np.arange(s.shape[0])):
            raise RuntimeError(f"lapjv returned no permutation{where}; set AUTOBASIN_LAP=scipy")
    else:
        rows, cols = linear_sum_assignment(s.double().numpy(), maximize=True)
        # rows come back sorted as 0..n-1 for a square matrix, so cols is the permutation.
        assert np.array_equal(rows, np.arange(s.shape[0]))
    return torch.from_numpy(cols.astype(np.int64))
