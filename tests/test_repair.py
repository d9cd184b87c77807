"""REPAIR: channel statistics, the fused correction, and the repair= options."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autobasin
from autobasin import channel_stats, interpolate, repair, reset_bn_stats
from autobasin.demo import make_mlp


def batches(n=256, features=20, batch=64, seed=0):
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + batch] for i in range(0, n, batch)]


def deep_pair(depth=5, width=32):
    """Two random ReLU MLPs with He-initialised weights (activations of order 1)."""
    pair = []
    for seed in (0, 1):
        model = make_mlp(20, [width] * depth, 4, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model:
                if isinstance(module, nn.Linear):
                    fan_in = module.weight.shape[1]
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                        * (2 / fan_in) ** 0.5)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        pair.append(model)
    return tuple(pair)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def outputs(model, data):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x in data])


# ------------------------------------------------------------------ endpoints
@pytest.mark.parametrize("mode", ["repair", "rescale"])
def test_repair_leaves_an_endpoint_unchanged(mode):
    a, b = deep_pair()
    data = batches()
    before_a, before_b = snapshot(a), snapshot(b)
    for lam, endpoint in ((0.0, a), (1.0, b)):
        point = interpolate(a, b, lam)
        fixed = repair(point, [a, b], data, alphas=lam, mode=mode)
        assert fixed is not point
        torch.testing.assert_close(outputs(fixed, data), outputs(endpoint, data), rtol=0, atol=1e-6)
        for key, value in fixed.state_dict().items():
            torch.testing.assert_close(value, endpoint.state_dict()[key], rtol=1e-6, atol=1e-7)
    # alphas as a list, all weight on one of three endpoints: that endpoint again
    c = make_mlp(20, [32] * 5, 4, seed=2)  # default init: small activations
    fixed = repair(copy.deepcopy(b), [a, b, c], data, alphas=[0, 1, 0], mode=mode)
    torch.testing.assert_close(outputs(fixed, data), outputs(b, data), rtol=0, atol=1e-6)
    for key, value in a.state_dict().items():  # inputs untouched
        assert torch.equal(value, before_a[key]) and torch.equal(b.state_dict()[key], before_b[key])


# ----------------------------------------------------------------- statistics
def test_repair_sets_interpolated_mean_and_std_rescale_sets_std():
    a, b = deep_pair()
    data = batches()
    lam = 0.3
    point = interpolate(a, b, lam)
    sa, sb, before = (channel_stats(m, data) for m in (a, b, point))
    info: dict = {}
    fixed = repair(point, [a, b], data, alphas=lam, stats=info)
    after = channel_stats(fixed, data)
    assert info["modules"] == ["fc1", "fc2", "fc3", "fc4", "fc5"]  # fc6 = logits, left alone
    assert info["scale_only"] == []
    collapsed = 0
    for name in info["modules"]:
        mean = (1 - lam) * sa[name].mean + lam * sb[name].mean
        std = (1 - lam) * sa[name].std + lam * sb[name].std
        collapsed += int((before[name].std / std).mean() < 0.9)
        torch.testing.assert_close(after[name].mean, mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(after[name].std, std, rtol=1e-3, atol=1e-5)
    assert collapsed >= 3, "the interpolated random MLP should show variance collapse"
    torch.testing.assert_close(fixed.fc6.weight, point.fc6.weight, rtol=0, atol=0)

    rescaled = repair(point, [a, b], data, alphas=lam, mode="rescale")
    got = channel_stats(rescaled, data)
    # fc1 is only rescaled: its output is the merged model's times a per-channel scale
    scale = got["fc1"].std / before["fc1"].std
    torch.testing.assert_close(got["fc1"].mean, before["fc1"].mean * scale, rtol=1e-5, atol=1e-7)
    for name in info["modules"]:
        std = (1 - lam) * sa[name].std + lam * sb[name].std
        torch.testing.assert_close(got[name].std, std, rtol=1e-3, atol=1e-5)


class ConvNet(nn.Module):
    """No normalization: a bias-free conv, a grouped conv, a grouped transposed conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.up(x)).mean((2, 3)))


def test_repair_convolutions_keep_architecture():
    torch.manual_seed(0)
    a, b = ConvNet(), ConvNet()
    x = torch.randn(32, 3, 8, 8)
    data = [x[:16], x[16:]]
    point = interpolate(a, b, 0.5)
    info: dict = {}
    fixed = repair(point, [a, b], data, stats=info)
    assert info["modules"] == ["c1", "c2", "up"] and info["scale_only"] == ["c1"]
    assert fixed.c1.bias is None
    assert {k: v.shape for k, v in fixed.state_dict().items()} == \
        {k: v.shape for k, v in point.state_dict().items()}
    sa, sb, got = (channel_stats(m, data) for m in (a, b, fixed))
    for name in ("c1", "c2", "up"):
        std = (sa[name].std + sb[name].std) / 2
        torch.testing.assert_close(got[name].std, std, rtol=1e-3, atol=1e-5)
    for name in ("c2", "up"):  # with a bias the mean is set too
        torch.testing.assert_close(got[name].mean, (sa[name].mean + sb[name].mean) / 2,
                                   rtol=0, atol=1e-5)
    # a generator is read once and gives the same result as the list
    again = repair(point, [a, b], (t for t in data))
    torch.testing.assert_close(outputs(again, data), outputs(fixed, data))
    # explicit module selection
    only: dict = {}
    repair(point, [a, b], data, modules=["up"], stats=only)
    assert only["modules"] == ["up"]


# ------------------------------------------------------------------ BatchNorm
class BNNet(nn.Module):
    """Conv -> BN (reset_bn covers it) and a BN-free MLP head (repaired)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def test_repair_resets_batchnorm_and_repairs_the_rest():
    torch.manual_seed(0)
    a, b = BNNet(), BNNet()
    x = torch.randn(64, 3, 6, 6) * 2 + 1
    data = [x[i:i + 16] for i in range(0, 64, 16)]
    for m in (a, b):
        reset_bn_stats(m, data)
    point = interpolate(a, b, 0.5)
    info: dict = {}
    fixed = repair(point, [a, b], data, stats=info)
    assert info["modules"] == ["fc1"]  # conv feeds the BatchNorm; fc2 gives the logits
    reset = reset_bn_stats(copy.deepcopy(point), data)
    torch.testing.assert_close(fixed.bn.running_mean, reset.bn.running_mean)
    torch.testing.assert_close(fixed.bn.running_var, reset.bn.running_var)
    torch.testing.assert_close(fixed.conv.weight, point.conv.weight)
    assert not torch.allclose(fixed.fc1.weight, point.fc1.weight)
    only_bn = repair(point, [a, b], data, mode="reset_bn")
    torch.testing.assert_close(outputs(only_bn, data), outputs(reset, data))
    assert not torch.equal(point.bn.running_mean, reset.bn.running_mean)  # point untouched


def test_repair_errors():
    a, b = deep_pair(depth=2, width=8)
    data = batches(n=32)
    with pytest.raises(ValueError, match="mode"):
        repair(a, [a, b], data, mode="renormalize")
    with pytest.raises(ValueError, match="alphas"):
        repair(a, [a, b], data, alphas=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="two endpoints"):
        repair(a, [a, b, a], data, alphas=0.5)
    with pytest.raises(ValueError, match="nonexistent"):
        repair(a, [a, b], data, modules=["nonexistent"])
    with pytest.raises(ValueError, match="no batches"):
        repair(a, [a, b], [])
    with pytest.raises(ValueError, match="channels"):
        repair(a, [make_mlp(20, [9, 8], 4, seed=0), b], data)


# ------------------------------------------------------- repair= in the helpers
def labelled(data, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(x, torch.randint(0, 4, (x.shape[0],), generator=gen)) for x in data]


def test_loss_barrier_repair_option():
    a, b = deep_pair()
    train, heldout = batches(seed=0), labelled(batches(seed=1))
    plain = autobasin.loss_barrier(a, b, heldout, lambdas=3, progress=False)
    fixed = autobasin.loss_barrier(a, b, heldout, lambdas=3, progress=False,
                                   repair="repair", repair_data=train)
    assert fixed.losses[0] == pytest.approx(plain.losses[0], abs=1e-6)
    assert fixed.losses[2] == pytest.approx(plain.losses[2], abs=1e-6)
    mid = repair(interpolate(a, b, 0.5), [a, b], train, alphas=0.5)
    expected, _ = autobasin.barrier.evaluate(mid, heldout)
    assert fixed.losses[1] == pytest.approx(expected, rel=1e-5)
    assert abs(fixed.losses[1] - plain.losses[1]) > 1e-4
    with pytest.raises(ValueError, match="repair_data"):
        autobasin.loss_barrier(a, b, heldout, lambdas=3, repair="repair", progress=False)
    with pytest.raises(ValueError, match="repair must be"):
        autobasin.loss_barrier(a, b, heldout, lambdas=3, repair="nope", repair_data=train)


def test_auto_rebasin_repair_option():
    a, b = deep_pair(depth=3, width=16)
    train, heldout = batches(seed=0), labelled(batches(seed=1))
    result = autobasin.auto_rebasin(a, b, example_inputs=train[0][:4], repair="repair",
                                    data=train, progress=False)
    assert result.repair == "repair" and result.reference is a
    mid = result.interpolate(0.5)
    expected = repair(interpolate(a, result.model, 0.5), [a, result.model], train, alphas=0.5)
    torch.testing.assert_close(outputs(mid, train), outputs(expected, train))
    plain = result.interpolate(0.5, repair=None)
    torch.testing.assert_close(outputs(plain, train),
                               outputs(interpolate(a, result.model, 0.5), train))
    curve = result.loss_barrier(heldout, lambdas=3, progress=False)
    assert curve.losses[1] == pytest.approx(autobasin.barrier.evaluate(mid, heldout)[0], rel=1e-5)
    with pytest.raises(ValueError, match="needs data"):
        autobasin.auto_rebasin(a, b, example_inputs=train[0][:4], repair="repair", progress=False)
    with pytest.raises(ValueError, match="repair must be"):
        autobasin.auto_rebasin(a, b, example_inputs=train[0][:4], repair="yes", data=train,
                               progress=False)
