"""Expected calibration error, binning, predict and the reliability plot."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autobasin import CalibrationResult, expected_calibration_error, reliability, reliability_plot
from autobasin.calibration import predict


def test_ece_by_hand():
    # top-1 confidences 0.9, 0.9, 0.62, 0.62, 0.34: 15 bins, indices 13, 9 and 5
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.62, 0.38, 0.0],
                          [0.62, 0.38, 0.0], [0.34, 0.33, 0.33]])
    labels = torch.tensor([0, 1, 0, 0, 2])
    res = reliability(probs, labels, probs=True)
    # bin of 0.9: acc 0.5, conf 0.9; bin of 0.62: acc 1, conf 0.62; bin of 0.34: acc 0, conf 0.34
    expected = (2 * abs(0.5 - 0.9) + 2 * abs(1 - 0.62) + abs(0 - 0.34)) / 5
    assert res.ece == pytest.approx(expected)
    assert res.accuracy == pytest.approx(3 / 5)
    assert res.confidence == pytest.approx((0.9 * 2 + 0.62 * 2 + 0.34) / 5)
    assert res.n_bins == 15 and len(res.bin_edges) == 16 and sum(res.bin_counts) == 5
    assert res.bin_counts[13] == 2 and res.bin_counts[9] == 2 and res.bin_counts[5] == 1
    assert res.bin_accuracy[13] == pytest.approx(0.5) and math.isnan(res.bin_accuracy[0])
    # logits give the same as their softmax
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    assert expected_calibration_error(logits, y) == \
        pytest.approx(expected_calibration_error(logits.softmax(-1), y, probs=True))


def test_ece_extremes_and_errors():
    one_hot = torch.eye(4)
    assert expected_calibration_error(one_hot, torch.arange(4), probs=True) == 0.0
    assert expected_calibration_error(one_hot, torch.tensor([1, 2, 3, 0]), probs=True) == 1.0
    # a confidence exactly on a bin edge goes to the lower bin: 0.5 in (0, 0.5]
    assert reliability(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), n_bins=2,
                       probs=True).bin_counts == [1, 0]
    with pytest.raises(ValueError, match="labels"):
        reliability(one_hot, torch.arange(3), probs=True)
    with pytest.raises(ValueError, match="n_bins"):
        reliability(one_hot, torch.arange(4), n_bins=0)


def test_predict_and_plot(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    model.train()
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    logits, labels = predict(model, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert model.training  # mode restored
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    assert torch.equal(labels, y)
    results = {"a": reliability(logits, labels), "b": reliability(logits * 4, labels)}
    assert isinstance(results["a"], CalibrationResult)
    fig = reliability_plot(results, path=tmp_path / "rel.png", title="t")
    assert (tmp_path / "rel.png").stat().st_size > 1000
    assert "ECE" in fig.axes[0].get_legend().get_texts()[0].get_text()
