"""Activation matching and STE matching: moments, planted recovery, registration."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from autobasin import apply_permutation, auto_rebasin, invert, permute_model, random_permutation
from autobasin.api import MATCHERS
from autobasin.data import loader
from autobasin.demo import make_mlp, train_classifier
from autobasin.infer import infer_spec, trace_model
from autobasin.match.activation import CrossMoments, activation_entries, activation_matching
from autobasin.match.ste import ste_matching
from autobasin.match.weight import weight_matching
from autobasin.testing import create, randomize_state_


def random_batches(shape, count=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(count)]


def assert_recovered(spec, perms, planted, dead=None):
    """Every group's planted permutation recovered; units in ``dead`` ({group: unit
    indices of A}, constant on the data) may pair with any dead unit of B: their
    activations tie, and which the assignment solver picks among ties is its own."""
    expected = invert(planted)
    wrong = []
    for g in spec.groups:
        got, want = perms[g].clone(), expected[g].clone()
        if dead and g in dead:
            idle = torch.tensor(sorted(dead[g]), dtype=torch.long)
            assert sorted(got[idle].tolist()) == sorted(want[idle].tolist()), g  # dead to dead
            got[idle] = want[idle] = -1
        if not torch.equal(got, want):
            wrong.append(g)
    assert not wrong, f"{len(wrong)} of {len(spec.groups)} groups not recovered, e.g. {wrong[:3]}"


def dead_units(model, data, layers):
    """{f'{fc}:out': indices} of the units after ``fc`` that are constant on ``data``."""
    seen = {}
    hooks = [getattr(model, f"relu{fc[2:]}").register_forward_hook(
        lambda mod, i, o, fc=fc: seen.setdefault(fc, []).append(o.detach())) for fc in layers]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    return {f"{fc}:out": set(torch.cat(v).std(0).le(0).nonzero().flatten().tolist())
            for fc, v in seen.items()}


# ------------------------------------------------------------------ moments
def test_streaming_moments_equal_full_batch():
    gen = torch.Generator().manual_seed(0)
    xa = torch.randn(7, 500, generator=gen) * 3 + 10  # large mean: cancellation-prone
    xb = torch.randn(5, 500, generator=gen) - 4
    xb[2] = 0.5 * xa[1] + 0.1 * xb[2]
    streamed = CrossMoments()
    for lo, hi in ((0, 1), (1, 130), (130, 131), (131, 500)):
        streamed.update(xa[:, lo:hi], xb[:, lo:hi])
    full = CrossMoments()
    full.update(xa, xb)
    a64, b64 = xa.double(), xb.double()
    ref_cov = (a64 - a64.mean(1, keepdim=True)) @ (b64 - b64.mean(1, keepdim=True)).T / 500
    ref_corr = torch.corrcoef(torch.cat([a64, b64]))[:7, 7:]
    for m in (streamed, full):
        assert m.count == 500
        torch.testing.assert_close(m.mean_a, a64.mean(1))
        torch.testing.assert_close(m.var_b, b64.var(1, unbiased=False))
        torch.testing.assert_close(m.covariance(), ref_cov)
        torch.testing.assert_close(m.correlation(), ref_corr)
        torch.testing.assert_close(m.inner(), a64 @ b64.T / 500)
    assert float(full.correlation()[1, 2]) > 0.99


def test_dead_units_give_zero_correlation_not_nan():
    gen = torch.Generator().manual_seed(1)
    xa = torch.randn(4, 64, generator=gen)
    xb = torch.randn(4, 64, generator=gen)
    xa[0] = 0.0        # dead ReLU unit
    xb[3] = 2.5        # constant unit
    m = CrossMoments()
    m.update(xa[:, :10], xb[:, :10])
    m.update(xa[:, 10:], xb[:, 10:])
    corr = m.correlation()
    assert torch.isfinite(corr).all()
    assert torch.equal(corr[0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(corr[:, 3], torch.zeros(4, dtype=torch.float64))


def test_dead_units_in_a_model_match_without_nan():
    a = make_mlp(12, [16, 16], 3, seed=0)
    with torch.no_grad():  # three fc1 units that never fire
        a.fc1.weight[:3] = 0.0
        a.fc1.bias[:3] = -1.0
    spec = infer_spec(a, torch.randn(2, 12))
    planted = random_permutation(spec, seed=2)
    b = permute_model(a, spec, planted)
    stats = {}
    perms = activation_matching(spec, a, b, random_batches((64, 12)), progress=False, stats=stats)
    for g, p in perms.items():
        assert torch.equal(torch.sort(p).values, torch.arange(spec.groups[g].size))
    assert all(math.isfinite(v) for v in stats["matched_similarity"].values())
    # the live units are recovered; the dead ones may be paired in any order
    aligned = apply_permutation(spec, perms, b.state_dict())
    for k, v in a.state_dict().items():
        live = v[3:] if k in ("fc1.weight", "fc1.bias") else v[:, 3:] if k == "fc2.weight" else v
        got = aligned[k][3:] if k in ("fc1.weight", "fc1.bias") else \
            aligned[k][:, 3:] if k == "fc2.weight" else aligned[k]
        torch.testing.assert_close(got, live)


# ---------------------------------------------------------- planted recovery
def test_planted_recovery_mlp_both_similarities():
    a = make_mlp(20, [32, 32, 32], 5, seed=0)
    spec = infer_spec(a, torch.randn(2, 20))
    planted = random_permutation(spec, seed=1)
    b = permute_model(a, spec, planted)
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in random_batches((64, 20), 3)]
    for similarity in ("correlation", "inner"):
        stats = {}
        perms = activation_matching(spec, a, b, data, similarity=similarity, progress=False,
                                    stats=stats)
        assert_recovered(spec, perms, planted, dead_units(a, data, ["fc1", "fc2", "fc3"]))
        assert stats["fallback_groups"] == [] and stats["activation_groups"] == 3
        assert stats["batches"] == 3 and stats["samples"] == 192
        # the paper's choice for an MLP: the post-ReLU values the next Linear sees
        assert stats["group_nodes"] == {"fc1:out": ["relu1"], "fc2:out": ["relu2"],
                                        "fc3:out": ["relu3"]}


ZOO = [
    ("test_resnet", (4, 3, 64, 64)),
    ("test_convnext", (4, 3, 64, 64)),
    ("test_vit", (4, 3, 160, 160)),
    pytest.param("resnet18", (4, 3, 64, 64), marks=pytest.mark.slow),
    pytest.param("test_efficientnet", (4, 3, 64, 64), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,shape", ZOO)
def test_planted_recovery_zoo(name, shape):
    a = randomize_state_(create(name), seed=1)
    spec = infer_spec(a)
    planted = random_permutation(spec, seed=3)
    b = permute_model(a, spec, planted)
    modes = {m: m.training for m in (a, b)}
    stats = {}
    perms = activation_matching(spec, a, b, random_batches(shape), progress=False, stats=stats)
    assert_recovered(spec, perms, planted)
    assert stats["fallback_groups"] == []
    assert {m: m.training for m in (a, b)} == modes


def small_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                             mlp_ratio=2.0, num_classes=5).eval()


def test_planted_recovery_heads_by_head_dim_grid():
    """Four heads x 12 dims: grids solved jointly by coordinate descent."""
    a = randomize_state_(small_vit(), seed=2)
    spec = infer_spec(a, torch.randn(2, 3, 32, 32))
    heads = [g for g, grp in spec.groups.items() if grp.size == 4]
    assert heads, "expected head groups of size 4"
    planted = random_permutation(spec, seed=5)
    b = permute_model(a, spec, planted)
    stats = {}
    perms = activation_matching(spec, a, b, random_batches((8, 3, 32, 32)), progress=False,
                                stats=stats)
    assert_recovered(spec, perms, planted)
    assert stats["sweeps"] >= 1


def test_fallback_groups_use_weight_matching():
    a = make_mlp(20, [16, 16, 16], 5, seed=0)
    spec = infer_spec(a, torch.randn(2, 20))
    planted = random_permutation(spec, seed=4)
    b = permute_model(a, spec, planted)
    perms = activation_matching(spec, a, b, random_batches((32, 20)), nodes=["relu2"],
                                progress=False)
    assert sorted(perms.fallback_groups) == ["fc1:out", "fc3:out"]
    assert perms.activation_groups == 1
    # the fallback's own typed result, over the fallback groups only
    assert sorted(perms.weight_matching) == ["fc1:out", "fc3:out"]
    assert perms.as_dict()["weight_matching"]["method"] == "weight"
    assert_recovered(spec, perms, planted)


def test_activation_entries_levels():
    a = make_mlp(8, [6], 3, seed=0)
    spec = infer_spec(a, torch.randn(2, 8))
    traced = trace_model(a, torch.randn(2, 8))
    entries, levels = activation_entries(traced)
    assert [e.node for e in entries] == ["relu1"] and levels == {"fc1:out": 1}
    entries, levels = activation_entries(traced, nodes=["fc1"])
    assert [e.node for e in entries] == ["fc1"] and levels == {"fc1:out": 2}
    with pytest.raises(ValueError, match="no graph node"):
        activation_entries(traced, nodes=["nonsense"])


def test_spec_without_graph_is_reinferred():
    from autobasin.spec import PermutationSpec
    a = make_mlp(10, [8, 8], 3, seed=0)
    spec = PermutationSpec.from_json(infer_spec(a, torch.randn(2, 10)).to_json())
    assert spec.capture == "fx"  # plain data: no graph comes with it
    planted = random_permutation(spec, seed=1)
    b = permute_model(a, spec, planted)
    perms = activation_matching(spec, a, b, random_batches((32, 10)), progress=False)
    assert_recovered(spec, perms, planted)


# -------------------------------------------------------------- registration
def test_auto_rebasin_activation_with_loader_and_verify():
    assert MATCHERS["activation"].needs_data and MATCHERS["ste"].needs_data
    a = make_mlp(20, [24, 24], 4, seed=0)
    spec = infer_spec(a, torch.randn(2, 20))
    planted = random_permutation(spec, seed=6)
    b = permute_model(a, spec, planted)
    x = torch.randn(256, 20, generator=torch.Generator().manual_seed(0))
    data = loader(TensorDataset(x, torch.zeros(256, dtype=torch.long)), batch_size=64)
    with pytest.raises(ValueError, match="needs data"):
        auto_rebasin(a, b, example_inputs=x[:4], method="activation")
    result = auto_rebasin(a, b, example_inputs=x[:4], method="activation", data=data,
                          progress=False, verify=True)
    assert result.stats["verify_error"] <= 1e-6
    assert_recovered(result.spec, result.perms, planted)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(result.state_dict[k], v)


# ---------------------------------------------------------------------- STE
def teacher_task(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1536, 16, generator=gen)
    teacher = make_mlp(16, [48], 4, seed=100 + seed)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    return TensorDataset(x, y)


def midpoint_loss(a, b, spec, perms, data):
    state_b = apply_permutation(spec, perms, b.state_dict())
    mid = {k: 0.5 * (v + state_b[k]) for k, v in a.state_dict().items()}
    model = make_mlp(16, [48, 48], 4, seed=0)
    model.load_state_dict(mid)
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in data) / \
            sum(len(y) for _, y in data)


def test_ste_beats_weight_matching_on_a_small_mlp():
    train = teacher_task()
    a, b = make_mlp(16, [48, 48], 4, seed=0), make_mlp(16, [48, 48], 4, seed=1)
    train_classifier(a, train, epochs=3, lr=3e-3, batch_size=64, seed=0)
    train_classifier(b, train, epochs=3, lr=3e-3, batch_size=64, seed=1)
    spec = infer_spec(a, torch.randn(2, 16))
    data = loader(train, batch_size=64)
    wm = weight_matching(spec, a.state_dict(), b.state_dict(), progress=False)
    stats = {}
    # (weight matching keeps the better of its two starts: here the identity's, whose
    # midpoint STE improves on at a larger step than the greedy start's needed)
    ste = ste_matching(spec, a, b, data, epochs=2, lr=3e-2, progress=False, stats=stats,
                       eval_batches=len(data))
    assert stats["weight_matching_eval_loss"] == pytest.approx(midpoint_loss(a, b, spec, wm, data))
    assert stats["best_eval_loss"] < stats["weight_matching_eval_loss"]
    assert midpoint_loss(a, b, spec, ste, data) < midpoint_loss(a, b, spec, wm, data)
    assert stats["steps"] == 2 * len(data) and stats["perm_changes"] >= 1


def test_ste_is_deterministic_and_leaves_models_alone():
    train = teacher_task(1)
    a, b = make_mlp(16, [48, 48], 4, seed=2), make_mlp(16, [48, 48], 4, seed=3)
    spec = infer_spec(a, torch.randn(2, 16))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.train()
    data = loader(train, batch_size=128)
    runs = [ste_matching(spec, a, b, data, max_steps=5, lr=1e-2, seed=7, progress=False)
            for _ in range(2)]
    assert all(torch.equal(runs[0][g], runs[1][g]) for g in spec.groups)
    assert a.training and all(torch.equal(v, before[k]) for k, v in a.state_dict().items())


def test_auto_rebasin_ste_verifies():
    train = teacher_task(2)
    a, b = make_mlp(16, [32], 4, seed=0), make_mlp(16, [32], 4, seed=1)
    result = auto_rebasin(a, b, example_inputs=train.tensors[0][:4], method="ste",
                          data=loader(train, batch_size=256), progress=False, max_steps=3)
    assert result.stats["verify_error"] <= 1e-6 and result.stats["steps"] == 3


class TiedLM(nn.Module):
    """Token embedding and output head sharing one weight (GPT-2, BERT's MLM head)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.fc = nn.Embedding(32, 16), nn.Linear(16, 24)
        self.back = nn.Linear(24, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids):
        h = self.emb(input_ids)
        h = h + self.back(torch.relu(self.fc(h)))
        return self.head(h)


def test_ste_on_a_model_with_tied_weights_and_lm_batches():
    """Tied parameters are one tensor under both names at the midpoint, and a batch
    {"input_ids"} is scored as a causal LM by default."""
    a, b = TiedLM(0), TiedLM(1)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 32, (8, 12), generator=gen)} for _ in range(4)]
    result = auto_rebasin(a, b, example_inputs=data[0], method="ste", data=data,
                          progress=False, max_steps=4)
    assert result.verify_error <= 1e-5
    assert "fc:out" in result.spec.groups and len(result.spec.groups) >= 2
    ids = data[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(result.model(ids), b(ids), atol=1e-5)
    assert result.model.head.weight is result.model.emb.weight
