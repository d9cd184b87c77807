"""MergeMany: N permuted copies of one model merge back into that model."""
import copy

import pytest
import torch
from torch import nn

from autobasin import apply_permutation, random_permutation
from autobasin.infer import infer_spec
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
    x = spec._inference.example_inputs[0]
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
