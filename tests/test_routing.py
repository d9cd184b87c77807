"""Routing among more classes than experts with the extra slots muted
(LongCat-Flash's zero-computation experts, ZAYA's skip expert): the real
experts permute with their router rows, the extra classes among themselves;
where the muting is missing or the muted rows leak, the experts stay fixed."""
import pytest
import torch
from torch import nn

import autobasin as ab
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_

E, D, H = 4, 8, 6


class MutedRouting(nn.Module):
    """Top-2 routing over ``E + extra`` classes; a slot that picks an extra
    class is sent to a real expert and its weight set to zero (``style``:
    ``"where"`` as LongCat-Flash, ``"fill"`` as ZAYA). ``fault``: ``"unmuted"``
    keeps the weight; ``"leak"`` also adds the mean of the experts' rows before
    the weights are applied."""

    def __init__(self, style, extra, fault=None):
        super().__init__()
        self.style, self.extra, self.fault = style, extra, fault
        self.inp, self.out = nn.Linear(5, D), nn.Linear(D, 3)
        self.router = nn.Linear(D, E + extra)
        self.w1, self.w2 = nn.Parameter(torch.randn(E, H, D)), nn.Parameter(torch.randn(E, D, H))

    def forward(self, x):
        h = self.inp(x)
        scores = self.router(h).softmax(-1)
        w, idx = scores.topk(2, dim=-1)
        if self.style == "where":
            mask = idx >= E
            kept = w.masked_fill(~mask, 0.0).sum(-1, keepdim=True)
            idx = torch.where(mask, (idx - E) * E // self.extra, idx)
        else:
            mask = idx == E
            kept = None
            idx = idx.masked_fill(mask, 0)
        if self.fault != "unmuted":
            w = w.masked_fill(mask, 0.0)
        flat = idx.reshape(-1)
        rows = h.repeat_interleave(2, dim=0)
        u = torch.relu(torch.bmm(self.w1[flat], rows.unsqueeze(-1)).squeeze(-1))
        y = torch.bmm(self.w2[flat], u.unsqueeze(-1)).squeeze(-1)
        mixed = (y * w.reshape(-1, 1)).view(-1, 2, D).sum(1)
        if self.fault == "leak":
            mixed = mixed + y.mean(0)
        if kept is not None:
            mixed = mixed + h * kept
        return self.out(h + mixed)


def _model(style, extra, fault=None):
    torch.manual_seed(0)
    return randomize_state_(MutedRouting(style, extra, fault).eval(), 0, 0.5)


def _groups_on(spec, param, axis=0):
    return [g for g in spec.groups.values() if any(m.param == param and m.axis == axis for m in g.members)]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("style,extra", [("where", 3), ("fill", 1)])
def test_real_experts_permute_with_their_router_rows(style, extra, capture):
    model = _model(style, extra)
    x = torch.randn(12, 5)
    hits = model.router(model.inp(x)).topk(2, dim=-1).indices >= E
    assert hits.any() and not hits.all()  # the example routes to both kinds of class
    spec = infer_spec(model, x, capture=capture)
    (experts,) = _groups_on(spec, "w1")
    members = {(m.param, m.axis, m.offset, m.size) for m in experts.members}
    assert {("w1", 0, 0, E), ("w2", 0, 0, E), ("router.weight", 0, 0, E),
            ("router.bias", 0, 0, E)} <= members, str(spec)
    extras = [g for g in _groups_on(spec, "router.weight") if g is not experts]
    assert [g.size for g in extras] == ([extra] if extra > 1 else []), str(spec)
    for seed in range(4):
        assert ab.check_equivalence(model, spec, torch.randn(12, 5), seed=seed) <= 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("fault", ["unmuted", "leak"])
def test_unmuted_or_leaking_garbage_rows_fix_the_experts(fault, capture):
    model = _model("where", 3, fault)
    x = torch.randn(12, 5)
    spec = infer_spec(model, x, capture=capture)
    assert not _groups_on(spec, "w1", 0), str(spec)
    reasons = " ".join(r for _, r in spec.fixed_axes())
    assert "positions" in reasons, reasons
    for seed in range(3):
        assert ab.check_equivalence(model, spec, torch.randn(12, 5), seed=seed) <= 1e-5


def test_the_unmuted_model_really_changes_under_an_expert_permutation():
    """The negative cases are not vacuous: permuting the real experts (and
    their router rows) of the unmuted model changes what it computes."""
    model = _model("where", 3, "unmuted")
    x = torch.randn(12, 5)
    ref = model(x)
    perm = torch.tensor([1, 0, 3, 2])
    rows = torch.cat([perm, torch.arange(E, E + 3)])
    with torch.no_grad():
        model.w1.copy_(model.w1[perm])
        model.w2.copy_(model.w2[perm])
        model.router.weight.copy_(model.router.weight[rows])
        model.router.bias.copy_(model.router.bias[rows])
    assert (model(x) - ref).abs().max() > 1e-3


class SortedDispatch(nn.Module):
    """Top-2 routing dispatched as ScatterMoE / JetMoE do: picks sorted by
    expert, rows gathered in that order, split by the picks' histogram, each
    piece times its expert's weight, rows put back with ``index_add``.
    ``fault`` breaks one link: ``"flipped"`` sizes, ``"other_counts"`` sizes
    counted from other picks, a ``"descending"`` sort,
    ``"shifted"`` weights (piece e meets expert e + 1), ``"sorted_out"`` rows
    returned in sorted order."""

    def __init__(self, fault=None):
        super().__init__()
        self.fault = fault
        self.inp, self.out = nn.Linear(5, D), nn.Linear(D, 3)
        self.router = nn.Linear(D, E, bias=False)
        self.w1, self.w2 = nn.Parameter(torch.randn(E, 2 * H, D)), nn.Parameter(torch.randn(E, D, H))

    def grouped(self, rows, w, sizes):
        pieces = rows.split(sizes, dim=0)
        shift = 1 if self.fault == "shifted" else 0
        return torch.cat([nn.functional.linear(pieces[e], w[(e + shift) % E]) for e in range(E)])

    def forward(self, x):
        h = self.inp(x)
        top_w, top_i = self.router(h).topk(2, dim=1)
        gates = top_w.softmax(1)
        counts = torch.zeros(h.shape[0], E).scatter(1, top_i, 1).long().sum(0)
        if self.fault == "other_counts":  # the histogram of other picks of the same scores
            low = (-self.router(h)).topk(2, dim=1)[1]
            counts = torch.zeros(h.shape[0], E).scatter(1, low, 1).long().sum(0)
        if self.fault == "flipped":
            counts = counts.flip(0)
        order = top_i.flatten().sort(0, descending=self.fault == "descending")[1]
        tok = order.div(2, rounding_mode="trunc")
        sizes = counts.tolist()
        a, b = self.grouped(h[tok], self.w1, sizes).chunk(2, dim=-1)
        y = self.grouped(nn.functional.silu(a) * b, self.w2, sizes) * gates.flatten()[order][:, None]
        if self.fault == "sorted_out":
            return self.out(h + y[:h.shape[0]])
        return self.out(h + torch.zeros_like(h).index_add(0, tok, y))


def _sorted_model(fault=None):
    torch.manual_seed(0)
    return randomize_state_(SortedDispatch(fault).eval(), 0, 0.5)


def test_experts_dispatched_by_sorting_permute_with_their_router_rows():
    model = _sorted_model()
    x = torch.randn(12, 5)
    spec = infer_spec(model, x)
    (experts,) = _groups_on(spec, "w1")
    assert {(m.param, m.axis) for m in experts.members} == {("w1", 0), ("w2", 0), ("router.weight", 0)}
    assert _groups_on(spec, "w1", 1) and _groups_on(spec, "inp.weight", 0), str(spec)
    for seed in range(4):
        assert ab.check_equivalence(model, spec, torch.randn(12, 5), seed=seed) <= 1e-5


@pytest.mark.parametrize("fault", ["flipped", "other_counts", "descending", "shifted", "sorted_out"])
def test_a_broken_sorted_dispatch_fixes_the_experts(fault):
    model = _sorted_model(fault)
    x = torch.randn(12, 5)
    spec = infer_spec(model, x)
    assert not _groups_on(spec, "w1", 0), str(spec)
    for seed in range(3):
        assert ab.check_equivalence(model, spec, torch.randn(12, 5), seed=seed) <= 1e-5
