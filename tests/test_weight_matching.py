"""Weight matching, the LAP solver and auto_rebasin on hand-written specs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from autobasin import (EquivalenceError, Group, Member, PermutationSpec, SpecError,
                       apply_permutation, auto_rebasin, random_permutation, weight_matching)
from autobasin.api import MATCHERS, ArchitectureMismatchError
from autobasin.match import Matcher, Matching
from autobasin.match import solve_lap
from autobasin.spec import TensorInfo


# ------------------------------------------------------------------- helpers
def plain(param: str, axis: int, n: int) -> Member:
    return Member(param, axis, 0, (n,), (1,), 0)


def tensor_infos(model: nn.Module) -> dict[str, TensorInfo]:
    params = dict(model.named_parameters())
    return {k: TensorInfo(tuple(v.shape), k in params, v.is_floating_point())
            for k, v in model.state_dict().items()}


def make_mlp(sizes=(20, 16, 16, 5), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_spec(model: nn.Sequential) -> PermutationSpec:
    """Hidden units of each Linear: its weight rows, bias and the next weight's columns."""
    linears = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    groups = []
    for this, nxt in zip(linears, linears[1:]):
        n = getattr(model, this).out_features
        groups.append(Group(f"{this}:out", n, [plain(f"{this}.weight", 0, n),
                                               plain(f"{this}.bias", 0, n),
                                               plain(f"{nxt}.weight", 1, n)]))
    return PermutationSpec(groups, tensor_infos(model))


class HeadsAndSegment(nn.Module):
    """fc1's 20 outputs are a 3-heads x 4-dims grid (0..11) then an 8-unit segment (12..19)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def heads_spec(model: HeadsAndSegment) -> PermutationSpec:
    def on(param, axis):
        return {"heads": Member(param, axis, 0, (3, 4), (4, 1), 0),
                "head_dim": Member(param, axis, 0, (3, 4), (4, 1), 1),
                "tail": Member(param, axis, 12, (8,), (1,), 0)}
    w1, b1, w2 = on("fc1.weight", 0), on("fc1.bias", 0), on("fc2.weight", 1)
    groups = [Group(name, size, [w1[name], b1[name], w2[name]])
              for name, size in (("heads", 3), ("head_dim", 4), ("tail", 8))]
    return PermutationSpec(groups, tensor_infos(model))


class TwoSegments(nn.Module):
    """fc1's 14 outputs are two segments, 0..5 and 6..13 (a concat), each with its own group."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 14)
        self.fc2 = nn.Linear(14, 6)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.cat([torch.relu(h[:, :6]), torch.sigmoid(h[:, 6:])], 1))


def segments_spec(model: TwoSegments) -> PermutationSpec:
    def seg(param, axis, offset, n):
        return Member(param, axis, offset, (n,), (1,), 0)
    groups = [Group(name, n, [seg("fc1.weight", 0, off, n), seg("fc1.bias", 0, off, n),
                              seg("fc2.weight", 1, off, n)])
              for name, off, n in (("left", 0, 6), ("right", 6, 8))]
    return PermutationSpec(groups, tensor_infos(model))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def convbn_spec(model: ConvBN) -> PermutationSpec:
    def bn(name, n):
        return [plain(f"{name}.{k}", 0, n) for k in ("weight", "bias", "running_mean", "running_var")]
    groups = [Group("conv1:out", 8, [plain("conv1.weight", 0, 8), plain("conv1.bias", 0, 8),
                                     *bn("bn1", 8), plain("conv2.weight", 1, 8)]),
              Group("conv2:out", 6, [plain("conv2.weight", 0, 6), *bn("bn2", 6),
                                     plain("fc.weight", 1, 6)])]
    return PermutationSpec(groups, tensor_infos(model))


def trained_like_convbn(seed=0) -> ConvBN:
    torch.manual_seed(seed)
    model = ConvBN()
    for m in (model.bn1, model.bn2):  # non-trivial statistics, so they carry signal
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(7)
    return model


def plant(spec, state, seed=1, noise=0.0):
    """B = A permuted at random (+ noise); returns B and the perms that align B to A."""
    true = random_permutation(spec, seed)
    b = apply_permutation(spec, true, state)
    if noise:
        gen = torch.Generator().manual_seed(seed)
        b = {k: v + noise * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in b.items()}
    return b, {k: torch.argsort(p) for k, p in true.items()}


def assert_same_state(x, y, atol=0.0):
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0.0, msg=k)


def objective(spec, a, b, perms) -> float:
    aligned = apply_permutation(spec, perms, b)
    params = spec.members_by_param()
    return sum(float((a[k].double() * aligned[k].double()).sum()) for k in params)


# ----------------------------------------------------------------------- LAP
def test_solve_lap_maximises():
    s = torch.tensor([[1.0, 5.0, 0.0], [4.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert solve_lap(s).tolist() == [1, 0, 2]
    perm = solve_lap(torch.randn(30, 30, dtype=torch.float16))
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(30))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_solve_lap_rejects_non_finite(bad):
    s = torch.zeros(4, 4)
    s[1, 2] = bad
    with pytest.raises(ValueError, match="fc1:out"):
        solve_lap(s, name="fc1:out")


# ----------------------------------------------------------- weight matching
@pytest.mark.parametrize("noise", [0.0, 1e-4])
def test_planted_mlp_recovery(noise):
    model = make_mlp()
    spec = mlp_spec(model)
    a = model.state_dict()
    b, expected = plant(spec, a, noise=noise)
    perms = weight_matching(spec, a, b, progress=False)
    assert perms.keys() == spec.groups.keys()
    for name, p in perms.items():
        assert p.dtype == torch.long and p.device.type == "cpu"
        assert torch.equal(p, expected[name]), name
    aligned = apply_permutation(spec, perms, b)
    assert_same_state(aligned, a, atol=10 * noise)

    x = torch.randn(7, 20)
    model_b = make_mlp()
    model_b.load_state_dict(b)
    model_aligned = make_mlp()
    model_aligned.load_state_dict(aligned)
    with torch.no_grad():
        torch.testing.assert_close(model_aligned(x), model_b(x))


@pytest.mark.parametrize("make_model, make_spec", [(HeadsAndSegment, heads_spec),
                                                     (TwoSegments, segments_spec)])
def test_planted_structured_recovery(make_model, make_spec):
    torch.manual_seed(0)
    model = make_model()
    spec = make_spec(model)
    a = model.state_dict()
    b, expected = plant(spec, a, seed=3)
    assert not torch.equal(b["fc1.weight"], a["fc1.weight"])
    perms = weight_matching(spec, a, b, progress=False)
    for name in spec.groups:
        assert torch.equal(perms[name], expected[name]), name
    assert_same_state(apply_permutation(spec, perms, b), a)

    # the spec is a symmetry of the model: B computes what A computes
    model_b = make_model()
    model_b.load_state_dict(b)
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(model_b(x), model(x))


def test_planted_conv_bn_recovery_includes_running_stats():
    model = trained_like_convbn()
    spec = convbn_spec(model)
    a = model.state_dict()
    b, expected = plant(spec, a, seed=5, noise=1e-5)
    perms = weight_matching(spec, a, b, progress=False)
    for name in spec.groups:
        assert torch.equal(perms[name], expected[name]), name
    assert_same_state(apply_permutation(spec, perms, b), a, atol=1e-4)


def test_stats_and_objective_history_track_true_objective():
    spec = heads_spec(HeadsAndSegment())
    torch.manual_seed(1)
    a, b = HeadsAndSegment().state_dict(), HeadsAndSegment().state_dict()
    stats: dict = {}
    perms = weight_matching(spec, a, b, progress=False, stats=stats)
    assert 1 <= stats["sweeps"] <= 100 and stats["converged"]
    history = stats["objective_history"]
    assert len(history) == stats["sweeps"]
    assert all(y >= x - 1e-6 for x, y in zip(history, history[1:]))
    assert history[-1] >= stats["initial_objective"] - 1e-6
    assert history[-1] == pytest.approx(objective(spec, a, b, perms), rel=1e-5)
    times = stats["sweep_seconds"]
    assert len(times) == len(history) + 1  # the end of the initialisation, then each sweep
    assert all(0 <= x <= y for x, y in zip(times, times[1:])) and times[-1] <= stats["seconds"]


def test_tol_stops_early_and_is_validated():
    spec = mlp_spec(make_mlp((20, 64, 64, 5)))
    a, b = make_mlp((20, 64, 64, 5), 1).state_dict(), make_mlp((20, 64, 64, 5), 2).state_dict()
    full: dict = {}
    weight_matching(spec, a, b, progress=False, stats=full, init=None)
    assert full["sweeps"] >= 3  # from the identity, descent has work to do
    loose: dict = {}
    weight_matching(spec, a, b, progress=False, stats=loose, init=None, tol=1e-2)
    h = [loose["initial_objective"], *loose["objective_history"]]
    gains = [y - x for x, y in zip(h, h[1:])]
    assert loose["converged"] and loose["sweeps"] < full["sweeps"]
    assert gains[-1] <= 1e-2 * abs(h[-1])                        # it stopped for the tolerance
    assert all(g > 1e-2 * abs(y) for g, y in zip(gains[:-1], h[1:-1]))  # and not before
    # the same sweeps until then (a sweep's objective is summed from its steps' gains,
    # the last one recomputed exactly)
    assert h[1:] == pytest.approx(full["objective_history"][:len(h) - 1], rel=1e-6)
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol"):
            weight_matching(spec, a, b, progress=False, tol=bad)


def test_deterministic_for_a_seed_and_init_is_respected():
    spec = mlp_spec(make_mlp())
    a, b = make_mlp(seed=1).state_dict(), make_mlp(seed=2).state_dict()
    first = weight_matching(spec, a, b, seed=4, progress=False)
    second = weight_matching(spec, a, b, seed=4, progress=False)
    assert all(torch.equal(first[k], second[k]) for k in first)

    stats: dict = {}
    again = weight_matching(spec, a, b, init=first, progress=False, stats=stats)
    assert stats["sweeps"] == 1  # already a fixed point: nothing improves
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_inputs_are_not_modified():
    spec = convbn_spec(ConvBN())
    a = trained_like_convbn(0).state_dict()
    b = trained_like_convbn(1).state_dict()
    a0 = {k: v.clone() for k, v in a.items()}
    b0 = {k: v.clone() for k, v in b.items()}
    init = random_permutation(spec, 9)
    init0 = {k: v.clone() for k, v in init.items()}
    weight_matching(spec, a, b, init=init, progress=False)
    assert_same_state(a, a0)
    assert_same_state(b, b0)
    assert_same_state(init, init0)


def test_missing_or_mismatched_tensors_are_named():
    model = make_mlp()
    spec = mlp_spec(model)
    a = model.state_dict()
    b = dict(a)
    del b["2.bias"]
    with pytest.raises(SpecError, match=r"'2\.bias'"):
        weight_matching(spec, a, b, progress=False)
    b = dict(a)
    b["0.weight"] = torch.zeros(16, 21)
    with pytest.raises(SpecError, match=r"'0\.weight'"):
        weight_matching(spec, a, b, progress=False)
    with pytest.raises(SpecError, match="nope"):
        weight_matching(spec, a, a, init={"nope": torch.arange(3)}, progress=False)


def test_non_finite_weights_name_the_group():
    model = make_mlp()
    spec = mlp_spec(model)
    a = model.state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b["2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"group '(0|2):out'"):
        weight_matching(spec, a, b, progress=False)


# --------------------------------------------------------------- auto_rebasin
def test_auto_rebasin_aligns_and_leaves_inputs_alone():
    a = trained_like_convbn(0)
    spec = convbn_spec(a)
    b = trained_like_convbn(0)
    b_state, expected = plant(spec, a.state_dict(), seed=2)
    b.load_state_dict(b_state)
    a0 = {k: v.clone() for k, v in a.state_dict().items()}
    b0 = {k: v.clone() for k, v in b.state_dict().items()}
    a.train()
    x = torch.randn(2, 3, 8, 8)

    result = auto_rebasin(a, b, example_inputs=x, spec=spec, progress=False)

    assert result.method == "weight" and result.spec is spec
    assert all(torch.equal(result.perms[k], expected[k]) for k in spec.groups)
    assert_same_state(result.state_dict, a0, atol=1e-6)
    assert_same_state(result.model.state_dict(), a0, atol=1e-6)
    assert result.model is not b
    assert result.stats["sweeps"] >= 1 and result.stats["verify_error"] <= 1e-4
    assert_same_state(a.state_dict(), a0)
    assert_same_state(b.state_dict(), b0)
    assert a.training and b.training  # modes restored after verification


def test_auto_rebasin_checks_architecture_and_method():
    a, spec = make_mlp(), mlp_spec(make_mlp())
    with pytest.raises(ArchitectureMismatchError, match=r"'0\.weight'"):
        auto_rebasin(a, make_mlp((20, 17, 16, 5)), spec=spec, progress=False)
    with pytest.raises(ArchitectureMismatchError, match="missing"):
        auto_rebasin(a, make_mlp((20, 16, 5)), spec=spec, progress=False)
    with pytest.raises(ArchitectureMismatchError, match="types"):
        auto_rebasin(a, HeadsAndSegment(), spec=spec, progress=False)
    with pytest.raises(ValueError, match="known methods.*weight"):
        auto_rebasin(a, make_mlp(seed=1), spec=spec, method="magic", progress=False)


def test_auto_rebasin_matcher_registry_passes_data(monkeypatch):
    seen = {}

    def needs_data(spec, a, b, data, seed, progress, **kw):
        seen.update(data=data, seed=seed, kw=sorted(kw))
        return {name: torch.arange(g.size) for name, g in spec.groups.items()}

    monkeypatch.setitem(MATCHERS, "fake", Matcher("fake", needs_data, needs_data=True))
    a, spec = make_mlp(), mlp_spec(make_mlp())
    with pytest.raises(ValueError, match="needs data"):
        auto_rebasin(a, make_mlp(seed=1), spec=spec, method="fake", progress=False)
    result = auto_rebasin(a, make_mlp(seed=1), spec=spec, method="fake", data=[1, 2], seed=3,
                          progress=False, example_inputs=torch.randn(2, 20), extra=1)
    assert seen == {"data": [1, 2], "seed": 3, "kw": ["device", "extra", "max_iter"]}
    assert result.method == "fake"
    assert isinstance(result.matching, Matching) and result.matching.method == "fake"


def test_auto_rebasin_verification_catches_a_wrong_spec():
    a, b = make_mlp(seed=0), make_mlp(seed=1)
    spec = mlp_spec(a)
    broken = PermutationSpec([Group(g.name, g.size, [m for m in g.members if m.param != "0.bias"])
                              for g in spec.groups.values()], spec.tensors)
    with pytest.raises(EquivalenceError, match="relative error"):
        auto_rebasin(a, b, example_inputs=torch.randn(4, 20), spec=broken, progress=False)
    with pytest.warns(UserWarning, match="not verified"):
        auto_rebasin(a, b, spec=broken, progress=False)


def test_auto_rebasin_with_inferred_spec():
    a, b = make_mlp(seed=0), make_mlp(seed=0)
    b_state, expected = plant(mlp_spec(a), a.state_dict(), seed=4)
    b.load_state_dict(b_state)
    x = torch.randn(3, 20)
    result = auto_rebasin(a, b, example_inputs=x, progress=False)
    assert_same_state(result.state_dict, a.state_dict(), atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), b(x))


def test_member_rows_of_b_match_gather_of_permuted_tensor():
    """B_m (others at their perms) equals gathering the fully permuted tensor, own group fixed."""
    from autobasin.match.weight import _b_rows, _make_term

    for model, make_spec in ((HeadsAndSegment(), heads_spec), (TwoSegments(), segments_spec)):
        spec = make_spec(model)
        b = model.state_dict()
        perms = random_permutation(spec, 11)
        by_param = spec.members_by_param()
        for gname, g in spec.groups.items():
            expected = apply_permutation(spec, dict(perms, **{gname: torch.arange(g.size)}), b)
            for m in g.members:
                term = _make_term(gname, m, by_param[m.param], b[m.param])
                torch.testing.assert_close(_b_rows(term, b[m.param], perms),
                                           m.gather(expected[m.param]), rtol=0, atol=0)


# ------------------------------------------------- the objective (issue 14, item 6)
def bn_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():  # statistics as a trained model has them: large and varied
        model[1].running_mean.normal_(0, 5)
        model[1].running_var.uniform_(1, 30)
    return model


def bn_mlp_spec(model: nn.Sequential) -> PermutationSpec:
    n = 32
    members = [plain("0.weight", 0, n), plain("0.bias", 0, n), plain("1.weight", 0, n),
               plain("1.bias", 0, n), plain("1.running_mean", 0, n), plain("1.running_var", 0, n),
               plain("3.weight", 1, n)]
    return PermutationSpec([Group("hidden", n, members)], tensor_infos(model))


def test_buffers_are_permuted_but_not_matched_by_default():
    """The paper's objective counts parameters only: B's running statistics
    may take any values without changing the result; with match_buffers they
    count (and here, where they are large, they change it)."""
    a, b = bn_mlp(0), bn_mlp(1)
    spec = bn_mlp_spec(a)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    stats: dict = {}
    perms = weight_matching(spec, sd_a, sd_b, progress=False, stats=stats)
    params_only = {k: v for k, v in sd_a.items()  # the spec's parameters
                   if k in dict(a.named_parameters()) and k in spec.members_by_param()}
    expected = sum(float((params_only[k] * apply_permutation(spec, perms, sd_b)[k]).sum())
                   for k in params_only)
    assert stats["objective"] == pytest.approx(expected, rel=1e-5)
    other = dict(sd_b)
    other["1.running_mean"] = torch.randn(32) * 100
    other["1.running_var"] = torch.rand(32) * 100 + 1
    again = weight_matching(spec, sd_a, other, progress=False)
    assert torch.equal(again["hidden"], perms["hidden"])
    with_buffers = weight_matching(spec, sd_a, other, progress=False, match_buffers=True)
    assert not torch.equal(with_buffers["hidden"], perms["hidden"])
    # the aligned model still computes what B computes: buffers move with their group
    b.eval()
    aligned = bn_mlp(1)
    aligned.load_state_dict(apply_permutation(spec, perms, sd_b))
    x = torch.randn(5, 12)
    assert torch.allclose(aligned.eval()(x), b(x), atol=1e-5)


def test_best_start_keeps_the_higher_objective():
    sizes = (20, 48, 48, 48, 5)
    spec = mlp_spec(make_mlp(sizes))
    a, b = make_mlp(sizes, 1).state_dict(), make_mlp(sizes, 2).state_dict()
    runs = {}
    for init in ("greedy", "identity", "best"):
        runs[init] = {}
        weight_matching(spec, a, b, progress=False, init=init, stats=runs[init])
    best = runs["best"]
    assert best["starts"] == {"greedy": pytest.approx(runs["greedy"]["objective"]),
                              "identity": pytest.approx(runs["identity"]["objective"])}
    assert best["objective"] == pytest.approx(max(best["starts"].values()))
    assert best["init"] in ("greedy", "identity")
    # a planted problem: the greedy start reaches the bound, the identity is not run
    planted: dict = {}
    p = random_permutation(spec, seed=3)
    perms = weight_matching(spec, a, apply_permutation(spec, p, a), progress=False, stats=planted)
    assert planted["starts"]["identity"] is None and planted["init"] == "greedy"
    assert_same_state(apply_permutation(spec, perms, apply_permutation(spec, p, a)), a, atol=1e-5)


# ------------------------------------------------------------ typed results
def test_weight_matching_returns_a_typed_result_that_is_the_permutation_mapping():
    from collections.abc import Mapping

    from autobasin.match import WeightMatching
    a, b = make_mlp(), make_mlp(seed=1)
    spec = mlp_spec(a)
    stats: dict = {}
    result = weight_matching(spec, a.state_dict(), b.state_dict(), progress=False, stats=stats)
    assert isinstance(result, WeightMatching) and isinstance(result, Mapping)
    assert sorted(result) == sorted(spec.groups) and len(result) == len(spec.groups)
    assert all(torch.equal(torch.sort(result[g]).values, torch.arange(spec.groups[g].size))
               for g in spec.groups)
    assert result.method == "weight" and result.sweeps >= 1 and result.converged
    assert result.objective == result.objective_history[-1] >= result.initial_objective
    assert result.starts["greedy"] is not None
    # the compatibility dict holds the same figures, and no permutations
    assert "perms" not in result.as_dict() and stats == result.as_dict()
    # it applies like a dict of permutations
    aligned = apply_permutation(spec, result, b.state_dict())
    first = next(iter(spec.groups))
    layer = first.split(":")[0]
    assert torch.equal(aligned[f"{layer}.weight"], b.state_dict()[f"{layer}.weight"][result[first]])


def test_a_registered_matcher_is_a_record_read_by_auto_rebasin():
    from autobasin.match import MATCHERS as REGISTRY
    assert REGISTRY is MATCHERS
    assert {m: (r.needs_data, r.takes_traced) for m, r in MATCHERS.items()
            if m in ("weight", "activation", "ste")} == {
        "weight": (False, False), "activation": (True, True), "ste": (True, False)}
    a = make_mlp()
    result = auto_rebasin(a, make_mlp(seed=1), spec=mlp_spec(a), progress=False,
                          example_inputs=torch.randn(2, 20))
    assert result.matching.method == "weight" and result.verify_error <= 1e-5
    assert result.stats["verify_error"] == result.verify_error
    assert result.stats["sweeps"] == result.matching.sweeps


def test_coordinate_descent_stops_after_a_sweep_that_changes_nothing():
    from autobasin.match.descent import coordinate_descent
    gen = torch.Generator().manual_seed(0)
    sims = {g: torch.randn(6, 6, generator=gen, dtype=torch.float64) for g in ("x", "y")}
    perms = {g: torch.arange(6) for g in sims}
    calls = []

    def similarity(g):
        calls.append(g)
        return sims[g]

    out = coordinate_descent(["x", "y"], similarity, perms, max_iter=10, seed=0)
    # independent groups: one sweep solves both, the second changes nothing
    assert out.converged and out.sweeps == 2 and len(calls) == 4
    for g, s in sims.items():
        assert torch.equal(perms[g], solve_lap(s))
    # a tolerance that says stop ends after the first sweep; max_iter=0 does nothing
    fresh = {g: torch.arange(6) for g in sims}
    assert coordinate_descent(["x", "y"], similarity, fresh, max_iter=10, seed=0,
                              after_sweep=lambda gain: True).sweeps == 1
    idle = {g: torch.arange(6) for g in sims}
    out = coordinate_descent(["x", "y"], similarity, idle, max_iter=0, seed=0)
    assert out.sweeps == 0 and not out.converged and torch.equal(idle["x"], torch.arange(6))
