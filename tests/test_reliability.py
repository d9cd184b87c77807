"""Hostile inputs: every case either works (checked by function: the aligned
model computes what B computes) or raises an error naming the parameter, node,
batch or file. After every call the caller's models are exactly as they were:
state, train/eval mode of every submodule, requires_grad, dtype and device.

One test (or parametrised case) per row of the catalogue in docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobasin as ab
from autobasin import (ArchitectureMismatchError, EquivalenceError, activation_matching,
                       apply_permutation, auto_rebasin, check_equivalence, infer_spec, interpolate,
                       loss_barrier, weight_matching)
from autobasin.guard import MetaTensorError, NonFiniteWeightError, unwrap_model
from autobasin.testing import randomize_state_
from autobasin.trace import TraceError
from autobasin.infer import trace_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------ helpers
def _snapshot(model: nn.Module) -> dict:
    state = {}
    for k, v in model.state_dict(keep_vars=True).items():
        value = None if v.is_meta else v.detach().clone()
        state[k] = (value, v.dtype, v.device, tuple(v.shape), id(v))
    return {"state": state,
            "modes": {n: m.training for n, m in model.named_modules()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def _same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.is_floating_point():
        return torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)
    return torch.equal(x, y)


def assert_unchanged(before: dict, model: nn.Module) -> None:
    now = _snapshot(model)
    assert now["modes"] == before["modes"], "a submodule's train/eval mode changed"
    assert now["grad"] == before["grad"], "a parameter's requires_grad changed"
    assert now["state"].keys() == before["state"].keys()
    for k, (value, dtype, device, shape, ident) in before["state"].items():
        v2, d2, dev2, s2, id2 = now["state"][k]
        assert (d2, dev2, s2, id2) == (dtype, device, shape, ident), f"{k} was replaced"
        if value is not None:
            assert _same_values(v2, value), f"{k} was modified"


@contextlib.contextmanager
def untouched(*models: nn.Module):
    """Assert that the body leaves every model exactly as it was, even when it raises."""
    before = [_snapshot(m) for m in models]
    try:
        yield
    finally:
        for b, m in zip(before, models):
            assert_unchanged(b, m)


def outputs(model: nn.Module, *args):
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        for m, t in was.items():
            m.training = t


def assert_same_function(b: nn.Module, aligned: nn.Module, *args, tol: float = 1e-4) -> None:
    from autobasin.permute import relative_error
    err = relative_error(outputs(b, *args), outputs(aligned, *args))
    assert err <= tol, f"the aligned model computes something else: relative error {err:.3g}"


def mlp(seed: int = 0, dtype=torch.float32, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3)).to(dtype)


class ConvBN(nn.Module):
    def __init__(self, seed: int = 0, c: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 3)
        randomize_state_(self, seed, 0.3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
IMG = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def rebasin(a, b, x, **kw):
    kw.setdefault("progress", False)
    with untouched(a, b):
        result = auto_rebasin(a, b, x, **kw)
    assert result.stats["verify_error"] <= 1e-4
    return result


# ======================================================= architecture mismatch
class ExtraBuffer(nn.Sequential):
    pass


def _extra_buffer():
    m = mlp(1)
    m.register_buffer("scale", torch.ones(3))
    return m


def _missing_bias():
    m = mlp(1)
    m[4] = nn.Linear(16, 3, bias=False)
    return m


@pytest.mark.parametrize("make_b, needle", [
    (lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                           nn.Linear(8, 3)), r"'2\.weight' has shape \(16, 16\) in a but \(8, 16\)"),
    (lambda: nn.Linear(4, 3), "different types: Sequential and Linear"),
    (_extra_buffer, "'scale' is in b's state_dict but missing from a's"),
    (_missing_bias, "'4.bias' is in a's state_dict but missing from b's"),
    (lambda: mlp(1, torch.float64), r"'0\.weight' has dtype torch.float32 in a but torch.float64"),
], ids=["shape", "type", "extra_buffer", "missing_parameter", "dtype"])
def test_different_architectures_are_refused(make_b, needle):
    a, b = mlp(0), make_b()
    with untouched(a, b), pytest.raises(ArchitectureMismatchError, match=needle):
        auto_rebasin(a, b, X, progress=False)


def test_missing_buffer_in_state_dicts_is_named():
    a, b = ConvBN(0), ConvBN(1)
    spec = infer_spec(a, IMG)
    sd_b = b.state_dict()
    del sd_b["bn1.running_var"]
    with pytest.raises(ab.SpecError, match=r"state_dict b has no entry 'bn1\.running_var'"):
        weight_matching(spec, a.state_dict(), sd_b, progress=False)
    with untouched(a), pytest.raises(ValueError, match="'bn1.running_var' is in a's state_dict"):
        interpolate(a.state_dict(), sd_b, 0.5)


# ===================================================== tied and shared weights
class TiedLM(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.emb.weight  # one parameter, two names

    def forward(self, t):
        return self.out(F.gelu(self.fc(self.emb(t))))


def test_tied_weights_stay_tied_and_exact():
    a, b = TiedLM(0), TiedLM(1)
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    result = rebasin(a, b, tokens)
    assert len(result.spec.groups) == 1
    assert result.model.out.weight is result.model.emb.weight
    assert torch.equal(result.state_dict["out.weight"], result.state_dict["emb.weight"])
    assert_same_function(b, result.model, tokens)


class Shared(nn.Module):
    """One Linear applied twice: its input and output share one permutation."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.h, self.o = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.o(self.h(F.relu(self.h(F.relu(self.a(x))))))


def test_module_used_twice_shares_one_permutation():
    a, b = Shared(0), Shared(1)
    result = rebasin(a, b, X)
    (group,) = result.spec.groups.values()
    assert {(m.param, m.axis) for m in group.members} >= {("h.weight", 0), ("h.weight", 1)}
    assert_same_function(b, result.model, X)


# ================================================= frozen parameters and BatchNorm
def test_requires_grad_false_is_kept():
    a, b = mlp(0), mlp(1)
    for m in (a, b):
        m[0].weight.requires_grad_(False)
    result = rebasin(a, b, X)
    assert not result.model[0].weight.requires_grad and result.model[2].weight.requires_grad
    assert_same_function(b, result.model, X)


def test_frozen_batchnorm_inside_a_training_model_keeps_every_mode():
    """train() on the model, eval() on its BatchNorms: a fine-tuning setup. Inference,
    verification and matching used to call model.train(was) and flip the BatchNorms."""
    a, b = ConvBN(0).train(), ConvBN(1).train()
    for m in (a, b):
        m.bn1.eval()
        m.bn1.requires_grad_(False)
    with untouched(a):
        spec = infer_spec(a, IMG)
        check_equivalence(a, spec, IMG)
    assert any(m.param == "bn1.running_var" for g in spec.groups.values() for m in g.members)
    result = rebasin(a, b, IMG)
    assert result.model.training and not result.model.bn1.training
    with untouched(a, b):
        activation_matching(spec, a, b, [IMG], progress=False)
    assert_same_function(b, result.model, IMG)


def test_torchvision_frozen_batchnorm_is_permuted_and_holds_for_any_buffer_values():
    """FrozenBatchNorm2d computes its scale from buffers. fx used to fold that
    into constants outside the state_dict, which at default init are the same
    for every channel, so the channels moved while the buffers did not: wrong
    on any trained checkpoint. Buffers in the state_dict are now symbolic."""
    from torchvision.ops import FrozenBatchNorm2d

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 16, 3), FrozenBatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    fresh = make(0)
    spec = infer_spec(fresh, IMG)           # inferred at default init, as `inspect --json` would
    on_bn = {m.param for g in spec.groups.values() for m in g.members if m.param.startswith("1.")}
    assert on_bn == {"1.weight", "1.bias", "1.running_mean", "1.running_var"}
    trained = randomize_state_(make(0), 0, 0.3)  # other buffer values than at inference
    assert ab.check_equivalence(trained, spec, IMG) <= 1e-5
    a, b = randomize_state_(make(0), 0, 0.3), randomize_state_(make(1), 1, 0.3)
    result = rebasin(a, b, IMG)
    assert_same_function(b, result.model, IMG)


class _DictBody(nn.Module):
    """An opaque submodule (shape check fx cannot trace) returning a container."""

    def __init__(self, kind):
        super().__init__()
        self.fc, self.kind = nn.Linear(8, 16), kind

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("bad input")
        h = torch.relu(self.fc(x))
        if self.kind == "dict":
            return {"hidden": h, "norm": h.norm(dim=-1)}
        if self.kind == "dataclass":
            return _Out(h, h.sum(-1))
        return _Holder(h)


@__import__("dataclasses").dataclass
class _Out:
    hidden: torch.Tensor
    total: torch.Tensor


class _Holder:
    def __init__(self, hidden):
        self.hidden = hidden


class _DictNet(nn.Module):
    def __init__(self, kind, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head, self.kind = _DictBody(kind), nn.Linear(16, 3), kind

    def forward(self, x):
        out = self.body(x)
        return self.head(out["hidden"] if self.kind == "dict" else out.hidden)


@pytest.mark.parametrize("kind", ["dict", "dataclass", "object"])
def test_axes_flow_through_containers_returned_by_opaque_submodules(kind):
    """A dict or dataclass returned by an opaque submodule carries its fields'
    axes (fc's rows and head's columns are one group); an object inference
    cannot look into fails closed, naming the module. merge_many of a model
    with a permuted copy of itself gives the model back."""
    a = _DictNet(kind)
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(a, x, capture="fx")
    assert ab.check_equivalence(a, spec, x) <= 1e-5
    if kind == "object":
        assert spec.groups == {}
        assert "body.fc.weight[0]" in dict(spec.fixed_axes())
        assert "no rule for module _DictBody" in dict(spec.fixed_axes())["body.fc.weight[0]"]
        # torch.export traces through the object: capture="auto" keeps its better spec
        spec = infer_spec(a, x)
        assert spec.capture == "export" and len(spec.groups) == 1
        assert ab.check_equivalence(a, spec, x) <= 1e-5
        return
    (group,) = spec.groups.values()
    assert {(m.param, m.axis) for m in group.members} == {
        ("body.fc.weight", 0), ("body.fc.bias", 0), ("head.weight", 1)}
    b = ab.permute_model(a, spec, ab.random_permutation(spec, seed=4))
    merged = ab.merge_many([a, b], spec=spec, progress=False)
    assert_same_function(a, merged, x)


def test_coverage_counts_hidden_axes_and_every_fixed_one_has_a_reason():
    """Coverage is over (tensor, axis) pairs of hidden axes, not elements: a
    fixed hidden axis lowers it even when another axis of its tensor moves,
    and spec.blocked names why. Axes tied to the inputs and outputs, and
    kernel axes, are not hidden."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.conv(x).mean((-1, -2))
            h = torch.relu(self.fc1(h))
            return self.fc2(torch.cumsum(h, -1))  # the scan fixes fc1's outputs
    net = Net()
    spec = infer_spec(net, IMG)
    assert spec.axis_kinds("conv.weight") == ["permuted", "structural", "structural", "structural"]
    assert spec.axis_kinds("fc1.weight") == ["fixed", "permuted"]
    assert spec.axis_kinds("fc2.weight") == ["structural", "fixed"]
    reasons = dict(spec.fixed_axes())
    assert set(reasons) == {"fc1.weight[0]", "fc1.bias[0]", "fc2.weight[1]"}
    assert all("cumsum" in r for r in reasons.values())
    numel = {n: t.numel() for n, t in net.named_parameters()}
    expected = (numel["conv.weight"] + numel["conv.bias"] + numel["fc1.weight"] / 2) / (
        numel["conv.weight"] + numel["conv.bias"] + numel["fc1.weight"] + numel["fc1.bias"]
        + numel["fc2.weight"])
    assert spec.coverage() == pytest.approx(expected)
    assert spec.element_coverage() > spec.coverage()
    again = ab.PermutationSpec.from_json(spec.to_json())
    assert again.coverage() == pytest.approx(spec.coverage())
    assert again.without("conv:out").axis_kinds("conv.weight")[0] == "fixed"


# ================================================================ NaN and Inf
def _poison(model, name, value):
    with torch.no_grad():
        model.state_dict()[name].view(-1)[1] = value
    return model


@pytest.mark.parametrize("which, name, value, needle", [
    ("b", "2.weight", float("nan"), r"model b's parameter '2\.weight' holds 1 NaN"),
    ("a", "0.bias", float("inf"), r"model a's parameter '0\.bias' holds 1 Inf"),
    ("b", "4.weight", float("-inf"), r"model b's parameter '4\.weight' holds 1 Inf"),
], ids=["nan_in_b", "inf_in_a", "minus_inf_in_b"])
def test_non_finite_weights_are_refused_naming_the_parameter(which, name, value, needle):
    a, b = mlp(0), mlp(1)
    _poison(a if which == "a" else b, name, value)
    spec = infer_spec(mlp(0), X)
    with untouched(a, b):
        with pytest.raises(NonFiniteWeightError, match=needle):
            auto_rebasin(a, b, X, progress=False)
        with pytest.raises(NonFiniteWeightError, match=needle):
            activation_matching(spec, a, b, [X], progress=False)
        with pytest.raises(NonFiniteWeightError, match=rf"state_dict {which}'s entry '{name}'"):
            weight_matching(spec, a.state_dict(), b.state_dict(), progress=False)


def test_huge_finite_weights_are_not_taken_for_non_finite():
    """The guard sums a tensor first; a sum that overflows must not be read as an Inf."""
    from autobasin.guard import check_finite
    big = torch.full((4,), 3e38)  # finite in float32; their sum is not
    assert not torch.isfinite(big.sum())
    check_finite({"w": big})  # passes
    for bad in (float("nan"), float("inf")):
        t = big.clone()
        t[2] = bad
        with pytest.raises(NonFiniteWeightError, match=r"'w' holds 1 (NaN|Inf)"):
            check_finite({"w": t})


def test_non_finite_batchnorm_statistics_are_refused_by_weight_matching():
    a, b = ConvBN(0), ConvBN(1)
    _poison(b, "bn2.running_var", float("nan"))
    spec = infer_spec(a, IMG)
    with untouched(a, b), pytest.raises(
            NonFiniteWeightError, match=r"'bn2\.running_var' \(permuted by group 'conv2:out'\)"):
        weight_matching(spec, a.state_dict(), b.state_dict(), progress=False)


# ======================================================== data: empty, wrong, layouts
def test_empty_data_is_refused():
    a, b = mlp(0), mlp(1)
    spec = infer_spec(a, X)
    with untouched(a, b):
        with pytest.raises(ValueError, match="got no batches"):
            activation_matching(spec, a, b, [], progress=False)
        with pytest.raises(ValueError, match="no samples from data: all 2 batches were empty"):
            activation_matching(spec, a, b, [torch.empty(0, 4), (torch.empty(0, 4), 0)],
                                progress=False)
        with pytest.raises(ValueError, match="needs data"):
            auto_rebasin(a, b, X, method="activation", progress=False)
        with pytest.raises(ValueError, match="yielded no samples"):
            loss_barrier(a, b, [], lambdas=3, progress=False)


def test_empty_batches_are_skipped():
    a, b = mlp(0), mlp(1)
    spec = infer_spec(a, X)
    stats = {}
    with untouched(a, b):
        perms = activation_matching(spec, a, b, [torch.empty(0, 4), X], progress=False, stats=stats)
    assert stats["batches"] == 1 and stats["samples"] == len(X)
    assert all(torch.equal(perms[g], p)
               for g, p in activation_matching(spec, a, b, [X], progress=False).items())


def test_wrong_shaped_batch_names_the_batch_and_shapes():
    a, b = mlp(0), mlp(1)
    traced = trace_model(a, X)
    with untouched(a, b), pytest.raises(
            ValueError, match=r"model a failed on batch 1 \(inputs of shapes \(5, 7\)\).*"
                              r"traced with inputs of shapes \(8, 4\)"):
        activation_matching(traced.spec, a, b, [X, torch.randn(5, 7)], progress=False,
                            traced=traced)
    # without the traced model, the graph is captured on two samples of the first batch
    with untouched(a, b), pytest.raises(
            ValueError, match=r"model a failed on batch 1 .*traced with inputs of shapes \(2, 4\)"):
        activation_matching(traced.spec, a, b, [X, torch.randn(5, 7)], progress=False)
    with untouched(a), pytest.raises(ab.infer.ExampleInputError,
                                     match=r"Sequential cannot run on the example inputs of "
                                           r"shapes \[\(2, 7\)\]"):
        infer_spec(a, torch.randn(2, 7))


def test_batches_as_tuples_dicts_and_data_loaders_agree():
    a, b = mlp(0), mlp(1)
    spec = infer_spec(a, X)
    y = torch.randint(0, 3, (len(X),))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    layouts = {"tensor": [X], "tuple": [(X, y)], "dict": [{"x": X, "label": y}], "loader": loader,
               "input_fn": [{"features": X}]}
    results = {}
    with untouched(a, b):
        for name, data in layouts.items():
            kw = {"input_fn": lambda batch: batch["features"]} if name == "input_fn" else {}
            results[name] = activation_matching(spec, a, b, data, progress=False, **kw)
        barrier = loss_barrier(a, b, [{"x": X, "label": y}], lambdas=3, progress=False)
    for name, perms in results.items():
        assert all(torch.equal(perms[g], results["tensor"][g]) for g in perms), name
    assert len(barrier.losses) == 3
    result = rebasin(a, b, X, method="activation", data=loader)
    assert_same_function(b, result.model, X)


# ==================================================== several inputs and outputs
class TwoInputs(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.o = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, y, mask=None, scale: float = 1.0):
        h = F.relu(self.a(x) + self.b(y))
        if mask is not None:
            h = h * mask
        return self.o(h) * scale


def test_several_positional_and_defaulted_keyword_inputs():
    """Inputs not given keep their defaults while tracing (``if mask is not None``
    takes the branch the model runs). A given mask is a graph input: the hidden
    units it multiplies cannot be permuted, so they are left alone."""
    a, b = TwoInputs(0), TwoInputs(1)
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    for inputs, groups in [((x, y), 1), ((x, y, torch.rand(2, 8)), 0)]:
        result = rebasin(a, b, inputs)
        assert len(result.spec.groups) == groups
        assert_same_function(b, result.model, *inputs)
    # non-tensor inputs passed positionally are fx graph inputs, so fx's graph takes the
    # mask branch and cannot run them: named, with capture="fx" ...
    with untouched(a), pytest.raises(ab.infer.ExampleInputError,
                                     match=r"shapes \[\(2, 4\), \(2, 3\), NoneType, float\].*%mask"):
        infer_spec(a, (x, y, None, 2.0), capture="fx")
    # ... while auto captures them with torch.export, which runs the branch the model runs
    with untouched(a), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = infer_spec(a, (x, y, None, 2.0))
    assert spec.capture == "export" and len(spec.groups) == 1
    assert ab.check_equivalence(a, spec, (x, y, None, 2.0)) <= 1e-5


def test_keyword_inputs_as_a_dict_are_traced_and_checked_in_any_order():
    a = TwoInputs(0)
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    positional = infer_spec(a, (x, y))
    with untouched(a):
        spec = infer_spec(a, {"y": y, "x": x})  # keyword order differs from forward's
    assert spec.capture == "fx"
    assert set(spec.groups) == set(positional.groups)
    assert ab.check_equivalence(a, spec, {"y": y, "x": x}) <= 1e-5
    assert ab.check_equivalence(a, spec, {"x": x * 2, "y": y}) <= 1e-5
    exported = infer_spec(a, {"y": y, "x": x}, capture="export")
    assert exported.capture == "export"
    assert set(exported.groups) == set(positional.groups)
    assert ab.check_equivalence(a, exported, {"y": y, "x": x}) <= 1e-5


class DictOut(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.o, self.f = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return {"logits": self.o(h), "extra": (self.f(h), h.sum(-1))}


def test_dict_and_tuple_outputs():
    a, b = DictOut(0), DictOut(1)
    result = rebasin(a, b, X)
    assert len(result.spec.groups) == 1
    out_b, out_aligned = outputs(b, X), outputs(result.model, X)
    assert torch.allclose(out_b["logits"], out_aligned["logits"], atol=1e-6)
    assert torch.allclose(out_b["extra"][0], out_aligned["extra"][0], atol=1e-6)
    # a spec that moves one output is caught, whichever output it is
    wrong = result.spec.without()
    wrong.groups["a:out"].members = [m for m in wrong.groups["a:out"].members
                                     if m.param != "f.weight"]
    with untouched(a), pytest.raises(EquivalenceError):
        check_equivalence(a, wrong, X)


# ============================================================ modes and devices
def test_train_mode_models_are_restored_and_statistics_untouched():
    a, b = ConvBN(0).train(), ConvBN(1).train()
    y = torch.randint(0, 3, (len(IMG),))
    for method, data in [("weight", None), ("activation", [IMG]), ("ste", [(IMG, y)])]:
        kw = {"max_steps": 2} if method == "ste" else {}
        result = rebasin(a, b, IMG, method=method, data=data, **kw)  # untouched: BN stats too
        assert result.model.training
        assert_same_function(b, result.model, IMG)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["float16", "bfloat16", "float64"])
def test_dtypes_compute_wide_and_return_the_callers_dtype(dtype):
    a, b = mlp(0, width=64), mlp(1, width=64)
    a_low, b_low = copy.deepcopy(a).to(dtype), copy.deepcopy(b).to(dtype)
    x = X.to(dtype)
    result = rebasin(a_low, b_low, x)
    assert {t.dtype for t in result.state_dict.values()} == {dtype}
    assert next(result.model.parameters()).dtype == dtype
    if dtype != torch.float64:
        assert result.stats["verify_dtype"] == "float32"
    # similarities are computed in float32 (float64 for float64): the same permutations
    # as on float32 copies of the same values
    spec = result.spec
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    reference = weight_matching(spec, {k: v.to(wide) for k, v in a_low.state_dict().items()},
                                {k: v.to(wide) for k, v in b_low.state_dict().items()},
                                progress=False)
    assert all(torch.equal(result.perms[g], reference[g]) for g in spec.groups)
    merged = interpolate(a_low, result.model, 0.5)
    assert next(merged.parameters()).dtype == dtype


class FoldSum(nn.Module):
    """w . x summed one term at a time in the given order, rounding to the
    model's dtype after each add: the order of a sum, made visible."""

    def __init__(self, order):
        super().__init__()
        self.order = list(order)
        self.w = nn.Parameter(torch.linspace(-1, 1, len(order)))

    def forward(self, x):
        out = x[:, self.order[0]] * self.w[self.order[0]]
        for i in self.order[1:]:
            out = out + x[:, i] * self.w[i]
        return out


def test_half_precision_verification_is_not_fooled_by_rounding():
    """A permuted model sums in another order: in bfloat16 that alone moves the
    outputs (by 1e-3 on a ResNet-18 at 224x224). auto_rebasin's check judges
    half-precision models on float32 copies, so a right alignment passes and a
    wrong one still fails."""
    from autobasin.permute import outputs_relative_error, verify_error
    n = 512
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(0)) + 1.0
    forward = FoldSum(range(n)).to(torch.bfloat16)
    backward = FoldSum(range(n - 1, -1, -1)).to(torch.bfloat16)
    assert outputs_relative_error(forward, backward, x.bfloat16()) > 1e-3  # rounding alone
    with untouched(forward, backward):
        err, dtype = verify_error(forward, backward, x.bfloat16())
    assert err <= 1e-4 and dtype == torch.float32
    wrong = FoldSum(range(n)).to(torch.bfloat16)
    with torch.no_grad():
        wrong.w[0] += 0.5
    err, dtype = verify_error(forward, wrong, x.bfloat16())
    assert err > 1e-4 and dtype == torch.float64  # judged again in float64, still wrong
    err, dtype = verify_error(forward.float(), backward.float(), x)
    assert err <= 1e-4 and dtype is None  # float32 models are judged as they are


def _on_meta(make):
    with torch.device("meta"):
        return make()


def test_meta_models_can_be_inspected_but_not_matched():
    a_meta, b_meta = _on_meta(lambda: ConvBN(0)), _on_meta(lambda: ConvBN(1))
    assert next(a_meta.parameters()).is_meta
    reference = infer_spec(ConvBN(0), IMG)
    with untouched(a_meta):
        for inputs in (IMG.to("meta"), IMG):  # CPU inputs are moved to meta
            spec = infer_spec(a_meta, inputs)
            assert {g: x.size for g, x in spec.groups.items()} == \
                {g: x.size for g, x in reference.groups.items()}
    needle = r"needs the weights' values, but (model|state_dict) a's 'conv1\.weight' is on the meta"
    with untouched(a_meta, b_meta):
        with pytest.raises(MetaTensorError, match="auto_rebasin " + needle):
            auto_rebasin(a_meta, b_meta, IMG.to("meta"), progress=False)
        with pytest.raises(MetaTensorError, match="weight matching " + needle):
            weight_matching(spec, a_meta.state_dict(), b_meta.state_dict(), progress=False)
        with pytest.raises(MetaTensorError, match="activation matching " + needle):
            activation_matching(spec, a_meta, b_meta, [IMG], progress=False)
        with pytest.raises(MetaTensorError, match="STE matching " + needle):
            ab.ste_matching(spec, a_meta, b_meta, [(IMG, torch.zeros(4).long())], progress=False)
        with pytest.raises(MetaTensorError, match="check_equivalence needs the weights"):
            check_equivalence(a_meta, spec, IMG.to("meta"))
    real = ConvBN(0)
    with pytest.raises(MetaTensorError, match="state_dict b's 'conv1.weight'"):
        weight_matching(spec, real.state_dict(), b_meta.state_dict(), progress=False)


def test_large_model_on_meta_is_inspected():
    """Half a billion parameters on meta: nothing is allocated or computed (the
    billion-parameter run is in benchmarks/reliability_limits.py)."""
    with torch.device("meta"):
        layers = [nn.Linear(1024, 8192)]
        for _ in range(7):
            layers += [nn.GELU(), nn.Linear(8192, 8192)]
        model = nn.Sequential(*layers, nn.GELU(), nn.Linear(8192, 10))
    assert sum(p.numel() for p in model.parameters()) > 450e6
    spec = infer_spec(model, torch.empty(2, 1024, device="meta"))
    assert len(spec.groups) == 8 and {g.size for g in spec.groups.values()} == {8192}


def _planted(make, x):
    """(a, b) with b = a with its units shuffled: the alignment is known exactly,
    so devices and dtypes must agree on it, whatever the rounding."""
    a = make()
    spec = infer_spec(a, x)
    b = ab.permute_model(a, spec, ab.random_permutation(spec, seed=1))
    return a, b


def _same_function_in_float64(b, aligned, x):
    """Compare on CPU float64 copies: a GPU may use TF32 convolutions."""
    def wide(m):
        return copy.deepcopy(m).cpu().double()
    assert_same_function(wide(b), wide(aligned), x.cpu().double(), tol=1e-9)


@CUDA
def test_cuda_models_are_aligned_on_their_device():
    a, b = ConvBN(0).cuda(), ConvBN(1).cuda()
    x = IMG.cuda()
    result = rebasin(a, b, x)
    assert all(t.device.type == "cuda" for t in result.state_dict.values())
    assert next(result.model.parameters()).device.type == "cuda"
    assert all(p.device.type == "cpu" for p in result.perms.values())
    _same_function_in_float64(b, result.model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF32 rounding is re-judged in float64
        check_equivalence(a, result.spec, x)
    act = rebasin(a, b, x, method="activation", data=[x, x * 0.5])
    assert all(t.device.type == "cuda" for t in act.state_dict.values())
    _same_function_in_float64(b, act.model, x)
    half = rebasin(copy.deepcopy(a).half(), copy.deepcopy(b).half(), x.half())
    assert {t.dtype for t in half.state_dict.values() if t.is_floating_point()} == {torch.float16}
    assert all(t.device.type == "cuda" for t in half.state_dict.values())


@CUDA
def test_cuda_and_cpu_recover_the_same_planted_permutation():
    a_cpu, b_cpu = _planted(lambda: ConvBN(0, c=16), IMG)
    a, b = copy.deepcopy(a_cpu).cuda(), copy.deepcopy(b_cpu).cuda()
    cpu = auto_rebasin(a_cpu, b_cpu, IMG, progress=False)
    gpu = rebasin(a, b, IMG.cuda())
    assert all(torch.equal(cpu.perms[g], gpu.perms[g]) for g in cpu.perms)
    assert all(torch.allclose(gpu.state_dict[k].cpu(), a_cpu.state_dict()[k])
               for k in a_cpu.state_dict())  # B = P(A) is aligned back onto A
    spec = gpu.spec
    on_gpu = weight_matching(spec, a.state_dict(), b.state_dict(), progress=False)
    on_cpu = weight_matching(spec, a.state_dict(), b.state_dict(), progress=False, device="cpu")
    assert all(torch.equal(on_gpu[g], on_cpu[g]) for g in spec.groups)
    state = apply_permutation(spec, on_gpu, b.state_dict())
    assert all(t.device.type == "cuda" for t in state.values())


# ============================================ control flow, in-place, custom ops
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = F.relu(h)
        return self.o(h)


class HoldsBranchy(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.pre, self.mid = nn.Linear(4, 8), nn.Linear(8, 4)
        self.inner, self.post = Branchy(), nn.Linear(2, 2)

    def forward(self, x):
        return self.post(self.inner(self.mid(F.relu(self.pre(x)))))


def test_data_dependent_control_flow_at_the_top_is_explained():
    with pytest.raises(TraceError, match=r"top-level forward of Branchy.*cannot be made an opaque leaf"):
        infer_spec(Branchy(), X)


def test_data_dependent_submodule_becomes_an_opaque_leaf():
    """Regression: nodes recorded while trying to trace into the submodule (its
    inner Linear) stayed in the graph and got a group of their own, permuting
    inner.a's outputs without inner.o's inputs: a wrong spec."""
    a, b = HoldsBranchy(0), HoldsBranchy(1)
    with pytest.warns(UserWarning, match="'inner' .*treated as opaque"), untouched(a):
        spec = infer_spec(a, X)
    permuted = {m.param for g in spec.groups.values() for m in g.members}
    assert not any(p.startswith("inner.") for p in permuted)
    assert "pre.weight" in permuted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_model(a, X)
    targets = [n.target for n in traced.gm.graph.nodes if n.op == "call_module"]
    assert targets == ["pre", "mid", "inner", "post"]
    check_equivalence(a, spec, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rebasin(a, b, X)
    assert_same_function(b, result.model, X)


class InPlace(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.o = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        g = self.b(h)
        g += h
        g.mul_(0.5)
        g[:, :2].zero_()  # writes through views fix those units
        g.select(1, 4).add_(1.0)
        return self.o(F.relu(g, inplace=True))


def test_in_place_ops():
    a, b = InPlace(0), InPlace(1)
    result = rebasin(a, b, X)
    # g += h ties a's and b's units; the writes cut them into segments [0:2] (zeroed
    # together: may be shuffled among themselves), [2:4], unit 4 (fixed) and [5:8]
    assert sorted(g.size for g in result.spec.groups.values()) == [2, 2, 3]
    assert_same_function(b, result.model, X)
    for seed in range(3):
        check_equivalence(a, result.spec, X, seed=seed)


class Swish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.flip(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1)


class WithFunction(nn.Module):
    def __init__(self, seed, fn):
        super().__init__()
        torch.manual_seed(seed)
        self.fn = fn
        self.a, self.o = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.o(self.fn.apply(self.a(x)))


@pytest.mark.parametrize("fn, groups", [(Swish, 1), (Reverse, 0)], ids=["elementwise", "mixing"])
def test_custom_autograd_functions(fn, groups):
    """fx traces the Function's forward: an elementwise one passes the channel
    permutation through, one that reorders channels blocks them."""
    a, b = WithFunction(0, fn), WithFunction(1, fn)
    result = rebasin(a, b, X)
    assert len(result.spec.groups) == groups
    assert_same_function(b, result.model, X)


# ========================================================================= wrappers
def test_torch_compile_and_data_parallel_are_unwrapped():
    a, b = ConvBN(0), ConvBN(1)
    for wrap in (torch.compile, nn.DataParallel, lambda m: nn.DataParallel(torch.compile(m))):
        wa, wb = wrap(a), wrap(b)
        assert unwrap_model(wa) is a
        with untouched(wa, wb):
            spec = infer_spec(wa, IMG)
            result = auto_rebasin(wa, wb, IMG, progress=False)
        assert all(not m.param.startswith(("module.", "_orig_mod.")) for g in spec.groups.values()
                   for m in g.members)
        assert type(result.model) is ConvBN
        assert_same_function(b, result.model, IMG)


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        a, b = mlp(0), mlp(1)
        wa, wb = nn.parallel.DistributedDataParallel(a), nn.parallel.DistributedDataParallel(b)
        with untouched(wa, wb):
            result = auto_rebasin(wa, wb, X, progress=False)
        assert type(result.model) is nn.Sequential and "0.weight" in result.state_dict
        assert_same_function(b, result.model, X)
    finally:
        dist.destroy_process_group()


def test_check_equivalence_looks_through_wrappers():
    model = ConvBN(0)
    spec = infer_spec(model, IMG)
    for wrap in (nn.DataParallel, torch.compile, lambda m: nn.DataParallel(torch.compile(m))):
        wrapped = wrap(model)
        with untouched(wrapped):
            err = check_equivalence(wrapped, spec, IMG)
        assert err <= 1e-5
        with pytest.raises(EquivalenceError, match="changed the outputs"):  # still a real check
            check_equivalence(wrapped, _one_sided(spec, "conv1:out", "conv2.weight"), IMG)


class Holder(nn.Module):
    """A model whose own submodule is called ``module``: its keys start with
    ``module.`` and the spec names them so; nothing may be stripped."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.module = mlp(seed)

    def forward(self, x):
        return self.module(x)


def test_apply_permutation_takes_a_wrappers_state_dict_and_keeps_its_keys():
    model = mlp(0)
    spec = infer_spec(model, X)
    perms = ab.random_permutation(spec, seed=1)
    inner = apply_permutation(spec, perms, model.state_dict())
    for wrap, prefix in ((nn.DataParallel, "module."), (torch.compile, "_orig_mod."),
                         (lambda m: nn.DataParallel(torch.compile(m)), "module._orig_mod.")):
        wrapped = wrap(model)
        sd = wrapped.state_dict()
        with untouched(wrapped):
            out = apply_permutation(spec, perms, sd)
        assert list(out) == list(sd) and all(k.startswith(prefix) for k in out)
        assert all(torch.equal(out[prefix + k], v) for k, v in inner.items())
        permuted = copy.deepcopy(model)
        wrap(permuted).load_state_dict(out)  # loads back into the caller's wrapper
        assert_same_function(model, permuted, X, tol=1e-6)
        assert not torch.equal(permuted[0].weight, model[0].weight)
    held = Holder()
    own = infer_spec(held, X)
    assert "module.0.weight" in own.members_by_param()
    out = apply_permutation(own, ab.random_permutation(own, 1), held.state_dict())
    assert list(out) == list(held.state_dict())
    with pytest.raises(ab.SpecError, match=r"state_dict has no entry '0\.weight'"):
        apply_permutation(spec, perms, {"module.0.weight": model[0].weight, "1.x": model[0].bias})


# =================================================================== fx graph modules
class Act(nn.Module):
    def __init__(self, fn, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)
        self.fn = fn

    def forward(self, x):
        return self.fc2(self.fn(self.fc1(x)))


def test_graph_modules_of_one_graph_are_aligned_and_of_two_graphs_refused():
    a, b = torch.fx.symbolic_trace(ConvBN(0)), torch.fx.symbolic_trace(ConvBN(1))
    assert type(a) is not type(b)  # fx makes a class per GraphModule
    result = rebasin(a, b, IMG)
    assert len(result.spec.groups) == 2
    assert_same_function(b, result.model, IMG)
    relu, gelu = torch.fx.symbolic_trace(Act(F.relu, 0)), torch.fx.symbolic_trace(Act(F.gelu, 1))
    with untouched(relu, gelu), pytest.raises(ArchitectureMismatchError,
                                              match=r"different graphs: node 2 is '%relu"):
        auto_rebasin(relu, gelu, X, progress=False)
    tanh = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16),
                                                 nn.ReLU(), nn.Linear(16, 3)))
    with pytest.raises(ArchitectureMismatchError, match="submodule '1' is a ReLU in a but a Tanh"):
        auto_rebasin(torch.fx.symbolic_trace(mlp(0)), tanh, X, progress=False)


# ============================================ verified merges, matchers given a spec
def _one_sided(spec, group: str, drop: str):
    """``spec`` with ``drop``'s member of ``group`` left out: the group permutes a
    layer's outputs but not the next layer's inputs, which changes the function."""
    from autobasin.spec import Group, PermutationSpec
    groups = [Group(g.name, g.size, [m for m in g.members
                                     if not (g.name == group and m.param == drop)])
              for g in spec.groups.values()]
    assert sum(len(g.members) for g in groups) < sum(len(g.members) for g in spec.groups.values())
    return PermutationSpec(groups, spec.tensors)


def test_merge_many_refuses_a_spec_that_changes_the_function():
    models = [mlp(seed) for seed in range(3)]
    spec = infer_spec(models[0], X)
    wrong = _one_sided(spec, "0:out", "2.weight")
    with untouched(*models), pytest.raises(EquivalenceError,
                                           match=r"model \d, permuted .* computes something else"):
        ab.merge_many(models, spec=wrong, example_inputs=X, progress=False)
    stats: dict = {}
    merged = ab.merge_many(models, spec=spec, example_inputs=X, progress=False, stats=stats)
    assert len(stats["verify_errors"]) == 3 and max(stats["verify_errors"]) <= 1e-5
    assert isinstance(merged, nn.Sequential)
    wide = infer_spec(mlp(0, width=32), X)
    with pytest.raises(ab.SpecError, match=r"model 0's state_dict's '0\.weight' axis 0 has length 16"):
        ab.merge_many(models, spec=wide, progress=False)


def test_merge_many_looks_through_wrappers():
    models = [mlp(seed) for seed in range(2)]
    wrapped = [nn.DataParallel(models[0]), torch.compile(models[1])]
    with untouched(*wrapped):
        merged = ab.merge_many(wrapped, example_inputs=X, progress=False)
    plain = ab.merge_many(models, example_inputs=X, progress=False)
    assert type(merged) is nn.Sequential
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged.state_dict().items())


def test_merge_many_without_example_inputs_says_it_did_not_verify():
    models = [mlp(seed) for seed in range(2)]
    loaded = ab.PermutationSpec.from_json(infer_spec(models[0], X).to_json())  # no inputs kept
    with pytest.warns(UserWarning, match=r"not verified .* pass example_inputs="):
        ab.merge_many(models, spec=loaded, progress=False)
    with pytest.warns(UserWarning, match="state dicts: the aligned models were not verified"):
        ab.merge_many([m.state_dict() for m in models], spec=loaded, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        stats: dict = {}
        ab.merge_many(models, spec=loaded, example_inputs=X, progress=False, stats=stats)
    assert max(stats["verify_errors"]) <= 1e-5


def _renamed(seed: int = 0):
    from collections import OrderedDict
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 16), act=nn.ReLU(), fc2=nn.Linear(16, 3)))


@pytest.mark.parametrize("method", ["weight", "activation", "ste"])
@pytest.mark.parametrize("other, needle", [
    (_renamed, r"has no entry 'fc1\.weight' that group 'fc1:out' permutes"),
    (lambda: mlp(0, width=32), r"'0\.weight' axis 0 has length 16, group '0:out' needs"),
    (lambda: mlp(0, width=8), r"'0\.weight' has shape \(16, 4\), but the spec was made for "
                              r"shape \(8, 4\)"),
], ids=["renamed", "wider", "narrower"])
def test_matchers_refuse_a_spec_of_another_model_naming_the_tensor(method, other, needle):
    from autobasin.match.ste import ste_matching
    a, b = mlp(0), mlp(1)
    spec = infer_spec(other(), X)
    data = [(X, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    run = {"weight": lambda: weight_matching(spec, a.state_dict(), b.state_dict(), progress=False),
           "activation": lambda: activation_matching(spec, a, b, data, progress=False),
           "ste": lambda: ste_matching(spec, a, b, data, max_steps=1, progress=False)}[method]
    with untouched(a, b), pytest.raises(ab.SpecError, match=needle):
        run()


def test_activation_matching_looks_through_wrappers():
    a, b = ConvBN(0), ConvBN(1)
    spec = infer_spec(a, IMG)
    plain = activation_matching(spec, a, b, [IMG], progress=False)
    wrapped = activation_matching(spec, nn.DataParallel(a), nn.DataParallel(b), [IMG],
                                  progress=False)
    assert all(torch.equal(plain[g], wrapped[g]) for g in spec.groups)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in plain.values())


# ====================================================================== determinism
def _noisy_pair():
    a = ConvBN(0, c=16)
    b = copy.deepcopy(a)
    randomize_state_(b, 5, 0.5)  # B is a noisy copy: near-ties in every similarity
    perm = ab.random_permutation(infer_spec(a, IMG), seed=3)
    b.load_state_dict(apply_permutation(infer_spec(a, IMG), perm, b.state_dict()))
    return a, b


def test_same_seed_same_permutations_across_runs_and_thread_counts():
    a, b = _noisy_pair()
    spec = infer_spec(a, IMG)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append((weight_matching(spec, a.state_dict(), b.state_dict(), seed=7, init="identity",
                                         progress=False),
                         activation_matching(spec, a, b, [IMG, IMG * 0.5], seed=7, progress=False)))
    finally:
        torch.set_num_threads(threads)
    for wm, act in runs[1:]:
        assert all(torch.equal(wm[g], runs[0][0][g]) for g in spec.groups)
        assert all(torch.equal(act[g], runs[0][1][g]) for g in spec.groups)
    first, second = (auto_rebasin(a, b, IMG, seed=7, progress=False).perms for _ in range(2))
    assert all(torch.equal(first[g], second[g]) for g in spec.groups)
    assert any(not torch.equal(runs[0][0][g], torch.arange(len(runs[0][0][g])))
               for g in spec.groups)  # the answer is not the trivial identity


# ===================================================================== Ctrl-C safety
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, suffix):
    import safetensors.torch

    from autobasin.io import load_state_dict, save_state_dict
    path = tmp_path / f"aligned{suffix}"
    old = {"w": torch.arange(6.0).reshape(2, 3)}
    save_state_dict(old, path)
    before = path.read_bytes()

    def interrupted(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict({"w": torch.zeros(2, 3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file
    monkeypatch.undo()
    assert torch.equal(load_state_dict(path)["w"], old["w"])


def test_interrupted_perms_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from autobasin.io import load_perms, save_perms
    path = tmp_path / "perms.json"
    save_perms({"g": torch.arange(4)}, path)

    def interrupted(self, text, *args, **kwargs):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_perms({"g": torch.tensor([3, 2, 1, 0])}, path)
    monkeypatch.undo()
    assert torch.equal(load_perms(path)["g"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["perms.json"]
