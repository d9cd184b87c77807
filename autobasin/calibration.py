"""Calibration: expected calibration error and reliability plots.

A classifier is calibrated when, among the inputs it predicts with confidence
``p``, a fraction ``p`` is right. Merging and ensembling change confidence as
much as accuracy (an average of models is usually less over-confident than its
parents), so the benchmarks report both.

ECE here is the standard equal-width binned estimate on the top-1 confidence
(Guo et al. 2017): with bins ``B_1..B_M`` of ``(0, 1]`` (15 by default),

    ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|

where ``conf`` is the mean max-softmax probability of the bin's samples and
``acc`` the fraction of them whose argmax is the label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from .batches import batch_target, lm_logits, model_device, run_batch
from .distributed import all_gather_objects, world
from .guard import eval_mode


@dataclass
class CalibrationResult:
    """Binned calibration of one set of predictions.

    ``bin_edges`` has ``n_bins + 1`` entries from 0 to 1; bin ``m`` holds the
    samples with top-1 confidence in ``(edges[m], edges[m + 1]]`` (the first
    bin also takes confidence 0). ``bin_confidence`` and ``bin_accuracy`` are
    NaN for empty bins. ``accuracy`` and ``confidence`` are over all samples.
    """

    ece: float
    accuracy: float
    confidence: float
    bin_edges: list[float]
    bin_counts: list[int]
    bin_confidence: list[float]
    bin_accuracy: list[float]

    @property
    def n_bins(self) -> int:
        return len(self.bin_counts)


def _top1(scores: torch.Tensor, labels: torch.Tensor, probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N, classes), got shape {tuple(scores.shape)}")
    labels = torch.as_tensor(labels).reshape(-1).to(scores.device)
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} predictions but {labels.shape[0]} labels")
    if scores.shape[0] == 0:
        raise ValueError("no predictions")
    p = scores.detach().double()
    if not probs:
        p = p.softmax(-1)
    confidence, predicted = p.max(-1)
    return confidence.cpu(), (predicted == labels).double().cpu()


def reliability(scores: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                probs: bool = False) -> CalibrationResult:
    """Bin the top-1 confidences of ``scores`` and compare them with accuracy.

    Args:
        scores: (N, classes) logits, or probabilities when ``probs=True`` (e.g.
            the mean of an ensemble's softmax outputs).
        labels: (N,) integer class labels.
        n_bins: number of equal-width confidence bins on [0, 1].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, correct = _top1(scores, labels, probs)
    # bin m is (m / M, (m + 1) / M]: ceil(conf * M) - 1, with conf = 0 in bin 0
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    nonempty = counts > 0
    safe = counts.clamp_min(1).double()
    bin_conf = torch.where(nonempty, conf_sum / safe, torch.nan)
    bin_acc = torch.where(nonempty, acc_sum / safe, torch.nan)
    gaps = torch.where(nonempty, (acc_sum - conf_sum).abs(), 0.0)
    total = confidence.shape[0]
    return CalibrationResult(
        ece=float(gaps.sum() / total), accuracy=float(correct.mean()),
        confidence=float(confidence.mean()),
        bin_edges=[m / n_bins for m in range(n_bins + 1)], bin_counts=counts.tolist(),
        bin_confidence=bin_conf.tolist(), bin_accuracy=bin_acc.tolist())


def expected_calibration_error(scores: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                               probs: bool = False) -> float:
    """Expected calibration error of top-1 predictions, in [0, 1]; see :func:`reliability`."""
    return reliability(scores, labels, n_bins=n_bins, probs=probs).ece


def predict(model: nn.Module, data: Iterable,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, classes) float32 and labels (N,) of ``model`` over ``(input, target)``
    batches (or dicts with a target; keyword inputs of forward passed by name), on the
    CPU; eval mode without grad (the model's modes are restored)."""
    device = torch.device(device) if device is not None else model_device(model)
    logits, labels = [], []
    with eval_mode(model), torch.no_grad():
        for batch in data:
            try:
                target = batch_target(batch)
            except TypeError:
                raise TypeError("predict needs (input, target) batches, or dicts with a "
                                "target/labels key") from None
            logits.append(lm_logits(run_batch(model, batch, device)).float().cpu())
            labels.append(torch.as_tensor(target).cpu())
    if world() is not None:  # each rank's data is its shard: every rank gets all of them
        gathered = all_gather_objects((logits, labels))
        logits = [t for part, _ in gathered for t in part]
        labels = [t for _, part in gathered for t in part]
    if not logits:
        raise ValueError("the data yielded no batches")
    return torch.cat(logits), torch.cat(labels)


def reliability_plot(results: Mapping[str, CalibrationResult] | CalibrationResult,
                     path: str | None = None, title: str | None = None):
    """Reliability diagram: accuracy against confidence per bin, one curve per label.

    Each curve joins the non-empty bins at (mean confidence, accuracy); the
    dashed diagonal is perfect calibration (below it: over-confident). A lower
    panel shows the share of samples per bin. The legend gives each ECE. Draws
    on a standalone Agg figure; returns the ``matplotlib.figure.Figure`` and
    saves it to ``path`` if given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, CalibrationResult):
        results = {"": results}
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for label, res in results.items():
        points = [(c, a) for c, a, n in zip(res.bin_confidence, res.bin_accuracy, res.bin_counts)
                  if n > 0]
        name = f"{label} (ECE {100 * res.ece:.2f}%)" if label else f"ECE {100 * res.ece:.2f}%"
        line, = top.plot([c for c, _ in points], [a for _, a in points], marker="o",
                         markersize=3, label=name)
        total = max(sum(res.bin_counts), 1)
        centers = [(lo + hi) / 2 for lo, hi in zip(res.bin_edges[:-1], res.bin_edges[1:])]
        shares = [(c, n / total) for c, n in zip(centers, res.bin_counts) if n > 0]
        bottom.plot([c for c, _ in shares], [s for _, s in shares], color=line.get_color(),
                    marker="o", markersize=2)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    if title:
        top.set_title(title)
    bottom.set_xlabel("confidence (max softmax)")
    bottom.set_ylabel("share")
    bottom.set_yscale("log")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
