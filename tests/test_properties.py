"""Property tests: random architectures infer an exact spec that finds groups.

The default run takes a few dozen examples; ``pytest -m fuzz`` runs the full
fuzz suite (2,000+ examples)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from autobasin import check_equivalence
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_

from archgen import ConvNet, TokenNet, conv_pieces, token_pieces

QUICK = settings(max_examples=int(os.environ.get("AUTOBASIN_PROP_EXAMPLES", 25)), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow], derandomize=True)
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_conv(pieces):
    model = randomize_state_(ConvNet(pieces).eval())
    x = torch.randn(2, 3, 6, 6)
    spec = infer_spec(model, x)
    assert len(spec.groups) >= 1
    assert check_equivalence(model, spec, x) <= 1e-4


def _check_tokens(pieces):
    model = randomize_state_(TokenNet(pieces).eval())
    x = torch.randn(2, 6, 5)
    spec = infer_spec(model, x)
    assert len(spec.groups) >= 1  # at least the residual stream
    assert spec.coverage() > 0.9
    assert check_equivalence(model, spec, x) <= 1e-4


@QUICK
@given(conv_pieces)
def test_random_convnets_are_exact(pieces):
    _check_conv(pieces)


@QUICK
@given(token_pieces)
def test_random_token_nets_are_exact(pieces):
    _check_tokens(pieces)


@pytest.mark.fuzz
@FUZZ
@given(conv_pieces)
def test_fuzz_convnets(pieces):
    _check_conv(pieces)


@pytest.mark.fuzz
@FUZZ
@given(token_pieces)
def test_fuzz_token_nets(pieces):
    _check_tokens(pieces)
