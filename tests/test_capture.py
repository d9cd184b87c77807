"""Symmetries that were blocked before the torch.export front end and the
rules that came with it. Each case is checked by function: random
permutations of every group, outputs compared, with every parameter and
buffer non-trivial."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autobasin as ab
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_


class GRUFinalState(nn.Module):
    """``_, h = gru(x); fc(h[-1])``: the final state is read."""

    def __init__(self):
        super().__init__()
        self.gru, self.fc = nn.GRU(8, 16, num_layers=2, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        _, h = self.gru(x)
        return self.fc(h[-1])


class LSTMInitialState(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.lstm, self.fc = nn.Linear(4, 8), nn.LSTM(8, 16, bidirectional=True), nn.Linear(32, 3)
        self.h0 = nn.Linear(4, 16)

    def forward(self, x):
        h0 = self.h0(x[0]).expand(2, -1, -1).contiguous()
        out, (h, c) = self.lstm(self.inp(x), (h0, torch.zeros_like(h0)))
        return self.fc(out[-1]) + h.sum(0).sum(-1, keepdim=True) + c.mean()


class CellLoop(nn.Module):
    """A Python loop over an LSTMCell at the top level (fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.LSTMCell(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 16)
        c = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


class GRUCellNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.GRUCell(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.cell(x[:, 0])
        return self.fc(self.cell(x[:, 1], h))


class T5Norm(nn.Module):
    """RMSNorm with a dtype check on its weight (transformers' T5LayerNorm)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x, weight)`` with weight (in, out)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        shape = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


class SparseMoE(nn.Module):
    """Top-1 routing with ``torch.where`` and ``index_add``."""

    def __init__(self):
        super().__init__()
        self.inp, self.router, self.out = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 3)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
                                     for _ in range(4))

    def forward(self, x):
        h = self.inp(x)
        choice = self.router(h).argmax(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tokens = torch.where(choice == e)[0]
            out = out.index_add(0, tokens, expert(h[tokens]))
        return self.out(h + out)


def seq(*layers):
    return lambda: nn.Sequential(*layers)


CASES = {
    # name: (model factory, input, least coverage, capture that must win under "auto")
    "gru_final_state": (GRUFinalState, torch.randn(2, 5, 8), 1.0, "fx"),
    "lstm_initial_state": (LSTMInitialState, torch.randn(5, 2, 4), 1.0, "fx"),
    "lstm_cell_loop": (CellLoop, torch.randn(2, 5, 8), 1.0, "export"),
    "gru_cell": (GRUCellNet, torch.randn(2, 3, 8), 1.0, None),
    "encoder_layer_in_sequential": (
        lambda: nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(
            16, 4, 32, batch_first=True, dropout=0.0), nn.Linear(16, 3)),
        torch.randn(2, 5, 8), 1.0, "export"),
    "weight_norm_hook": (lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 16)), nn.ReLU(),
                                               nn.Linear(16, 3)), torch.randn(4, 8), 1.0, "export"),
    "weight_norm_parametrization": (
        lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 16)), nn.ReLU(),
                              nn.Linear(16, 3)), torch.randn(4, 8), 1.0, "export"),
    "spectral_norm": (lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(8, 16)),
                                            nn.ReLU(), nn.Linear(16, 3)), torch.randn(4, 8), 1.0, "export"),
    "t5_layer_norm": (lambda: nn.Sequential(nn.Linear(8, 16), T5Norm(16), nn.Linear(16, 3)),
                      torch.randn(4, 8), 1.0, "export"),
    "gpt2_conv1d": (lambda: nn.Sequential(Conv1D(8, 16), nn.GELU(), Conv1D(16, 3)),
                    torch.randn(2, 5, 8), 1.0, None),
    # the experts' units and the residual stream permute; the router's rows stay
    # (its argmax is compared with expert numbers), with that reason given
    "sparse_moe": (SparseMoE, torch.randn(6, 8), 0.95, None),
    "pixel_shuffle": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(16, 16, 3, padding=1), nn.PixelShuffle(2),
                                            nn.Conv2d(4, 3, 3)), torch.randn(2, 3, 8, 8), 1.0, None),
    "pixel_unshuffle": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.PixelUnshuffle(2),
                                              nn.ReLU(), nn.Conv2d(16, 3, 1)),
                        torch.randn(2, 3, 8, 8), 1.0, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_before_now_exact_with_every_symmetry(name):
    make, x, least, front = CASES[name]
    torch.manual_seed(0)
    model = randomize_state_(make().eval(), 0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, x)
    assert spec.groups, spec.fixed_axes()[:4]
    for seed in (0, 1):
        assert ab.check_equivalence(model, spec, seed=seed) <= 1e-4
    assert spec.coverage() >= least, spec.fixed_axes()[:4]
    assert len(spec.fixed_axes()) == 0 or spec.coverage() < 1.0
    if front is not None:
        assert spec._inference.capture == front


def test_rnn_final_state_shares_one_permutation_across_layers():
    torch.manual_seed(0)
    model = randomize_state_(GRUFinalState().eval(), 0, 0.3)
    spec = infer_spec(model, torch.randn(2, 5, 8))
    (group,) = [g for g in spec.groups.values() if g.size == 16]
    params = {m.param for m in group.members}
    assert {"gru.weight_hh_l0", "gru.weight_hh_l1", "fc.weight"} <= params


def test_pixel_shuffle_keeps_whole_blocks_of_r_squared_channels_together():
    torch.manual_seed(0)
    make, x, _, _ = CASES["pixel_shuffle"]
    model = make().eval()
    spec = infer_spec(model, x)
    conv = [m for g in spec.groups.values() for m in g.members if m.param == "2.weight" and m.axis == 0]
    assert [(m.shape, m.dim) for m in conv] == [((4, 2, 2), 0)]  # 4 channels of 2x2 offsets



def test_positions_compared_as_numbers_fix_their_axis_and_say_why():
    torch.manual_seed(0)
    model = randomize_state_(SparseMoE().eval(), 0, 0.3)
    spec = infer_spec(model, torch.randn(6, 8))
    reasons = dict(spec.fixed_axes())
    assert "uses positions along the axis as numbers" in reasons["router.weight[0]"]


class TopkGather(nn.Module):
    """Pick rows of a table by the positions of the largest scores."""

    def __init__(self):
        super().__init__()
        self.score, self.table, self.out = nn.Linear(8, 6), nn.Parameter(torch.randn(6, 5)), nn.Linear(5, 2)

    def forward(self, x):
        idx = self.score(x).topk(2, dim=-1).indices       # (B, 2) positions along the 6 scores
        return self.out(self.table[idx].sum(1)) + self.out(nn.functional.embedding(idx, self.table).mean(1))


def test_topk_indices_index_the_axis_they_rank():
    torch.manual_seed(0)
    model = randomize_state_(TopkGather().eval(), 0, 0.3)
    for capture in ("fx", "export"):
        spec = infer_spec(model, torch.randn(4, 8), capture=capture)
        (group,) = [g for g in spec.groups.values() if g.size == 6]
        assert {(m.param, m.axis) for m in group.members} == {("score.weight", 0), ("score.bias", 0),
                                                              ("table", 0)}
        for seed in (0, 1):
            assert ab.check_equivalence(model, spec, seed=seed) <= 1e-5
