"""MergeMany: N permuted copies of one model merge back into that model."""
import copy

import pytest
import torch
from torch import nn

from autobasin import apply_permutation, random_permutation
from autobasin.infer import infer_spec, trace_model
from autobasin.merge import merge_many
from autobasin.testing import create, randomize_state_


def _copies(model, spec, n):
    out = [model]
    for seed in range(1, n):
        sd = apply_permutation(spec, random_permutation(spec, seed), model.state_dict())
        clone = copy.deepcopy(model)
        clone.load_state_dict(sd)
        out.append(clone)
    return out


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_merging_permuted_copies_returns_the_model(name):
    model = randomize_state_(create(name))
    spec = infer_spec(model)
    models = _copies(model, spec, 3)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    merged = merge_many(models, progress=False, spec=spec)
    x = trace_model(model).example_inputs.args[0]
    with torch.no_grad():
        ref, out = model(x), merged(x)
    assert (ref - out).norm() / ref.norm() < 1e-4
    for m, sd in zip(models, before):  # inputs untouched
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])


def test_merge_many_weights_and_errors():
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    spec = infer_spec(a, x)
    m = merge_many([a, b], weights=[1.0, 0.0], spec=spec, progress=False)
    # all weight on a: the merge is a (possibly permuted) copy of a
    with torch.no_grad():
        assert torch.allclose(m(x), a(x), atol=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        merge_many([a], spec=spec)
    c = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(ValueError, match="model 1"):
        merge_many([a, c], spec=spec)


def _mlp(bias=True, bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 12, bias=bias), nn.ReLU(), nn.Linear(12, 3, bias=bias)]
    return nn.Sequential(*layers).eval()


def test_merging_permuted_mlp_copies_is_function_exact():
    model = _mlp()
    x = torch.randn(32, 6)
    spec = infer_spec(model, x[:2])
    models = _copies(model, spec, 5)
    info = {}
    merged = merge_many(models, spec=spec, progress=False, stats=info, weights=[1, 2, 3, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-6)
    assert info["rounds"] >= 1 and len(info["perms"]) == 5
    # the permutations found bring every copy onto one and the same state
    aligned = [apply_permutation(spec, p, m.state_dict()) for p, m in zip(info["perms"], models)]
    for state in aligned[1:]:
        for key, value in aligned[0].items():
            assert torch.equal(state[key], value), key


def test_activation_merge_of_permuted_copies_is_function_exact():
    model = _mlp()
    x = torch.randn(256, 6)
    spec = infer_spec(model, x[:2])
    models = _copies(model, spec, 4)
    batches = list(x.split(64))
    info = {}
    merged = merge_many(models, method="activation", data=batches, spec=spec, progress=False,
                        stats=info)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)
    assert info["rounds"] >= 1
    with pytest.raises(ValueError, match="needs nn.Modules and data"):
        merge_many(models, method="activation", spec=spec)
    with pytest.raises(ValueError, match="'weight' or 'activation'"):
        merge_many(models, method="ste", spec=spec)

def test_merging_permuted_and_scaled_copies():
    """Copies that differ by a permutation and a positive global scale c_i: matching is
    scale-free, so the merge is mean(c) * model; a bias-free ReLU MLP of depth 3 then
    computes mean(c)**3 * model(x)."""
    model = _mlp(bias=False)
    x = torch.randn(32, 6)
    spec = infer_spec(model, x[:2])
    scales = [1.0, 0.5, 2.0, 1.5]
    models = []
    for copy_, c in zip(_copies(model, spec, 4), scales):
        scaled = copy.deepcopy(copy_)
        with torch.no_grad():
            for p in scaled.parameters():
                p.mul_(c)
        models.append(scaled)
    merged = merge_many(models, spec=spec, progress=False)
    c = sum(scales) / len(scales)
    for key, value in model.state_dict().items():  # a permuted copy of c * model
        torch.testing.assert_close(merged.state_dict()[key].norm(), c * value.norm())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), c ** 3 * model(x), rtol=1e-5, atol=1e-6)
    # unweighted by scale, naive averaging of the same copies is something else
    naive = copy.deepcopy(model)
    naive.load_state_dict({k: sum(m.state_dict()[k] for m in models) / 4 for k in model.state_dict()})
    with torch.no_grad():
        assert not torch.allclose(naive(x), c ** 3 * model(x), atol=1e-3)


def test_merge_many_data_resets_batchnorm_and_repairs():
    from autobasin import repair, reset_bn_stats
    model = _mlp(bn=True)
    x = torch.randn(64, 6) * 3 + 1
    data = [x[:32], x[32:]]
    spec = infer_spec(model, x[:2])
    models = _copies(model, spec, 3)
    merged = merge_many(models, spec=spec, progress=False, data=data)
    reference = reset_bn_stats(copy.deepcopy(model), data)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model[1].running_mean, reference[1].running_mean)  # input kept

    plain = _mlp(seed=0)
    others = [_mlp(seed=s) for s in (1, 2)]
    spec = infer_spec(plain, x[:2])
    info = {}
    avg = merge_many([plain, *others], spec=spec, progress=False, stats=info)
    fixed = merge_many([plain, *others], spec=spec, progress=False, data=data, repair="repair")
    # the same as repairing the merge with the aligned models as endpoints
    endpoints = []
    for m, perm in zip([plain, *others], info["perms"]):
        e = copy.deepcopy(m)
        e.load_state_dict(apply_permutation(spec, perm, m.state_dict()))
        endpoints.append(e)
    expected = repair(avg, endpoints, data)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), expected(x))
        assert not torch.allclose(fixed(x), avg(x), atol=1e-4)
    with pytest.raises(ValueError, match="needs data"):
        merge_many([plain, *others], spec=spec, repair="repair")
    with pytest.raises(ValueError, match="repair must be"):
        merge_many([plain, *others], spec=spec, repair="bn", data=data)
