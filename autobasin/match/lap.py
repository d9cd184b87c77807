"""Linear assignment: the inner solver of every matcher."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def solve_lap(similarity: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i similarity[i, perm[i]]``.

    ``similarity`` is a square (n, n) tensor on any device and of any floating
    dtype; it is solved on a float64 NumPy copy with
    :func:`scipy.optimize.linear_sum_assignment`. Returns a CPU LongTensor of
    shape (n,). ``name`` (the group being solved) only appears in error messages.

    >>> solve_lap(torch.tensor([[0., 1.], [1., 0.]]))
    tensor([1, 0])
    """
    where = f" for group {name!r}" if name is not None else ""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity matrix{where} must be square, got shape {tuple(similarity.shape)}")
    cost = similarity.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(cost).all():
        bad = "NaN" if np.isnan(cost).any() else "Inf"
        raise ValueError(f"similarity matrix{where} contains {bad}; are the weights finite?")
    rows, cols = linear_sum_assignment(cost, maximize=True)
    # rows come back sorted as 0..n-1 for a square matrix, so cols is the permutation.
    assert np.array_equal(rows, np.arange(cost.shape[0]))
    return torch.from_numpy(cols.astype(np.int64))
