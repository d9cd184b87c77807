"""Symmetries beyond permutations: kinds inferred per group, random elements of every
kind checked by function, planted elements recovered by weight matching."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autobasin import auto_rebasin, check_equivalence, infer_spec, trace_model
from autobasin.match.general import general_weight_matching
from autobasin.permute import (EquivalenceError, apply_permutation, compose, invert,
                               permute_model, random_transforms)
from autobasin.spec import Group, PermutationSpec, SpecError, symmetry_kinds


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(F.relu(self.a(x)))))


class GeluMLP(MLP):
    def forward(self, x):
        return self.c(F.gelu(self.b(F.leaky_relu(self.a(x), 0.1))))


class RMS(nn.Module):
    """An RMS norm without a gain (what ``fold_norms`` leaves)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    def __init__(self, d=16, h=4, norm=RMS):
        super().__init__()
        self.n1, self.n2, self.h = norm(), norm(), h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.n1(x)
        q, k, v = (f(y).view(b, t, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.relu(self.up(self.n2(x))))


class LM(nn.Module):
    def __init__(self, norm=RMS, tied=False):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.blocks = nn.Sequential(Block(norm=norm), Block(norm=norm))
        self.nf = norm()
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.nf(self.blocks(self.emb(ids))))


def _gain_rms():
    return nn.RMSNorm(16)


def _kinds(spec):
    return {n: g.kind for n, g in spec.groups.items()}


def test_symmetry_kinds_validated():
    assert symmetry_kinds(None) == {"permutation"}
    assert symmetry_kinds("all") == {"permutation", "sign", "scale", "orthogonal", "invertible"}
    with pytest.raises(ValueError, match="rotation"):
        symmetry_kinds(("rotation",))


def test_default_is_permutations_only():
    m = MLP()
    spec = infer_spec(m, torch.randn(3, 8))
    assert set(_kinds(spec).values()) == {"permutation"}
    assert not spec.is_general
    assert not any(mb.contra for g in spec.groups.values() for mb in g.members)


def test_activation_kinds():
    spec = infer_spec(MLP(), torch.randn(3, 8), symmetries="all")
    assert _kinds(spec) == {"a:out": "scale", "b:out": "sign"}
    contra = {(mb.param, mb.axis): mb.contra for g in spec.groups.values() for mb in g.members}
    assert contra[("a.weight", 0)] is False and contra[("b.weight", 1)] is True
    # only what was asked for
    spec = infer_spec(MLP(), torch.randn(3, 8), symmetries=("sign",))
    assert _kinds(spec) == {"a:out": "permutation", "b:out": "sign"}
    spec = infer_spec(GeluMLP(), torch.randn(3, 8), symmetries="all")
    assert _kinds(spec) == {"a:out": "scale", "b:out": "permutation"}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_transformer_kinds(capture):
    ids = torch.randint(0, 50, (2, 7))
    traced = trace_model(LM(), ids, symmetries="all", capture=capture)
    k = _kinds(traced.spec)
    assert k["emb:in"] == "orthogonal"  # the residual stream under gainless RMS norms
    for b in ("blocks.0", "blocks.1"):
        assert k[f"{b}.q:out.d0"] == "permutation"  # heads
        assert k[f"{b}.q:out.d1"] == "invertible"   # q/k head dim
        assert k[f"{b}.v:out.d1"] == "invertible"   # v/o head dim
        assert k[f"{b}.up:out"] == "scale"          # ReLU units
    qk = traced.spec.groups["blocks.0.q:out.d1"]
    assert {(m.param, m.contra) for m in qk.members} == {("blocks.0.q.weight", False),
                                                        ("blocks.0.k.weight", True)}


def test_norms_with_gains_and_ties_narrow_the_stream():
    ids = torch.randint(0, 50, (2, 7))
    assert _kinds(infer_spec(LM(norm=_gain_rms), ids, symmetries="all"))["emb:in"] == "permutation"
    ln = infer_spec(LM(norm=lambda: nn.LayerNorm(16, elementwise_affine=False)), ids,
                    symmetries="all")
    assert _kinds(ln)["emb:in"] == "permutation"  # LayerNorm's centering
    # an embedding that is also the output head: the stream is read against itself,
    # so only maps equal to their inverse-transpose remain
    traced = trace_model(LM(tied=True), ids, symmetries=("scale", "invertible", "orthogonal"))
    assert _kinds(traced.spec)["emb:in"] == "orthogonal"


def test_conv_kinds():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3)
            self.c2 = nn.Conv2d(8, 8, 3, groups=2)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.c1(x))
            x = F.max_pool2d(x, 2)
            x = F.adaptive_avg_pool2d(F.relu(self.c2(x)), 1).flatten(1)
            return self.fc(x)
    x = torch.randn(2, 3, 16, 16)
    net = Net()
    spec = infer_spec(net, x, symmetries="all")
    kinds = sorted(_kinds(spec).values())
    # ReLU + max pool: scaled units; the grouped conv's groups only permute
    assert "scale" in kinds and "permutation" in kinds
    for seed in range(3):
        assert check_equivalence(net, spec, x, seed=seed) < 1e-5


@pytest.mark.parametrize("make,x", [
    (MLP, lambda: torch.randn(5, 8)),
    (GeluMLP, lambda: torch.randn(5, 8)),
    (LM, lambda: torch.randint(0, 50, (2, 7))),
    (lambda: LM(tied=True), lambda: torch.randint(0, 50, (2, 7))),
])
def test_random_elements_of_every_kind_are_exact(make, x):
    model, inputs = make(), x()
    spec = infer_spec(model, inputs, symmetries="all")
    assert spec.is_general
    for seed in range(3):
        assert check_equivalence(model, spec, inputs, seed=seed) < 1e-5


def _with_kind(spec: PermutationSpec, group: str, kind: str, flip_contra: bool = False):
    groups = []
    for g in spec.groups.values():
        members = g.members
        if g.name == group and flip_contra:
            # every member as an output: the readers no longer undo the map
            members = [type(m)(m.param, m.axis, m.offset, m.shape, m.strides, m.dim, False)
                       for m in members]
        new = kind if g.name == group else g.kind
        groups.append(Group(g.name, g.size, members, new, g.pairs if new == g.kind else None))
    return PermutationSpec(groups, spec.tensors, spec.blocked, spec.axes, spec.outputs, None)


def test_a_kind_too_general_or_a_wrong_orientation_is_caught():
    m, x = MLP(), torch.randn(5, 8)
    spec = infer_spec(m, x, symmetries="all")
    with pytest.raises(EquivalenceError):  # ReLU units do not admit any invertible map
        check_equivalence(m, _with_kind(spec, "a:out", "invertible"), x)
    with pytest.raises(EquivalenceError):  # nor negative scalings
        check_equivalence(m, _with_kind(spec, "a:out", "sign"), x)
    with pytest.raises(EquivalenceError):  # tanh does not admit scalings
        check_equivalence(m, _with_kind(spec, "b:out", "scale"), x)
    with pytest.raises(EquivalenceError):  # a scale the next layer does not undo
        check_equivalence(m, _with_kind(spec, "a:out", "scale", flip_contra=True), x)


def test_elements_compose_invert_and_refuse_ill_conditioned():
    m, x = LM(), torch.randint(0, 50, (2, 7))
    spec = infer_spec(m, x, symmetries="all")
    t1, t2 = random_transforms(spec, 1), random_transforms(spec, 2)
    sd = m.state_dict()
    both = apply_permutation(spec, t2, apply_permutation(spec, t1, sd))
    once = apply_permutation(spec, compose(t1, t2), sd)
    back = apply_permutation(spec, invert(t1), apply_permutation(spec, t1, sd))
    for k in sd:
        assert torch.allclose(both[k], once[k], atol=1e-5)
        assert torch.allclose(back[k], sd[k], atol=1e-5)
    bad = dict(t1)
    g = next(n for n, grp in spec.groups.items() if grp.kind == "invertible")
    bad[g] = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-9], dtype=torch.float64))
    with pytest.raises(SpecError, match="ill-conditioned"):
        apply_permutation(spec, bad, sd)
    perm_group = next(n for n, grp in spec.groups.items() if grp.kind == "permutation")
    bad = dict(t1)
    bad[perm_group] = torch.eye(spec.groups[perm_group].size, dtype=torch.float64)
    with pytest.raises(SpecError, match="permutations only"):
        apply_permutation(spec, bad, sd)


def test_json_round_trip_keeps_kinds_and_orientation():
    spec = infer_spec(LM(), torch.randint(0, 50, (2, 7)), symmetries="all")
    again = PermutationSpec.from_json(spec.to_json())
    assert again == spec and _kinds(again) == _kinds(spec)
    assert any(m.contra for g in again.groups.values() for m in g.members)
    d = spec.to_dict()
    d["groups"][0]["kind"] = "affine"
    with pytest.raises(SpecError, match="affine"):
        PermutationSpec.from_dict(d)


@pytest.mark.parametrize("make,x", [
    (MLP, lambda: torch.randn(5, 8)),
    (LM, lambda: torch.randint(0, 50, (2, 7))),
])
def test_planted_elements_recovered_to_round_off(make, x):
    """B is A under a random element of every group (orthogonal residual map,
    invertible per-head maps, scaled and signed units): matching recovers A."""
    torch.set_num_threads(1)  # many small matrices: threads only add overhead
    a, inputs = make(), x()
    spec = infer_spec(a, inputs, symmetries="all")
    b = permute_model(a, spec, random_transforms(spec, seed=5))
    far = max(float((a.state_dict()[k] - v).abs().max()) for k, v in b.state_dict().items())
    assert far > 0.1
    r = general_weight_matching(spec, a.state_dict(), b.state_dict())
    assert r.distance < 1e-5 * r.initial_distance
    aligned = apply_permutation(spec, r, b.state_dict())
    for k, v in a.state_dict().items():
        assert torch.allclose(aligned[k], v, atol=1e-5), k
    # end to end: inferred, matched, applied and verified against B
    res = auto_rebasin(a, b, inputs, symmetries="all", progress=False)
    assert res.verify_error < 1e-5
    for k, v in a.state_dict().items():
        assert torch.allclose(res.model.state_dict()[k], v, atol=1e-5), k


def test_generalized_matching_beats_permutations_on_independent_models():
    torch.set_num_threads(1)
    ids = torch.randint(0, 50, (2, 7))
    torch.manual_seed(1)
    a = LM()
    torch.manual_seed(2)
    b = LM()
    perm = auto_rebasin(a, b, ids, progress=False)
    gen = auto_rebasin(a, b, ids, symmetries="all", progress=False)

    def dist(m):
        return sum(float(((a.state_dict()[k] - v) ** 2).sum())
                   for k, v in m.state_dict().items()) ** 0.5
    assert dist(gen.model) < dist(perm.model) < dist(b)
    assert gen.verify_error < 1e-4


def _ste_case():
    """Two MLPs, a 4-class task on 256 points in batches of 32 (4 passes), and the
    loss at ``(1 - lam) A + lam B'`` for an aligned ``B'``."""
    from torch.func import functional_call
    torch.set_num_threads(1)
    torch.manual_seed(3)
    a, b = MLP(), MLP()
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)] * 4

    def path_loss(bb, lam):
        sd = {k: (1 - lam) * v + lam * bb.state_dict()[k] for k, v in a.state_dict().items()}
        return float(F.cross_entropy(functional_call(a, sd, (x,)), y))
    return a, b, x, data, path_loss


def test_generalized_ste_lowers_the_midpoint_loss():
    """method="ste" with general groups: the continuous elements are refined on the
    midpoint's loss, from the weight-matching start, and B' still computes B."""
    a, b, x, data, path_loss = _ste_case()
    w = auto_rebasin(a, b, x[:4], symmetries="all", progress=False)
    s = auto_rebasin(a, b, x[:4], method="ste", data=data, symmetries="all", progress=False)
    assert s.verify_error < 1e-5 and s.matching.history
    assert path_loss(s.model, 0.5) < path_loss(w.model, 0.5)


def test_generalized_ste_over_the_whole_path_lowers_its_points_off_the_midpoint():
    """path="uniform": each step lowers the loss at a point of the path drawn
    uniformly, so the points beside the midpoint come down too; B' still computes B."""
    a, b, x, data, path_loss = _ste_case()
    w = auto_rebasin(a, b, x[:4], symmetries="all", progress=False)
    s = auto_rebasin(a, b, x[:4], method="ste", data=data, symmetries="all", progress=False,
                     path="uniform")
    assert s.verify_error < 1e-5 and s.matching.history
    for lam in (0.25, 0.5, 0.75):
        assert path_loss(s.model, lam) < path_loss(w.model, lam), lam
    for bad in ("ends", (0.7, 0.3), (0.5, 1.5)):
        with pytest.raises(ValueError, match="path="):
            auto_rebasin(a, b, x[:4], method="ste", data=data, symmetries="all",
                         progress=False, path=bad)
    with pytest.raises(ValueError, match="beyond permutations"):  # permutation STE: midpoint only
        auto_rebasin(a, b, x[:4], method="ste", data=data, progress=False, path="uniform")
    # a range around the middle: still exact, and its midpoint below weight matching's
    r = auto_rebasin(a, b, x[:4], method="ste", data=data, symmetries="all", progress=False,
                     path=(0.4, 0.6))
    assert r.verify_error < 1e-5 and path_loss(r.model, 0.5) < path_loss(w.model, 0.5)


# ------------------------------------------------------------------ folding norms
def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("norm", [lambda: nn.RMSNorm(16), lambda: nn.LayerNorm(16)])
def test_fold_norms_frees_the_residual_stream(norm):
    from autobasin.fold import GainlessRMSNorm, fold_norms
    ids = torch.randint(0, 50, (2, 7))
    m = _perturbed(LM(norm=norm))
    assert _kinds(infer_spec(m, ids, symmetries="all"))["emb:in"] == "permutation"
    f = fold_norms(m, ids)
    assert len(f.folded_norms) == 5
    assert all(isinstance(f.get_submodule(n), GainlessRMSNorm) for n in f.folded_norms)
    with torch.no_grad():
        assert torch.allclose(f(ids), m(ids), atol=1e-5)
        other = torch.randint(0, 50, (3, 5))  # equivalent on inputs it was not folded on
        assert torch.allclose(f(other), m(other), atol=1e-5)
    spec = infer_spec(f, ids, symmetries="all")
    assert _kinds(spec)["emb:in"] == "orthogonal"
    assert check_equivalence(f, spec, ids) < 1e-5


def test_fold_norms_leaves_a_norm_read_by_anything_else():
    from autobasin.fold import fold_norms

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.n, self.act, self.fc = nn.RMSNorm(8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.act(self.n(x)))
    m, x = _perturbed(Odd()), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="n: its output reaches act"):
        f = fold_norms(m, x)
    assert f.folded_norms == [] and isinstance(f.n, nn.RMSNorm)


def test_fold_norms_leaves_a_norm_whose_vectors_are_merged_before_the_linear():
    """A patch merger (Qwen2-VL's): the norm's output is viewed as fewer, wider
    vectors before the linear layer, whose columns no longer match the gain."""
    from autobasin.fold import fold_norms

    class Merger(nn.Module):
        def __init__(self):
            super().__init__()
            self.n, self.fc = nn.LayerNorm(8), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.n(x).view(-1, 32))
    m, x = _perturbed(Merger()), torch.randn(8, 8)
    with pytest.warns(UserWarning, match="n: its output reaches fc reshaped"):
        f = fold_norms(m, x)
    assert f.folded_norms == [] and isinstance(f.n, nn.LayerNorm)
    assert torch.allclose(f(x), m(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fold_norms_on_hugging_face_models(arch):
    T = pytest.importorskip("transformers")
    from autobasin.fold import fold_norms
    torch.set_num_threads(1)
    if arch == "llama":
        cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32)
        m = _perturbed(T.LlamaForCausalLM(cfg))
        stream = "model.embed_tokens:in"
    else:
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        m = _perturbed(T.GPT2LMHeadModel(cfg))  # tied head: untie to fold the final norm
        stream = "transformer.wte:in"
    x = {"input_ids": torch.randint(0, 64, (2, 9))}
    f = fold_norms(m, x, untie=True)
    assert len(f.folded_norms) == 5
    spec = infer_spec(f, x, symmetries="all")
    kinds = _kinds(spec)
    assert kinds[stream] == "orthogonal"
    assert "invertible" in kinds.values()
    for seed in range(2):
        assert check_equivalence(f, spec, x, seed=seed) < 1e-5


def test_fold_norms_keeps_centring_where_the_writer_is_a_tied_head():
    """GPT-2's embedding also computes its logits: centring it for the stream would
    change them. Without untie the block norms fold their gains but keep centring
    (a LayerNorm without affine), the stream stays a permutation group, and the
    folded model computes what the model computes, under any element of its spec."""
    T = pytest.importorskip("transformers")
    from autobasin.fold import fold_norms
    torch.set_num_threads(1)
    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    m = _perturbed(T.GPT2LMHeadModel(cfg))
    x = {"input_ids": torch.randint(0, 64, (2, 9))}
    with pytest.warns(UserWarning, match="still centres: its stream's writer .* tied head"):
        f = fold_norms(m, x)
    assert f.folded_norms == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("ln_1", "ln_2")]
    ln = f.transformer.h[0].ln_1
    assert type(ln) is nn.LayerNorm and not ln.elementwise_affine
    assert f.transformer.wte.weight is f.lm_head.weight                 # still tied
    with torch.no_grad():
        assert torch.allclose(f(**x).logits, m(**x).logits, atol=1e-5)
    spec = infer_spec(f, x, symmetries="all")
    assert _kinds(spec)["transformer.wte:in"] == "permutation"
    for seed in range(2):
        assert check_equivalence(f, spec, x, seed=seed) < 1e-5


@pytest.mark.parametrize("general_from", ["weights", "activations"])
@pytest.mark.parametrize("make,x", [
    (MLP, lambda: torch.randn(64, 8)),
    (LM, lambda: torch.randint(0, 50, (8, 7))),
])
def test_planted_elements_recovered_from_activations(make, x, general_from):
    torch.set_num_threads(1)
    a, inputs = make(), x()
    spec = infer_spec(a, inputs, symmetries="all")
    b = permute_model(a, spec, random_transforms(spec, seed=7))
    data = [inputs[i:i + 4] for i in range(0, len(inputs), 4)]
    res = auto_rebasin(a, b, inputs[:2], method="activation", data=data, symmetries="all",
                       progress=False, general_from=general_from)
    assert res.verify_error < 1e-5
    for k, v in a.state_dict().items():
        assert torch.allclose(res.model.state_dict()[k], v, atol=1e-4), k


@pytest.mark.parametrize("make,x", [(MLP, lambda: torch.randn(16, 8)),
                                    (lambda: RopeLM(), lambda: torch.randint(0, 50, (2, 7)))])
def test_merge_many_with_generalized_symmetries(make, x):
    """Three copies of one model under random elements of every kind (RoPE's pair
    maps among them) merge back into it."""
    from autobasin import merge_many
    torch.set_num_threads(1)
    a, x = make(), x()
    spec = infer_spec(a, x, symmetries="all")
    models = [a] + [permute_model(a, spec, random_transforms(spec, seed=s)) for s in (1, 2)]
    merged = merge_many(models, example_inputs=x, symmetries="all", progress=False)
    with torch.no_grad():
        assert torch.allclose(merged(x), a(x), atol=1e-4)
    with pytest.raises(NotImplementedError, match="weight"):
        merge_many(models, method="activation", data=[x], example_inputs=x, symmetries="all",
                   progress=False)


def test_fold_norms_measures_the_form_not_the_name():
    """T5's "T5LayerNorm" is an RMS norm: the form is fitted, not taken from the name;
    a folded model whose forward reads a removed gain raises FoldError, not AttributeError."""
    from autobasin.fold import FoldError, GainlessRMSNorm, fold_norms

    class T5LikeLayerNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), 1e-6

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class Net(nn.Module):
        def __init__(self, peek=False):
            super().__init__()
            self.n, self.fc, self.peek = T5LikeLayerNorm(8), nn.Linear(8, 3), peek

        def forward(self, x):
            y = self.fc(self.n(x))
            return y * self.n.weight.dtype.is_floating_point if self.peek else y
    x = torch.randn(4, 8)
    f = fold_norms(_perturbed(Net()), x)
    assert f.folded_norms == ["n"] and isinstance(f.n, GainlessRMSNorm)
    with pytest.raises(FoldError, match="does not run"):
        fold_norms(_perturbed(Net(peek=True)), x)


def test_casts_to_integers_admit_permutations_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b((self.a(x) * 3).long().float())
    spec = infer_spec(Net(), torch.randn(3, 4), symmetries="all")
    assert _kinds(spec) == {"a:out": "permutation"}


def test_a_rule_of_your_own_declares_its_kinds():
    """As the guide says: a user rule admits permutations only unless it declares more."""
    from autobasin.infer import rule

    class Traced(nn.Module):  # positively homogeneous: max(x, 0) / 2
        def forward(self, x):
            return torch.clamp(x, min=0) / 2

    class Squash(Traced):  # the same, behind a value check fx cannot trace: a leaf
        def forward(self, x):
            if bool(torch.isnan(x).any()):
                raise ValueError("NaN input")
            return torch.clamp(x, min=0) / 2

    class Plain(Squash):
        pass

    @rule(Squash, kinds={"scale"})
    def _squash(ctx):
        return list(ctx.layout(ctx.args[0]))

    @rule(Plain)
    def _plain(ctx):
        return list(ctx.layout(ctx.args[0]))

    # leaves take their rules' kinds; traced, clamp(min=0) / 2 is seen as a ReLU
    for act, kind in ((Squash, "scale"), (Plain, "permutation"), (Traced, "scale")):
        m = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 2))
        spec = infer_spec(m, torch.randn(3, 4), symmetries="all", capture="fx")
        assert _kinds(spec) == {"0:out": kind}, act
        assert check_equivalence(m, spec, torch.randn(3, 4)) < 1e-5


def test_fold_norms_folds_layer_scales_into_their_writers():
    """A LayerScale (x * gamma after a linear layer) moves into that layer; then the
    stream's LayerNorms centre and fold, and the stream admits orthogonal maps."""
    from autobasin.fold import fold_norms

    class LayerScale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((d,), 0.1))

        def forward(self, x):
            return x * self.gamma

    class ScaledBlock(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.n, self.up, self.down, self.ls = nn.LayerNorm(d), nn.Linear(d, 32), \
                nn.Linear(32, d), LayerScale(d)

        def forward(self, x):
            return x + self.ls(self.down(F.relu(self.up(self.n(x)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.b1, self.b2 = nn.Embedding(50, 16), ScaledBlock(), ScaledBlock()
            self.nf, self.head = nn.LayerNorm(16), nn.Linear(16, 50)

        def forward(self, ids):
            return self.head(self.nf(self.b2(self.b1(self.emb(ids)))))
    ids = torch.randint(0, 50, (2, 7))
    m = _perturbed(Net())
    assert _kinds(infer_spec(m, ids, symmetries="all"))["emb:in"] == "permutation"
    f = fold_norms(m, ids)
    assert f.folded_scales == ["b1.ls", "b2.ls"] and len(f.folded_norms) == 3
    with torch.no_grad():
        other = torch.randint(0, 50, (3, 5))
        assert torch.allclose(f(other), m(other), atol=1e-5)
    spec = infer_spec(f, ids, symmetries="all")
    assert _kinds(spec)["emb:in"] == "orthogonal"
    assert check_equivalence(f, spec, ids) < 1e-5


# ------------------------------------------------------------------ RoPE
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_pairs(x):  # GPT-J's interleaved form: pairs (0, 1), (2, 3), ...
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class RopeBlock(Block):
    """A block whose queries and keys get rotary position embeddings."""

    def __init__(self, form="half", d=16, h=2):
        super().__init__(d, h)
        self.form, hd = form, d // h
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)
        if form == "learned":  # a learned angle table whose halves are equal: for these weights
            self.table = nn.Embedding(16, hd)
            with torch.no_grad():
                self.table.weight[:, hd // 2:] = self.table.weight[:, :hd // 2]

    def forward(self, x):
        b, t, d = x.shape
        f = torch.outer(torch.arange(t, dtype=x.dtype), self.inv_freq)
        if self.form == "pairs":
            emb, rot = f.repeat_interleave(2, -1), _rotate_pairs
        elif self.form == "broken":  # the two halves at different frequencies
            emb, rot = torch.cat((f, 1.5 * f), -1), _rotate_half
        elif self.form == "learned":
            emb, rot = self.table(torch.arange(t)), _rotate_half
        else:
            emb, rot = torch.cat((f, f), -1), _rotate_half
        cos, sin = emb.cos(), emb.sin()
        y = self.n1(x)
        q, k, v = (g(y).view(b, t, self.h, -1).transpose(1, 2) for g in (self.q, self.k, self.v))
        if self.form == "complex":  # Llama 4's form: pairs (2i, 2i + 1) as complex numbers
            turn = torch.polar(torch.ones_like(f), f)

            def rope(z):
                zc = torch.view_as_complex(z.float().unflatten(-1, (-1, 2)))
                return torch.view_as_real(zc * turn).flatten(-2).type_as(z)
            q, k = rope(q), rope(k)
        else:
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.relu(self.up(self.n2(x))))


class RopeLM(LM):
    def __init__(self, form="half"):
        super().__init__()
        self.blocks = nn.Sequential(RopeBlock(form), RopeBlock(form))


def _rope_groups(spec):
    return {n: g for n, g in spec.groups.items() if g.pairs is not None}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form,partner", [("half", (4, 5, 6, 7, 0, 1, 2, 3)),
                                          ("pairs", (1, 0, 3, 2, 5, 4, 7, 6)),
                                          ("complex", (1, 0, 3, 2, 5, 4, 7, 6))])
def test_rope_head_dims_carry_pair_rotations(form, partner, capture):
    """RoPE fixes the q/k head dim for permutations, but maps acting on each
    frequency pair as a rotation times a scale commute with it: asked for as
    invertible maps they are "rotary", as orthogonal ones "rotation"; random
    elements of them keep what the model computes, a general map does not."""
    m, ids = RopeLM(form), torch.randint(0, 50, (2, 7))
    plain = infer_spec(m, ids, capture=capture)
    assert not _rope_groups(plain)
    assert any("q.weight[0" in n for n, _ in plain.fixed_axes())
    spec = infer_spec(m, ids, symmetries="all", capture=capture)
    rope = _rope_groups(spec)
    assert len(rope) == 2 and spec.coverage() == 1.0
    for g in rope.values():
        assert g.kind == "rotary" and g.pairs == partner and g.size == 8
        assert {m.param.split(".")[-2] for m in g.members} == {"q", "k"}
        assert all(m.contra == (m.param.split(".")[-2] == "k") for m in g.members)
    for seed in range(3):
        assert check_equivalence(m, spec, ids, seed=seed) < 1e-5
    assert {g.kind for g in _rope_groups(
        infer_spec(m, ids, symmetries="orthogonal", capture=capture)).values()} == {"rotation"}
    name = next(iter(rope))
    with pytest.raises(EquivalenceError):  # any invertible map of the head dim is too much
        check_equivalence(m, _with_kind(spec, name, "invertible"), ids)
    again = PermutationSpec.from_json(spec.to_json())
    assert again == spec and again.groups[name].pairs == partner


def test_rope_whose_pairs_differ_in_frequency_stays_fixed():
    m, ids = RopeLM("broken"), torch.randint(0, 50, (2, 7))
    spec = infer_spec(m, ids, symmetries="all")
    assert not _rope_groups(spec)
    assert any("q.weight[0" in n for n, _ in spec.fixed_axes())
    for seed in range(2):
        assert check_equivalence(m, spec, ids, seed=seed) < 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rope_with_a_learned_table_stays_fixed(capture):
    """Angles read from the state_dict (an Embedding of positions) are equal on
    each pair for these weights only: another checkpoint's table need not be, so
    the head dim gets no pair maps (at most permutations it shares with the table's
    columns), whether fx calls the module or export reads its weight."""
    m, ids = RopeLM("learned"), torch.randint(0, 50, (2, 7))
    spec = infer_spec(m, ids, symmetries="all", capture=capture)
    assert not _rope_groups(spec)
    for seed in range(2):
        assert check_equivalence(m, spec, ids, seed=seed) < 1e-5


def test_pair_elements_are_checked():
    m, ids = RopeLM(), torch.randint(0, 50, (2, 7))
    spec = infer_spec(m, ids, symmetries="all")
    name, grp = next(iter(_rope_groups(spec).items()))
    sd, good = m.state_dict(), random_transforms(spec, 3)
    apply_permutation(spec, good, sd)
    for wrong, match in ((torch.randperm(8), "identity"),
                         (torch.eye(8, dtype=torch.float64)[[1, 0, 2, 3, 4, 5, 6, 7]], "pair"),
                         (good[name] * torch.linspace(1, 2, 8, dtype=torch.float64), "pair")):
        if not wrong.is_floating_point() and torch.equal(wrong, torch.arange(8)):
            continue
        bad = dict(good)
        bad[name] = wrong
        with pytest.raises(SpecError, match=match):
            apply_permutation(spec, bad, sd)
    d = spec.to_dict()
    next(g for g in d["groups"] if g["name"] == name).pop("pairs")
    with pytest.raises(SpecError, match="pairs"):
        PermutationSpec.from_dict(d)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_planted_pair_rotations_recovered(method):
    """B is A under random elements of every group, RoPE's pair maps among them."""
    torch.set_num_threads(1)
    a, ids = RopeLM(), torch.randint(0, 50, (8, 7))
    spec = infer_spec(a, ids[:2], symmetries="all")
    b = permute_model(a, spec, random_transforms(spec, seed=5))
    r = general_weight_matching(spec, a.state_dict(), b.state_dict())
    assert r.distance < 1e-5 * r.initial_distance
    data = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    res = auto_rebasin(a, b, ids[:2], method=method, data=data, symmetries="all",
                       progress=False)
    assert res.verify_error < 1e-5
    for k, v in a.state_dict().items():
        assert torch.allclose(res.model.state_dict()[k], v, atol=1e-4), k
