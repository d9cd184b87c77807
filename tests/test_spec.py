"""PermutationSpec and the permutation API."""
import pytest
import torch
from torch import nn

from autobasin import (PermutationSpec, SpecError, apply_permutation, compose, invert,
                       random_permutation)
from autobasin.infer import infer_spec
from autobasin.testing import create


@pytest.fixture(scope="module")
def vit_spec():
    return infer_spec(create("test_vit"))


def test_json_round_trip(vit_spec):
    text = vit_spec.to_json()
    back = PermutationSpec.from_json(text)
    assert back == vit_spec
    assert back.coverage() == pytest.approx(vit_spec.coverage())
    d = back.to_dict()
    g = d["groups"][0]
    assert {"name", "size", "members"} <= set(g)
    assert {"param", "axis"} <= set(g["members"][0])


def test_print_is_a_readable_table(vit_spec):
    text = str(vit_spec)
    assert text.splitlines()[0].startswith("PermutationSpec:")
    assert "group" in text.splitlines()[1] and "size" in text.splitlines()[1]
    assert len(text.splitlines()) >= len(vit_spec.groups) + 2


def test_apply_then_inverse_is_identity_and_inputs_untouched(vit_spec):
    model = create("test_vit")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perms = random_permutation(vit_spec, seed=3)
    permuted = apply_permutation(vit_spec, perms, sd)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)
    back = apply_permutation(vit_spec, invert(perms), permuted)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_compose_matches_sequential_application(vit_spec):
    sd = create("test_vit").state_dict()
    p1, p2 = random_permutation(vit_spec, 1), random_permutation(vit_spec, 2)
    two = apply_permutation(vit_spec, p2, apply_permutation(vit_spec, p1, sd))
    one = apply_permutation(vit_spec, compose(p1, p2), sd)
    for k in sd:
        assert torch.equal(one[k], two[k]), k


def test_random_permutation_is_deterministic(vit_spec):
    a, b = random_permutation(vit_spec, 7), random_permutation(vit_spec, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = random_permutation(vit_spec, 8)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_errors_name_the_group_or_tensor(vit_spec):
    sd = create("test_vit").state_dict()
    perms = random_permutation(vit_spec)
    name = next(iter(perms))
    bad = dict(perms)
    bad[name] = torch.zeros_like(perms[name])
    with pytest.raises(SpecError, match="not a permutation"):
        apply_permutation(vit_spec, bad, sd)
    bad[name] = perms[name][:-1]
    with pytest.raises(SpecError, match="expected"):
        apply_permutation(vit_spec, bad, sd)
    missing = {k: v for k, v in perms.items() if k != name}
    with pytest.raises(SpecError, match=name.replace(".", r"\.")):
        apply_permutation(vit_spec, missing, sd)
    sd2 = dict(sd)
    member = vit_spec.groups[name].members[0]
    del sd2[member.param]
    with pytest.raises(SpecError, match=member.param.replace(".", r"\.")):
        apply_permutation(vit_spec, perms, sd2)


def test_coverage_counts_hidden_axes_and_element_coverage_counts_elements():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    spec = infer_spec(model, torch.randn(2, 4))
    # the hidden axis (8) is permuted; 0.weight[1] and 2.weight[0] are tied to the input and
    # output, 2.bias has only its output axis: every hidden axis moves
    assert spec.axis_kinds("0.weight") == ["permuted", "structural"]
    assert spec.axis_kinds("2.bias") == ["structural"]
    assert spec.coverage() == 1.0
    # every element of 0.weight (8x4), 0.bias (8), 2.weight (2x8) is on the hidden axis; 2.bias is not
    assert spec.element_coverage() == pytest.approx((32 + 8 + 16) / (32 + 8 + 16 + 2))
    # fixing the group leaves every hidden axis fixed, each with its reason
    fixed = spec.without("0:out")
    assert fixed.coverage() == 0.0
    assert {n for n, _ in fixed.fixed_axes()} == {"0.weight[0]", "0.bias[0]", "2.weight[1]"}


class Tied(nn.Module):
    """Embedding and unembedding share one Parameter."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.relu(self.mid(self.emb(idx))))


def test_tied_weights_share_symbols():
    from autobasin import check_equivalence
    model = Tied()
    x = torch.randint(0, 10, (2, 5))
    spec = infer_spec(model, x)
    assert check_equivalence(model, spec, x) <= 1e-5
    tied = [g for g in spec.groups.values() if any(m.param == "emb.weight" for m in g.members)]
    assert tied and any(m.param == "out.weight" for m in tied[0].members)


def test_float32_rounding_is_not_mistaken_for_a_wrong_spec():
    from autobasin import check_equivalence
    torch.manual_seed(0)
    # a deep net that amplifies float32 rounding of reordered sums
    layers = []
    for _ in range(12):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(64, 1))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(12.0)
    x = torch.randn(4, 64)
    spec = infer_spec(model, x)
    with pytest.warns(UserWarning, match="rounding"):
        err = check_equivalence(model, spec, x, rtol=1e-9)
    assert err > 1e-9


def test_in_place_permutation_matches_apply_permutation_with_tied_weights():
    """The float64 re-check permutes its one copy in place; a tied tensor (one
    Parameter under two names) must be permuted once, as apply_permutation does."""
    from autobasin.permute import permute_model_, permute_model, random_permutation

    torch.manual_seed(0)
    model = Tied(8)
    spec = infer_spec(model, torch.randint(0, 10, (2, 5)))
    perms = random_permutation(spec, seed=3)
    expected = permute_model(model, spec, perms).state_dict()
    in_place = Tied(8)
    in_place.load_state_dict(model.state_dict())
    permute_model_(in_place, spec, perms)
    assert in_place.out.weight is in_place.emb.weight
    for key, value in expected.items():
        assert torch.equal(in_place.state_dict()[key], value), key
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_check_fits_names_the_group_and_the_tensor():
    from autobasin.spec import Group, Member, TensorInfo
    sd = {"w": torch.zeros(8, 4), "v": torch.zeros(3, 8)}
    plain = Member("w", 0, 0, (8,), (1,), 0)
    tensors = {"w": TensorInfo((8, 4), True, True), "v": TensorInfo((3, 8), True, True)}

    def spec(*members, size=8):
        return PermutationSpec([Group("g", size, list(members))], tensors)

    spec(plain, Member("v", 1, 0, (8,), (1,), 0)).check_fits(sd)  # fits: no error
    spec(Member("w", 0, 4, (2, 2), (2, 1), 1), size=2).check_fits(sd)  # a grid inside the axis
    cases = [
        (spec(Member("u", 0, 0, (8,), (1,), 0)), r"model a has no entry 'u' that group 'g'"),
        (spec(Member("w", 2, 0, (8,), (1,), 0)), r"model a's 'w' has 2 axes; group 'g' permutes axis 2"),
        (spec(Member("w", 0, 0, (4,), (1,), 0)), r"member w\[0\] of group 'g' has size 4, the group 8"),
        (spec(Member("w", 0, 0, (2, 4), (4,), 1), size=4), r"of group 'g' is malformed"),
        (spec(Member("w", 0, 4, (8,), (1,), 0)),
         r"model a's 'w' axis 0 has length 8, group 'g' needs positions 4\.\.11"),
        (spec(Member("w", 1, 0, (4,), (1,), 0), size=4), None),  # fits: axis 1 has length 4
    ]
    for s, needle in cases:
        if needle is None:
            s.check_fits(sd, "model a")
            continue
        with pytest.raises(SpecError, match=needle):
            s.check_fits(sd, "model a")
    narrow = PermutationSpec([Group("g", 4, [Member("w", 0, 0, (4,), (1,), 0)])],
                             {"w": TensorInfo((4, 4), True, True)})
    with pytest.raises(SpecError, match=r"'w' has shape \(8, 4\), but the spec was made for shape "
                                        r"\(4, 4\) \(group 'g' permutes axis 0\)"):
        narrow.check_fits(sd, "model a")
