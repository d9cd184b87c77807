"""Positions along an axis (topk / argmax indices) clamped to [0, n-1] are
still positions: the clamp never changes a valid one, so the axis they index
stays free. Any other bound reads them as numbers and fixes the axis."""
import pytest
import torch
from torch import nn

import autobasin as ab
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_


class ClampedPick(nn.Module):
    """Pick rows of a table by the positions of the largest of 6 scores,
    clamped as ``how`` says."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.score, self.table, self.out = nn.Linear(8, 6), nn.Parameter(torch.randn(6, 5)), nn.Linear(5, 2)

    def forward(self, x):
        idx = self.score(x).topk(2, dim=-1).indices       # (B, 2) positions along the 6 scores
        if self.how == "max":
            idx = idx.clamp_max(5)
        elif self.how == "min":
            idx = idx.clamp_min(0)
        elif self.how == "both":
            idx = torch.clamp(idx, 0, 5)
        elif self.how == "kw":
            idx = idx.clamp(max=5)
        elif self.how == "low":  # changes position 5 into 4: reads them as numbers
            idx = idx.clamp_max(4)
        elif self.how == "shift":  # a lower bound of 1 changes position 0
            idx = idx.clamp(1, 5)
        return self.out(self.table[idx].sum(1))


def _size6(spec):
    return [g for g in spec.groups.values() if g.size == 6]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", ["max", "min", "both", "kw"])
def test_clamp_to_the_axis_keeps_positions(how, capture):
    torch.manual_seed(0)
    model = randomize_state_(ClampedPick(how).eval(), 0, 0.3)
    x = torch.randn(4, 8)
    spec = infer_spec(model, x, capture=capture)
    (group,) = _size6(spec)
    assert {(m.param, m.axis) for m in group.members} == {("score.weight", 0), ("score.bias", 0), ("table", 0)}
    for seed in range(4):
        assert ab.check_equivalence(model, spec, torch.randn(4, 8), seed=seed) <= 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", ["low", "shift"])
def test_clamp_that_may_move_a_position_fixes_the_axis(how, capture):
    torch.manual_seed(0)
    model = randomize_state_(ClampedPick(how).eval(), 0, 0.3)
    x = torch.randn(4, 8)
    spec = infer_spec(model, x, capture=capture)
    assert not _size6(spec), str(spec)
    for seed in range(3):
        assert ab.check_equivalence(model, spec, torch.randn(4, 8), seed=seed) <= 1e-5
