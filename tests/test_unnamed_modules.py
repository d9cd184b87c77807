"""Tracing through a module that is not a submodule of the model (a
module-level activation, Longformer's ``gelu = ACT2FN["gelu"]``), and reading
an unset field of a traced ModelOutput (``outputs.hidden_states`` left None)."""
import pytest
import torch
from torch import nn

from autobasin import check_equivalence
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_

_ACT = nn.GELU()           # owns no tensors: traced through as if inline
_SHARED = nn.Linear(16, 16)  # owns tensors no rule would see: fails closed


class Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.act = nn.Linear(6, 16), act

    def forward(self, x):
        return self.act[0](self.fc(x))


class UsesUnnamed(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.block, self.head = Block([act]), nn.Linear(16, 3)  # a list: not registered

    def forward(self, x):
        return self.head(self.block(x))


def _check(model, x, spec):
    for seed in range(4):
        assert check_equivalence(model, spec, x, seed=seed) <= 1e-5


def test_an_unnamed_module_without_tensors_is_traced_through():
    model = randomize_state_(UsesUnnamed(_ACT).eval(), 0, 0.3)
    x = torch.randn(4, 6)
    spec = infer_spec(model, x, capture="fx")
    assert "block.fc:out" in spec.groups, str(spec)
    assert not spec.blocked_ops(), spec.blocked_ops()
    _check(model, x, spec)


def test_an_unnamed_module_with_tensors_fixes_what_it_touches():
    model = randomize_state_(UsesUnnamed(_SHARED).eval(), 0, 0.3)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning):
        spec = infer_spec(model, x, capture="fx")
    assert "block.fc:out" not in spec.groups, str(spec)
    _check(model, x, spec)


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput
        if x.shape[-1] != 6:  # fx cannot trace it: inlined, its output a traced container
            raise ValueError("bad input")
        return BaseModelOutput(last_hidden_state=torch.relu(self.fc(x)))


class ReadsUnsetField(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = Body(), nn.Linear(16, 3)

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput
        out = self.body(x)
        return BaseModelOutput(last_hidden_state=self.head(out.last_hidden_state),
                               hidden_states=out.hidden_states)


def test_an_unset_field_of_a_traced_model_output_carries_nothing():
    pytest.importorskip("transformers")
    model = randomize_state_(ReadsUnsetField().eval(), 0, 0.3)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning):
        spec = infer_spec(model, x, capture="fx")
    assert "body.fc:out" in spec.groups, str(spec) + str(spec.blocked_ops())
    assert not any("traced container" in str(r) for _, r in spec.blocked_ops()), spec.blocked_ops()
    _check(model, x, spec)
