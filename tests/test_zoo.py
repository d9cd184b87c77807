"""Every model of the test zoo: random permutations of every inferred group
leave the outputs equal (relative L2 <= 1e-4, float32, eval mode, non-trivial
BatchNorm statistics)."""
import pytest
import torch

from autobasin import check_equivalence
from autobasin.infer import infer_spec
from autobasin.testing import create, randomize_state_, test_zoo


@pytest.mark.parametrize("name", test_zoo())
def test_zoo_model_is_exact(name):
    model = randomize_state_(create(name))
    inputs = (torch.randn(2, 3, 224, 224),) if name.startswith("torchvision:") else None
    spec = infer_spec(model, inputs)
    assert len(spec.groups) > 0
    assert spec.coverage() > 0.9, spec.blocked[:5]
    for seed in (0, 1):
        err = check_equivalence(model, spec, inputs, seed=seed)
        assert err <= 1e-4
