"""Each rule family, exercised by a small module: the inferred spec must find
the expected groups and random permutations must leave outputs equal."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobasin import check_equivalence
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_


def exact(model, *inputs, min_groups=1, capture="auto"):
    model = randomize_state_(model.eval())
    spec = infer_spec(model, inputs, capture=capture)
    assert len(spec.groups) >= min_groups, str(spec)
    for seed in range(3):
        assert check_equivalence(model, spec, inputs, seed=seed) <= 1e-4
    return spec


def group_with(spec, param, axis=0):
    hits = [g for g in spec.groups.values() if any(m.param == param and m.axis == axis for m in g.members)]
    assert hits, f"no group on {param}[{axis}]:\n{spec}"
    return hits


class Grouped(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=groups)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gn = nn.GroupNorm(4, 32)
        self.out = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)))
        x = self.gn(self.dw(self.g(x)))
        return self.out(F.gelu(x)).mean((2, 3))


def test_grouped_depthwise_and_groupnorm_are_exact_not_blocked():
    spec = exact(Grouped(), torch.randn(2, 3, 8, 8))
    # grouped conv input: (groups=4) x (4 per group); output (4 groups) x (8 per group)
    in_groups = group_with(spec, "a.weight", 0)
    assert sorted(g.size for g in in_groups) == [4, 4]
    assert spec.coverage() > 0.9


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(13, 7)
        self.d = nn.Linear(4, 3)
        self.e = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1)
        y = self.c(h)
        p, q = torch.split(y, [4, 3], dim=-1)
        r, s = y.chunk(2, dim=-1)[0], y[..., 4:]
        return self.d(p) + self.e(q) + s.sum(-1, keepdim=True) + r.mean(-1, keepdim=True)


def test_cat_split_chunk_slice_are_segment_exact():
    spec = exact(ConcatSplit(), torch.randn(3, 6), min_groups=2)
    sizes = sorted(g.size for g in spec.groups.values())
    assert 8 in sizes and 5 in sizes  # each concat segment is its own group


class ConvFlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def test_conv_flatten_linear_gets_channel_permutation():
    spec = exact(ConvFlattenLinear(), torch.randn(2, 1, 6, 6), min_groups=2)
    g = group_with(spec, "conv.weight")[0]
    fc_member = next(m for m in g.members if m.param == "fc.weight")
    assert fc_member.axis == 1 and fc_member.shape == (6, 4, 4) and fc_member.dim == 0


class Attention(nn.Module):
    def __init__(self, dim=24, heads=4, fused=True):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 6, dim))
        self.embed = nn.Linear(5, dim)
        self.head = nn.Linear(dim, 3)
        self.ls = nn.Parameter(torch.ones(dim) * 0.5)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            a = att.softmax(-1) @ v
        x = x + self.ls * self.proj(a.transpose(1, 2).reshape(b, n, c))
        return self.head(x[:, 0])


@pytest.mark.parametrize("fused", [True, False])
def test_attention_heads_and_head_dims(fused):
    spec = exact(Attention(fused=fused), torch.randn(2, 5, 5), min_groups=4)
    qkv_groups = group_with(spec, "qkv.weight", 0)
    # residual (via in-axis), heads (4), q/k head-dim (6), v head-dim (6)
    out_axis = sorted(g.size for g in qkv_groups)
    assert out_axis == [4, 6, 6]
    assert group_with(spec, "cls", 2)[0] is group_with(spec, "ls", 0)[0]


def test_multihead_attention_rule():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            h = self.inp(x)
            a, _ = self.mha(h, h, h)
            return self.out(h + a)
    spec = exact(M(), torch.randn(2, 5, 4), min_groups=3)
    sizes = sorted(g.size for g in group_with(spec, "mha.in_proj_weight", 0))
    assert sizes == [4, 4, 4]



def test_multihead_attention_with_other_key_and_value_sizes():
    """kdim/vdim: separate q/k/v projection weights; the key/value inputs'
    features are their own group."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(4, 16), nn.Linear(4, 6)
            self.mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=6, batch_first=True)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            kv = self.kv(x)
            return self.out(self.mha(self.q(x), kv, kv, need_weights=False)[0])
    spec = exact(M(), torch.randn(2, 5, 4), min_groups=5)
    assert not spec.blocked
    assert sorted(g.size for g in group_with(spec, "mha.q_proj_weight", 0)) == [4, 4]
    assert [g.size for g in group_with(spec, "mha.k_proj_weight", 1)] == [6]


def test_a_failing_module_rule_leaves_every_tensor_of_the_module_fixed():
    """A rule that relates some axes and then raises must not leave those
    relations behind: the module's parameters stay out of every group."""
    from autobasin.infer.registry import rule

    class Half(nn.Linear):
        def forward(self, x):
            if not torch.isfinite(x).all():  # reads values: an opaque leaf for fx
                raise ValueError("non-finite input")
            return super().forward(x)

    @rule(Half)
    def _half_then_fail(ctx):
        w = ctx.param("weight")
        ctx.union(w[0], ctx.layout(ctx.args[0])[-1])  # a wrong relation...
        raise RuntimeError("...and then the rule fails")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h, self.b = nn.Linear(3, 6), Half(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.h(self.a(x)))
    # fx: the opaque leaf's module rule runs (torch.export would trace its body)
    spec = exact(M(), torch.randn(4, 3), min_groups=0, capture="fx")
    assert any("and then the rule fails" in reason for _, reason in spec.blocked)
    assert not any(m.param.startswith("h.") for g in spec.groups.values() for m in g.members)


class BiasFromBuffers(nn.Module):
    """EVA-style attention: the qkv bias is cat(q_bias, k_bias, v_bias) with
    k_bias a buffer outside the state_dict (zero unless ``k_bias`` is given)."""

    def __init__(self, k_bias=None):
        super().__init__()
        self.inp, self.qkv, self.out = nn.Linear(4, 8), nn.Linear(8, 24, bias=False), nn.Linear(8, 2)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.register_buffer("k_bias", torch.zeros(8) if k_bias is None else k_bias,
                             persistent=False)

    def forward(self, x):
        h = self.inp(x)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(h, self.qkv.weight, bias).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8)
        return self.out(a)


class HeadGroups(nn.Module):
    """coat-style: attention values of 6 heads x 4 dims, merged back into
    channels and split into groups of 2, 1 and 3 heads, each scaled by its own
    parameter (coat's per-group convolutions)."""

    def __init__(self):
        super().__init__()
        self.qk, self.v, self.out = nn.Linear(4, 48), nn.Linear(4, 24), nn.Linear(24, 2)
        self.scales = nn.ParameterList([nn.Parameter(torch.randn(n)) for n in (8, 4, 12)])

    def forward(self, x):
        qk = self.qk(x).reshape(2, 5, 2, 6, 4).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        v = self.v(x).reshape(2, 5, 6, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 24)
        parts = torch.split(a, [8, 4, 12], dim=-1)
        scaled = [parts[i] * self.scales[i] for i in range(3)]
        return self.out(torch.cat(scaled, dim=-1))


def test_heads_split_into_groups_move_within_their_group():
    spec = exact(HeadGroups(), torch.randn(2, 5, 4))
    # v's output: head-dim (4), and heads 0-1 and 3-5 permuted within their
    # groups (the single head 2 stays)
    assert sorted(g.size for g in group_with(spec, "v.weight", 0)) == [2, 3, 4]

def test_a_constant_buffer_outside_the_state_dict_does_not_fix_its_axis():
    x = torch.randn(2, 5, 4)
    free = BiasFromBuffers().eval()  # no randomize_state_: it would perturb the zero k_bias
    spec = infer_spec(free, x)
    for seed in range(3):
        assert check_equivalence(free, spec, x, seed=seed) <= 1e-4
    # heads, and one head-dim permutation shared by q, k and v (the bias is a
    # concatenation of the three, so each segment must take the same one)
    assert sorted(g.size for g in group_with(spec, "qkv.weight", 0)) == [2, 4]
    # a k_bias that varies along the axis fixes it (and stays exact)
    fixed = BiasFromBuffers(torch.randn(8)).eval()
    spec = infer_spec(fixed, x)
    for seed in range(3):
        assert check_equivalence(fixed, spec, x, seed=seed) <= 1e-4
    assert not any(m.param == "qkv.weight" and m.axis == 0
                   for g in spec.groups.values() for m in g.members)

class Gates(nn.Module):
    """Squeeze-excite gate, layer scale, einsum, RMSNorm, ConvTranspose, embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 12)
        self.se1 = nn.Linear(12, 3)
        self.se2 = nn.Linear(3, 12)
        self.rms = nn.RMSNorm(12)
        self.w = nn.Parameter(torch.randn(12, 7))
        self.convt = nn.ConvTranspose1d(7, 5, 3, groups=1)
        self.head = nn.Linear(5, 2)

    def forward(self, idx):
        h = torch.relu(self.fc(self.emb(idx)))            # (B, T, 12)
        gate = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean(1)))))
        h = self.rms(h * gate.unsqueeze(1))
        h = torch.einsum("btc,cd->bdt", h, self.w)         # (B, 7, T)
        h = F.silu(self.convt(h))                          # (B, 5, T+2)
        return self.head(h.amax(-1))


def test_gates_einsum_rmsnorm_convtranspose_embedding():
    spec = exact(Gates(), torch.randint(0, 11, (2, 6)), min_groups=4)
    assert group_with(spec, "fc.weight")[0] is group_with(spec, "w", 0)[0]
    assert group_with(spec, "se1.weight")
    assert group_with(spec, "convt.weight", 1)


class LayerNorm2dBlock(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import LayerNorm2d
        self.stem = nn.Conv2d(3, 8, 1)
        self.norm = LayerNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.out = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.out(F.gelu(self.pw(self.norm(x))))
        x = F.interpolate(x, scale_factor=2.0)
        x = F.pad(x, (1, 1, 1, 1))
        x = F.adaptive_avg_pool2d(F.max_pool2d(x, 2), 1).flatten(1)
        return self.head(x)


def test_layernorm2d_residual_pool_pad_interpolate():
    spec = exact(LayerNorm2dBlock(), torch.randn(2, 3, 6, 6), min_groups=2)
    assert group_with(spec, "norm.weight")[0] is group_with(spec, "stem.weight")[0]


class Opaque(nn.Module):
    """A submodule with data-dependent control flow becomes an opaque leaf."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.weird = Weird()
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.weird(torch.relu(self.a(x))))))


class Weird(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_submodule_becomes_opaque_with_warning():
    model = Opaque()
    with pytest.warns(UserWarning, match="weird"):
        spec = infer_spec(model, torch.randn(2, 4))
    # the axes around the opaque module are fixed; the one after it is free
    assert not any(m.param == "a.weight" and m.axis == 0 for g in spec.groups.values() for m in g.members)
    assert group_with(spec, "b.weight")
    assert check_equivalence(model, spec, torch.randn(2, 4)) <= 1e-4
    assert any("weird" in name for name, _ in spec.blocked)


def test_op_without_rule_fails_closed_and_says_why():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.special.i0(self.a(x)))))
    spec = infer_spec(M(), torch.randn(2, 3))
    assert set(spec.groups) == {"b:out"}
    assert any("i0" in reason for _, reason in spec.blocked)


def test_top_level_untraceable_is_a_clear_error():
    from autobasin.trace import TraceError

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return x
    # a branch on the inputs alone: the graph these inputs run, with a warning
    # that says so (torch.fx and torch.export cannot capture it for every input)
    with pytest.warns(UserWarning, match="branch depends on the values of the example inputs"):
        spec = infer_spec(M(), torch.ones(2, 3))
    assert spec.capture == "export" and not spec.groups  # a's outputs are the model's

    class OnWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            if h.mean() > 0:  # another checkpoint may take the other branch
                h = h * 2
            return self.b(h)
    # a branch on values computed from the weights: no graph of one branch is
    # a spec for every checkpoint; the error names the line
    with pytest.raises(TraceError, match=r"branches on values computed from its weights "
                                         r"\(__bool__ at .*test_rules.py:\d+ in forward\)"):
        infer_spec(OnWeights(), torch.randn(2, 3))


def test_user_overrides_opaque_and_fixed():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    assert set(infer_spec(model, x).groups) == {"0:out", "2:out"}
    assert set(infer_spec(model, x, fixed=["0:out"]).groups) == {"2:out"}
    spec = infer_spec(model, x, opaque=["2"])
    assert set(spec.groups) == set()


def test_wrong_spec_is_caught_and_names_the_node():
    from autobasin import EquivalenceError, Group, Member
    model = randomize_state_(ConvFlattenLinear().eval())
    x = torch.randn(2, 1, 6, 6)
    spec = infer_spec(model, x)
    g = group_with(spec, "conv.weight")[0]
    # drop the member on fc: permuting conv channels no longer reaches fc
    broken = [m for m in g.members if m.param != "fc.weight"]
    spec.groups[g.name] = Group(g.name, g.size, broken)
    with pytest.raises(EquivalenceError, match="first diverging graph node: (fc|flatten|relu)"):
        check_equivalence(model, spec, x)


def test_roll_and_flip_fix_only_their_axes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):  # x: (B, T, 3)
            h = torch.roll(self.a(x), shifts=1, dims=1).flip(1).cumsum(1)
            return self.b(torch.relu(h)).sum(1)
    spec = exact(M(), torch.randn(2, 5, 3))
    assert group_with(spec, "a.weight")


class ScaleIfPositive(nn.Module):
    """Untraceable (branches on values) and returns its input unchanged on
    some inputs: that must not be taken for an identity."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        if x.mean() > 0:
            return x * self.scale[:, None, None]
        return x


def test_opaque_module_returning_its_input_once_is_not_an_identity():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), ScaleIfPositive(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = -torch.rand(2, 3, 8, 8) - 1  # mean < 0: the module passes x through here
    with pytest.warns(UserWarning):
        spec = infer_spec(model, x)
    # conv0's output feeds an opaque module whose parameter is unknown to the spec
    assert not any(m.param == "0.weight" and m.axis == 0 for g in spec.groups.values() for m in g.members)
    with torch.no_grad():
        model[0].bias.fill_(5.0)  # now the other branch runs
    assert check_equivalence(model, spec, torch.rand(2, 3, 8, 8)) <= 1e-4


class AddRelInPlace(nn.Module):
    """Untraceable (item assignment on a proxy); returns its input object,
    but written into: that is not an identity."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(8))

    def forward(self, h):
        h[:, 1:] = h[:, 1:] + self.rel
        return h


def test_opaque_call_that_mutates_its_input_is_not_a_pass_through():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(3, 8), nn.Linear(8, 2)
            self.inplace = AddRelInPlace()

        def forward(self, x):
            return self.c(torch.relu(self.inplace(self.a(x))))
    model = M().eval()
    with pytest.warns(UserWarning, match="inplace"):
        spec = infer_spec(model, torch.randn(2, 4, 3), capture="fx")
    assert not any(m.param == "inplace.rel" for g in spec.groups.values() for m in g.members)
    assert not any(m.param == "a.weight" and m.axis == 0 for g in spec.groups.values() for m in g.members)
    assert check_equivalence(model, spec, torch.randn(2, 4, 3)) <= 1e-4
    # torch.export sees the write into the slice: rel follows a's output features
    spec = infer_spec(model, torch.randn(2, 4, 3))
    assert spec.capture == "export"
    (group,) = spec.groups.values()
    assert {(m.param, m.axis) for m in group.members} >= {("a.weight", 0), ("inplace.rel", 0),
                                                          ("c.weight", 1)}
    for seed in (0, 1):
        assert check_equivalence(model, spec, torch.randn(2, 4, 3), seed=seed) <= 1e-4


class _InnerLeaf(nn.Module):
    """Untraceable by fx (a shape check fx cannot follow), with a parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("bad input")
        return torch.relu(self.fc(x))


class _OuterLeaf(nn.Module):
    """Untraceable too, holding two instances of the inner leaf."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _InnerLeaf(), _InnerLeaf()

    def forward(self, x):
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        return self.b(self.a(x))


def test_leaves_nested_in_leaves_keep_their_full_names_and_own_groups():
    """A leaf inside a leaf, two sibling instances of each: every instance's
    tensors are named by their full path (never shared between instances),
    each hidden layer is its own group, and the spec is exact."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.left, self.right, self.out = (nn.Linear(4, 8), _OuterLeaf(),
                                                         _OuterLeaf(), nn.Linear(8, 2))

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.left(h) + self.right(h))
    torch.manual_seed(0)
    model = randomize_state_(Net().eval(), 0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(model, torch.randn(3, 4), capture="fx")
    owners = {}
    for g in spec.groups.values():
        for m in g.members:
            if m.param.endswith("fc.weight") and m.axis == 0:
                owners.setdefault(g.name, set()).add(m.param)
    inner = [f"{side}.{leaf}.fc.weight" for side in ("left", "right") for leaf in ("a", "b")]
    # the outputs of left.b and right.b meet in the sum: one group; left.a and right.a alone
    assert sorted(map(sorted, owners.values())) == sorted(
        [["left.a.fc.weight"], ["right.a.fc.weight"], ["left.b.fc.weight", "right.b.fc.weight"]])
    assert set().union(*owners.values()) == set(inner)
    for seed in (0, 1):
        assert check_equivalence(model, spec, torch.randn(3, 4), seed=seed) <= 1e-5
    assert infer_spec(model, torch.randn(3, 4), capture="fx").groups.keys() == spec.groups.keys()


class OverlappingChunks(nn.Module):
    """Longformer's chunking: overlapping windows of the sequence as an
    as_strided view whose rows are whole rows of the input (sizes and strides
    read from the tensor, as the model does)."""

    def __init__(self, misaligned=False):
        super().__init__()
        self.misaligned = misaligned
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: (B, 8, 6)
        h = self.inp(x)
        # windows of 4 positions, overlapping by 2: (B, 3, 4, 16)
        size = [h.size(0), 3, 4, h.size(2)]
        stride = [h.stride(0), 2 * h.stride(1), h.stride(1), h.stride(2)]
        if self.misaligned:  # rows that start inside a row of h: positions mix
            chunks = h.as_strided([h.size(0), 3, 4, h.size(2) - 1], stride, 1)
            return self.out(F.pad(torch.relu(chunks), (0, 1))).sum(2)
        chunks = h.as_strided(size=size, stride=stride)
        return self.out(torch.relu(chunks)).sum(2)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_as_strided_keeps_the_axes_of_whole_rows(capture):
    x = torch.randn(2, 8, 6)
    spec = exact(OverlappingChunks(), x, capture=capture)
    assert "inp:out" in spec.groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = infer_spec(OverlappingChunks(misaligned=True).eval(), x, capture=capture)
    assert "inp:out" not in bad.groups  # a view across rows fixes the hidden axis


class TransposedChunks(nn.Module):
    """Windows over positions of a transposed (non-contiguous) tensor: the
    as_strided view keeps the batch axis and the hidden axis, which sits in
    the middle with stride 1 (Longformer chunks batch x heads this way)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: (B, 8, 6)
        ht = self.inp(x).transpose(1, 2)  # (B, 16, 8), strides (128, 1, 16)
        chunks = ht.as_strided((ht.size(0), 16, 3, 4),
                               (ht.stride(0), ht.stride(1), 2 * ht.stride(2), ht.stride(2)))
        return self.out(torch.relu(chunks).permute(0, 2, 3, 1)).sum(2)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_as_strided_of_a_transposed_tensor_keeps_its_axes(capture):
    spec = exact(TransposedChunks(), torch.randn(2, 8, 6), capture=capture)
    assert "inp:out" in spec.groups


class CopiesRows(nn.Module):
    """Rows written into a fresh tensor in another order with index_copy."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: (N, 6)
        h = torch.relu(self.inp(x))
        order = torch.arange(h.size(0) - 1, -1, -1)
        return self.out(torch.zeros_like(h).index_copy(0, order, h))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_index_copy_carries_the_other_axes(capture):
    spec = exact(CopiesRows(), torch.randn(5, 6), capture=capture)
    assert "inp:out" in spec.groups


class CallsAnOutputModule(nn.Module):
    """A submodule returning a Hugging Face ModelOutput, read with ``[0]``."""

    def __init__(self):
        super().__init__()
        from transformers.modeling_outputs import BaseModelOutput

        class Body(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 16)

            def forward(self, x):
                return BaseModelOutput(last_hidden_state=self.fc(x))
        self.body, self.head = Body(), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)[0]))


def test_a_model_output_indexed_like_a_tuple():
    pytest.importorskip("transformers")
    spec = exact(CallsAnOutputModule(), torch.randn(4, 6), capture="fx")
    assert "body.fc:out" in spec.groups


class GQAInside(nn.Module):
    """Grouped-query attention done by SDPA itself (enable_gqa=True): 4 query heads
    share 2 key/value heads, query head h reads key/value head h // 2."""

    def __init__(self, e=16, hq=4, hkv=2, d=4, hv=None):
        super().__init__()
        self.hq, self.hkv, self.hv, self.d = hq, hkv, hv or hkv, d
        self.q, self.k = nn.Linear(e, hq * d), nn.Linear(e, hkv * d)
        self.v, self.o = nn.Linear(e, self.hv * d), nn.Linear(hq * d, e)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.hq, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.hv, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_grouped_query_attention_inside_sdpa_permutes_kv_heads_and_groups(capture):
    spec = exact(GQAInside(), torch.randn(2, 5, 16), capture=capture)
    heads = [g for g in spec.groups.values() if g.size == 2 and any(
        m.param == "k.weight" and m.axis == 0 for m in g.members)]
    assert heads, str(spec)  # the kv heads: k, v and the query heads' first factor
    assert any(m.param == "q.weight" for m in heads[0].members)
    assert not any("grouped-query" in why for _, why in spec.fixed_axes()), spec.fixed_axes()


def test_sdpa_gqa_with_as_many_value_heads_as_query_heads():
    """Keys in 2 heads, values in 4 (NVIDIA's Nemotron audio encoders): query and
    value heads permute together, in whole groups of the key heads."""
    spec = exact(GQAInside(hv=4), torch.randn(2, 5, 16), capture="export")
    assert any(m.param == "k.weight" for g in spec.groups.values() for m in g.members
               if g.size == 2 and m.axis == 0)


class MaskedRows(nn.Module):
    """Rows of a (B, T, E) tensor picked by a (B, T) boolean mask from the input
    ids (Higgs-Audio's audio tokens): the mask consumes both axes. ``mode``
    "expanded": the same flags expanded along E (audio LMs' placeholder mask),
    whole rows flattened; "elementwise": a mask that differs along E."""

    def __init__(self, mode="rows"):
        super().__init__()
        self.mode = mode
        self.emb, self.fc, self.out = nn.Embedding(10, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))  # (B, T, 16)
        if self.mode == "over_hidden":  # entries picked along the hidden axis: it must stay fixed
            picked = h[:, 0][h[:, 0] > 0.1]
            return self.out.weight.sum() * picked.sum() + self.out(h).sum()
        if self.mode == "expanded":
            picked = h[(ids > 4).unsqueeze(-1).expand_as(h)]
            return self.out(picked.view(-1, h.shape[-1])).sum(0)
        if self.mode == "elementwise":  # which entries: depends on the hidden axis
            picked = h[h > 0.1]
            return self.out.weight.sum() * picked.sum() + self.out(h).sum()
        return self.out(h[ids > 4]).sum(0)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_boolean_mask_index_consumes_all_its_axes(capture):
    ids = torch.tensor([[1, 7, 3, 9, 5], [6, 2, 8, 0, 4]])
    spec = exact(MaskedRows(), ids, capture=capture)
    assert "fc:out" in spec.groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("over_hidden", "elementwise"):  # a mask over the hidden units fixes them
            hidden = infer_spec(randomize_state_(MaskedRows(mode).eval()), ids, capture=capture)
            assert "fc:out" not in hidden.groups, mode
    # the row flags expanded along the hidden axis: whole rows, in order
    assert "fc:out" in exact(MaskedRows("expanded"), ids, capture=capture).groups
    empty = torch.zeros(2, 5, dtype=torch.long)  # no row selected: still inferred
    assert "fc:out" in exact(MaskedRows(), empty, capture=capture).groups


class TriangularSolve(nn.Module):
    """A per-head lower-triangular solve over time (Qwen3.5's chunked gated
    delta rule): the heads and both head-dims permute; time stays in order."""

    def __init__(self):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(8, 4 * 6), nn.Linear(8, 4 * 6), nn.Linear(4 * 6, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 6).transpose(1, 2)
        v = self.v(x).view(b, t, 4, 6).transpose(1, 2)
        a = torch.tril(q @ q.transpose(-1, -2)) * 0.1 + torch.eye(t)
        y = torch.linalg.solve_triangular(a, v, upper=False)
        return self.o(y.transpose(1, 2).reshape(b, t, 24))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_triangular_solve_keeps_heads_and_head_dims(capture):
    spec = exact(TriangularSolve(), torch.randn(2, 5, 8), capture=capture)
    assert spec.coverage() == 1.0
    assert sorted(g.size for g in spec.groups.values()) == [4, 6, 6]


class ComplexRoPE(nn.Module):
    """Attention with rotary embeddings applied as complex products (Llama 4's style):
    view_as_complex on (..., pairs, 2), a complex table outside the state_dict, view_as_real."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        angles = torch.arange(5)[:, None] * torch.rand(self.hd // 2)[None]
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rotate(self, t):
        c = torch.view_as_complex(t.float().reshape(3, 5, self.heads, self.hd // 2, 2))
        gain = torch.polar(self.q.weight[:, :1].abs().mean() + torch.ones(()), torch.zeros(()))
        return torch.view_as_real(c * self.freqs[None, :, None] * gain).flatten(3).transpose(1, 2)

    def forward(self, x):
        q, k = self.rotate(self.q(x)), self.rotate(self.k(x))
        v = self.v(x).view(3, 5, self.heads, self.hd).transpose(1, 2)
        att = (q @ k.transpose(-1, -2) / self.hd ** 0.5).softmax(-1)
        return self.o((att @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_complex_rope_views_keep_real_and_imaginary_parts_fixed(capture):
    spec = exact(ComplexRoPE(), torch.randn(3, 5, 16), capture=capture)
    # heads permute; q/k pairs stay (the table is not in the state_dict), v's head dims permute
    sizes = sorted(g.size for g in spec.groups.values())
    assert 2 in sizes and 8 in sizes, sizes


def test_grid_sample_and_antialiased_resize_pass_channels():
    """grid_sample / antialiased bicubic resizing act on every channel alike: a conv's
    channels stay permuted through them (a resized position table, GLM-4V's and
    DeepSeek-OCR's vision towers)."""
    import torch.nn.functional as F
    from autobasin import check_equivalence, infer_spec

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x, grid):
            y = F.grid_sample(self.conv(x), grid, align_corners=False)
            y = F.interpolate(y, size=(5, 5), mode="bicubic", antialias=True)
            return self.head(y.mean((2, 3)))
    x, grid = torch.randn(2, 3, 10, 10), torch.rand(2, 6, 6, 2) * 2 - 1
    for capture in ("fx", "export"):
        spec = infer_spec(Net(), (x, grid), capture=capture)
        assert "conv:out" in spec.groups and spec.coverage() == 1.0, capture
        for seed in range(2):
            assert check_equivalence(Net(), spec, (x, grid), seed=seed) < 1e-5


class PadsSequences(nn.Module):
    """Variable-length pieces of a batch padded into one (audio chunks)."""

    def __init__(self, pad=0.0):
        super().__init__()
        self.pad = pad
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: (7, 6)
        h = torch.relu(self.inp(x))
        padded = nn.utils.rnn.pad_sequence([h[:3], h[3:]], batch_first=True, padding_value=self.pad)
        return self.out(padded)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("pad", [0.0, 1.5])
def test_pad_sequence_carries_the_feature_axes(capture, pad):
    spec = exact(PadsSequences(pad), torch.randn(7, 6), capture=capture)
    assert "inp:out" in spec.groups


class FourierMix(nn.Module):
    """FNet-style token mixing by a Fourier transform along the sequence (the
    hidden axis passes through) or along sequence and hidden (it is mixed), and
    an autocorrelation along the sequence (Autoformer: a spectrum times its
    conjugate, which torch.export records as ``aten._conj``)."""

    def __init__(self, dims=(1,)):
        super().__init__()
        self.dims = dims
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: (B, 8, 6)
        h = torch.relu(self.inp(x))
        spectrum = torch.fft.rfft(h, dim=1)
        return self.out(torch.fft.fftn(h, dim=self.dims).real + torch.fft.irfft(
            spectrum * torch.conj(spectrum), n=h.size(1), dim=1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_fft_along_positions_carries_the_hidden_axis(capture):
    x = torch.randn(2, 8, 6)
    spec = exact(FourierMix(), x, capture=capture)
    assert "inp:out" in spec.groups
    mixed = infer_spec(FourierMix(dims=(1, 2)).eval(), x, capture=capture)
    assert "inp:out" not in mixed.groups
    assert any("fftn mixes positions" in why for _, why in mixed.fixed_axes())


class PoolsBoxes(nn.Module):
    """Features of boxes pooled with torchvision's roi_align (detection heads)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16 * 4, 4)

    def forward(self, x, boxes):
        import torchvision
        h = torch.relu(self.inp(x))
        return self.out(torchvision.ops.roi_align(h, boxes, (2, 2), 1.0, 2, True).flatten(1))


@pytest.mark.parametrize("capture", ["auto", "export"])  # fx cannot trace torchvision's checks
def test_roi_align_carries_the_channels(capture):
    pytest.importorskip("torchvision")
    boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [1, 0.0, 2.0, 7.0, 7.0], [1, 2.0, 2.0, 4.0, 6.0]])
    spec = exact(PoolsBoxes(), torch.randn(2, 3, 8, 8), boxes, capture=capture)
    assert "inp:out" in spec.groups


class MergesWindows(nn.Module):
    """Sequence positions reordered into windows by a computed index, then each
    window's entries concatenated (MiniCPM-V's window merger)."""

    def __init__(self):
        super().__init__()
        self.inp, self.merge, self.out = nn.Linear(6, 16), nn.Linear(32, 5), nn.Linear(5, 4)

    def forward(self, x):  # x: (B, 8, 6)
        h = torch.relu(self.inp(x))
        order = torch.arange(h.size(1)).view(-1, 2).flip(0).flatten()
        windows = h[:, order, :].reshape(h.size(0), -1, 2 * h.size(2))
        return self.out(torch.relu(self.merge(windows)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_positions_gathered_from_positions_stay_positions(capture):
    spec = exact(MergesWindows(), torch.randn(2, 8, 6), capture=capture)
    assert "inp:out" in spec.groups and "merge:out" in spec.groups
    # the window's two positions inside merge's input are structural, not a lost symmetry
    assert not [e for e, why in spec.fixed_axes() if e.startswith("merge.weight")], spec.fixed_axes()
    assert spec.coverage() == 1.0


class PoolsAlongOneAxis(nn.Module):
    """Funnel's pooling of (sequence, hidden) as an image with a (2, 1) window:
    the hidden axis is never mixed."""

    def __init__(self, pool="avg"):
        super().__init__()
        self.pool = pool
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: (B, 8, 6)
        h = torch.relu(self.inp(x))[:, None]
        fn = F.avg_pool2d if self.pool == "avg" else F.max_pool2d
        # "mixed": a (2, 3) window, padded to keep the hidden size, mixes neighbours
        pooled = fn(h, (2, 1), stride=(2, 1)) if self.pool != "mixed" else \
            F.avg_pool2d(h, (2, 3), stride=(2, 1), padding=(0, 1))
        return self.out(pooled[:, 0])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_pooling_with_a_window_of_one_passes_that_axis(capture):
    x = torch.randn(2, 8, 6)
    for pool in ("avg", "max"):
        spec = exact(PoolsAlongOneAxis(pool), x, capture=capture)
        assert "inp:out" in spec.groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = infer_spec(PoolsAlongOneAxis("mixed").eval(), torch.randn(2, 8, 6), capture=capture)
    assert "inp:out" not in mixed.groups


class Bags(nn.Module):
    """``nn.EmbeddingBag`` then an MLP: bags of a 2-D batch, or cut by offsets."""

    def __init__(self, mode, max_norm=None):
        super().__init__()
        self.e = nn.EmbeddingBag(30, 16, mode=mode, max_norm=max_norm)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 2)

    def forward(self, x, offsets=None):
        return self.fc2(F.relu(self.fc1(self.e(x, offsets))))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_passes_its_embedding_axis(capture, mode):
    model = randomize_state_(Bags(mode).eval())
    for x in ((torch.randint(0, 30, (3, 4)),),                      # equal bags, one a row
              (torch.randint(0, 30, (10,)), torch.tensor([0, 3, 7]))):  # cut by offsets
        spec = infer_spec(model, x, capture=capture, symmetries="all")
        assert spec.coverage() == 1.0 and spec.axis_kinds("e.weight") == ["structural", "permuted"]
        # a sum or mean is linear in the rows; a max only commutes with permutations
        assert spec.groups["e:in"].kind == ("permutation" if mode == "max" else "invertible")
        for seed in range(3):
            assert check_equivalence(model, spec, x, seed=seed) < 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_embedding_rows_renormalised_to_max_norm_admit_permutations_only(capture):
    """``max_norm`` shortens rows longer than it, in place: a permutation of the
    embedding axis keeps every row's norm, a general map does not."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.fc = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.e(x))

    model, x = randomize_state_(M().eval(), scale=1.0), torch.randint(0, 20, (2, 5))
    spec = infer_spec(model, x, capture=capture, symmetries="all")
    assert spec.coverage() == 1.0 and all(g.kind == "permutation" for g in spec.groups.values())
    for seed in range(3):
        assert check_equivalence(model, spec, x, seed=seed) < 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_bilinear_contracts_each_input_with_its_weight_axis(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(5, 6)
            self.bl, self.out = nn.Bilinear(8, 6, 10), nn.Linear(10, 2)

        def forward(self, x, y):
            return self.out(torch.relu(self.bl(torch.relu(self.a(x)), torch.tanh(self.b(y)))))

    model, x = randomize_state_(M().eval()), (torch.randn(3, 4), torch.randn(3, 5))
    spec = infer_spec(model, x, capture=capture)
    assert spec.coverage() == 1.0 and len(spec.groups) == 3
    assert spec.axis_kinds("bl.weight") == ["permuted"] * 3
    general = infer_spec(model, x, capture=capture, symmetries="all")
    for s in (spec, general):
        for seed in range(3):
            assert check_equivalence(model, s, x, seed=seed) < 1e-5


def test_indexing_by_a_list_of_positions():
    """``h[:, [4, 0, 2]]`` picks hidden units by a constant list: that axis is fixed
    (with its reason, not a failing rule); a list of consecutive positions is a slice."""
    class M(nn.Module):
        def __init__(self, picks):
            super().__init__()
            self.picks = picks
            self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(len(picks), 3)

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x)))[:, self.picks])

    x = torch.randn(3, 6)
    scattered = randomize_state_(M([4, 0, 2, 9, 1]).eval())
    spec = infer_spec(scattered, x, capture="fx")
    assert [r for r, _ in spec.fixed_reasons()] == ["getitem: picked by a list of positions"]
    assert spec.axis_kinds("b.weight")[0] == "fixed"
    run = randomize_state_(M([3, 4, 5, 6]).eval())
    spec_run = infer_spec(run, x, capture="fx")
    assert spec_run.axis_kinds("b.weight")[0] == "permuted"   # a slice: its pieces permute
    for model, s in ((scattered, spec), (run, spec_run)):
        for seed in range(3):
            assert check_equivalence(model, s, x, seed=seed) < 1e-5


def test_a_method_without_a_rule_is_blocked_with_its_name():
    """A tensor method no rule covers fixes what it reads, saying so (not a rule crash)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.einsum("bi,bj->bij", h, self.b(h)).diagonal(dim1=1, dim2=2))

    model, x = randomize_state_(M().eval()), torch.randn(3, 6)
    spec = infer_spec(model, x, capture="fx")
    assert spec.blocked_ops() == [("diagonal", "no rule for method .diagonal()")]
    assert check_equivalence(model, spec, x) < 1e-5


ORDER_STATS = {
    "median": lambda v: v.median(-1, keepdim=True).values,
    "median_dropped": lambda v: v.median(-1).values[:, None],
    "nanmedian": lambda v: torch.nanmedian(v, 1, keepdim=True).values,
    "kthvalue": lambda v: v.kthvalue(3, -1, keepdim=True).values,
    "kthvalue_last_axis": lambda v: v.kthvalue(3).values[:, None],
    "mode_last_axis": lambda v: v.round().mode().values[:, None],
    "mode": lambda v: v.round().mode(-1, keepdim=True).values,
    "quantile": lambda v: torch.quantile(v, 0.3, dim=-1, keepdim=True),
    "quantile_levels": lambda v: torch.quantile(v, torch.tensor([0.2, 0.7]), dim=-1).T.mean(
        -1, keepdim=True),
    "median_all": lambda v: v.median().expand(v.shape[0], 1),
    "median_over_batch": lambda v: v.median(0, keepdim=True).values,
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("stat", sorted(ORDER_STATS))
def test_order_statistics_do_not_depend_on_the_order_of_their_axis(capture, stat):
    """A median, k-th value, mode or quantile along the hidden axis is unchanged by
    permuting it (subtracting it keeps the whole MLP permutable); its indices,
    read as numbers, are positions along it and fix it."""
    op = ORDER_STATS[stat]

    class M(nn.Module):
        def __init__(self, use_index=False):
            super().__init__()
            self.use_index = use_index
            self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

        def forward(self, x):
            v = self.b(torch.relu(self.a(x)))
            if self.use_index:
                return self.c(v - v.median(-1).indices[:, None].float())
            return self.c(v - op(v))

    x = torch.randn(5, 6)
    model = randomize_state_(M().eval(), scale=0.3)
    spec = infer_spec(model, x, capture=capture)
    general = infer_spec(model, x, capture=capture, symmetries="all")
    assert spec.coverage() == 1.0 and len(spec.groups) == 2
    for s in (spec, general):
        for seed in range(3):
            assert check_equivalence(model, s, x, seed=seed) < 1e-5
    if stat == "median":
        indexed = randomize_state_(M(use_index=True).eval(), scale=0.3)
        fixed = infer_spec(indexed, x, capture=capture)
        assert fixed.axis_kinds("b.weight")[0] == "fixed"
        assert check_equivalence(indexed, fixed, x) < 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_cdist_relates_both_inputs_features(capture, p):
    """Distances to learned prototypes (an RBF head): the features and the
    prototypes' columns are one space; Euclidean distances keep orthogonal maps of
    it, a 1-norm only signed permutations; each input's rows pass (here the
    prototypes, read by the next layer); batch axes broadcast."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.proto = nn.Linear(6, 8), nn.Parameter(torch.randn(10, 8))
            self.c = nn.Linear(10, 3)

        def forward(self, x):
            h = self.a(x)                                           # (B, 8)
            d = torch.cdist(h[:, None], self.proto[None], p=p)[:, 0]  # (B, 10)
            return self.c(torch.exp(-d))

    model, x = randomize_state_(M().eval()), torch.randn(4, 6)
    spec = infer_spec(model, x, capture=capture)
    assert spec.coverage() == 1.0 and len(spec.groups) == 2
    general = infer_spec(model, x, capture=capture, symmetries="all")
    kinds = sorted(g.kind for g in general.groups.values())
    assert kinds == sorted(["orthogonal" if p == 2 else "sign", "permutation"])
    for s in (spec, general):
        for seed in range(3):
            assert check_equivalence(model, s, x, seed=seed) < 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_one_hot_of_positions_follows_their_axis(capture):
    """``one_hot(argmax over units)`` marks a unit: permuting the units moves the
    mark with them; a one-hot of input ids is of classes, structural."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)
            self.d = nn.Linear(5, 3)

        def forward(self, x, ids):
            h = torch.relu(self.a(x))
            mark = F.one_hot(self.b(h).argmax(-1), 12).float()
            return self.c(h + mark) + self.d(F.one_hot(ids, 5).float())

    model, x = randomize_state_(M().eval()), (torch.randn(4, 6), torch.randint(0, 5, (4,)))
    spec = infer_spec(model, x, capture=capture)
    assert spec.coverage() == 1.0
    assert spec.axis_kinds("d.weight") == ["structural", "structural"]
    assert any(len(g.members) > 4 for g in spec.groups.values())   # a, b and c's units at once
    for seed in range(3):
        assert check_equivalence(model, spec, x, seed=seed) < 1e-5
