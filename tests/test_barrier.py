"""interpolate, reset_bn_stats, loss_barrier and plot_barrier."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobasin import BarrierResult, interpolate, loss_barrier, plot_barrier, reset_bn_stats


class TinyConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def make(seed: int) -> TinyConvBN:
    torch.manual_seed(seed)
    model = TinyConvBN()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.num_batches_tracked.fill_(10 + seed)
    return model


def dataset(n=32, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=gen) * 2 + 0.5
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y, [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


# ---------------------------------------------------------------- interpolate
def test_interpolate_endpoints_and_integer_buffers():
    a, b = make(0), make(1)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    for lam, ref in ((0.0, sa), (1.0, sb)):
        out = interpolate(sa, sb, lam)
        for k, v in out.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-7)
        assert out["bn.num_batches_tracked"].item() == 10  # integer buffers come from a
    mid = interpolate(a, b, 0.5)
    assert isinstance(mid, TinyConvBN) and mid is not a
    torch.testing.assert_close(mid.conv.weight, (sa["conv.weight"] + sb["conv.weight"]) / 2)
    assert mid.bn.num_batches_tracked.item() == 10
    for k in sa:  # inputs untouched
        assert torch.equal(a.state_dict()[k], sa[k]) and torch.equal(b.state_dict()[k], sb[k])


def test_interpolate_keeps_dtype_and_validates():
    sa = {"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor(3)}
    sb = {"w": torch.full((3,), 3.0, dtype=torch.float16), "n": torch.tensor(5)}
    out = interpolate(sa, sb, 0.25)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], torch.full((3,), 1.5, dtype=torch.float16))
    assert out["n"].item() == 3
    with pytest.raises(ValueError, match="'w'"):
        interpolate(sa, {"w": torch.ones(4), "n": torch.tensor(1)}, 0.5)
    with pytest.raises(ValueError, match="'n'"):
        interpolate(sa, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(TypeError):
        interpolate(make(0), sb, 0.5)


# ------------------------------------------------------------ reset_bn_stats
def test_reset_bn_stats_is_the_cumulative_average_over_the_data():
    model = make(0)
    model.eval()
    x, _, loader = dataset()
    with torch.no_grad():
        feats = model.conv(x)  # (N, C, H, W): what the BN sees
    returned = reset_bn_stats(model, loader)
    assert returned is model
    assert not any(m.training for m in model.modules())  # modes restored
    assert model.bn.momentum == 0.3
    assert model.bn.num_batches_tracked.item() == len(loader)
    # equal batch sizes: the mean of batch means is the dataset mean
    torch.testing.assert_close(model.bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    # the variance is the mean of the unbiased batch variances
    batch_vars = torch.stack([feats[i:i + 8].transpose(0, 1).flatten(1).var(1) for i in range(0, 32, 8)])
    torch.testing.assert_close(model.bn.running_var, batch_vars.mean(0), rtol=1e-5, atol=1e-5)

    # one batch holding the whole dataset gives its exact statistics
    whole = make(0).train()
    reset_bn_stats(whole, [(x, None)], num_batches=1)
    assert whole.training and all(m.training for m in whole.modules())
    torch.testing.assert_close(whole.bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole.bn.running_var, feats.transpose(0, 1).flatten(1).var(1),
                               rtol=1e-5, atol=1e-5)


def test_reset_bn_stats_batches_forms_and_limits():
    x, _, _ = dataset()
    a = reset_bn_stats(make(0), [x[:8], x[8:16]])
    b = reset_bn_stats(make(0), [{"image": x[:8]}, {"image": x[8:16]}, {"image": x[16:]}], num_batches=2)
    torch.testing.assert_close(a.bn.running_mean, b.bn.running_mean)
    assert b.bn.num_batches_tracked.item() == 2
    mlp = nn.Sequential(nn.Linear(3, 3))
    before = copy.deepcopy(mlp.state_dict())
    assert reset_bn_stats(mlp, [object()]) is mlp  # no BN: data is not even read
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


# ---------------------------------------------------------------- loss_barrier
def test_loss_barrier_of_identical_models_is_zero():
    a = make(0)
    _, _, loader = dataset()
    res = loss_barrier(a, copy.deepcopy(a), loader, lambdas=5, progress=False)
    assert isinstance(res, BarrierResult)
    assert res.lambdas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(res.losses) == len(res.accuracies) == 5
    assert res.barrier == pytest.approx(0.0, abs=1e-6)
    assert res.barrier_linear == pytest.approx(0.0, abs=1e-6)
    assert res.midpoint_loss == pytest.approx(res.losses[0], abs=1e-6)
    assert 0.0 <= res.midpoint_accuracy <= 1.0


def test_loss_barrier_definitions_with_eval_fn():
    a, b = make(0), make(1)
    a0 = {k: v.clone() for k, v in a.state_dict().items()}
    # a loss known in closed form: lam is recovered from the fc weight
    wa, wb = a.fc.weight.detach().clone(), b.fc.weight.detach().clone()
    d = float((wb - wa).norm())

    def eval_fn(model):
        lam = float((model.fc.weight.detach() - wa).norm()) / d
        return 1 + 3 * lam + 2 * lam * (1 - lam)

    res = loss_barrier(a, b, eval_fn, lambdas=[0.0, 0.5, 1.0], progress=False)
    assert res.accuracies is None and res.midpoint_accuracy is None
    assert res.losses == pytest.approx([1.0, 3.0, 4.0], abs=1e-5)
    assert res.barrier == pytest.approx(4.0 - 2.5, abs=1e-5)        # max L - mean of endpoints
    assert res.barrier_linear == pytest.approx(0.5, abs=1e-5)       # height above the chord
    assert res.midpoint_loss == pytest.approx(3.0, abs=1e-5)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in a0.items())
    with pytest.raises(ValueError, match="include 0.0 and 1.0"):
        loss_barrier(a, b, eval_fn, lambdas=[0.0, 0.5], progress=False)


def test_loss_barrier_resets_bn_at_every_lambda():
    a, b = make(0), make(1)
    x, y, loader = dataset()
    calls = []

    def eval_fn(model):
        calls.append(model.bn.num_batches_tracked.item())
        with torch.no_grad():
            model.eval()
            logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

    res = loss_barrier(a, b, eval_fn, lambdas=3, reset_bn=loader, progress=False)
    assert calls == [len(loader)] * 3
    assert res.accuracies is not None and len(res.accuracies) == 3
    assert a.bn.num_batches_tracked.item() == 10  # a itself untouched


def test_plot_barrier_writes_png(tmp_path):
    a, b = make(0), make(1)
    _, _, loader = dataset()
    res = loss_barrier(a, b, loader, lambdas=4, progress=False)
    path = tmp_path / "barrier.png"
    fig = plot_barrier({"naive": res, "same": res}, path=str(path), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].lines) == 2
    fig = plot_barrier(res, metric="accuracy")
    assert len(fig.axes[0].lines) == 1
