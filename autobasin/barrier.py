"""Loss barriers along the straight line between two models, and their plot."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .state import interpolate_state_dicts
from .distributed import all_sum_floats
from .guard import eval_mode
from .batches import InputBatches, model_device, run_batch, score_batch
from .repair import channel_stats, check_repair_option
from .repair import repair as repair_model
from .repair import reset_bn_stats


@dataclass
class BarrierResult:
    """Loss (and accuracy) of ``(1 - lam) * a + lam * b`` at each ``lam``.

    ``barrier`` is the paper's ``max_lam L(lam) - (L(0) + L(1)) / 2``;
    ``barrier_linear`` is ``max_lam [L(lam) - ((1 - lam) L(0) + lam L(1))]``, the
    height above the chord. ``midpoint_*`` are the values at ``lam = 0.5``
    (linearly interpolated between neighbours when 0.5 is not a grid point).
    ``accuracies`` and ``midpoint_accuracy`` are None when the evaluation gave
    no accuracy.
    """

    lambdas: list[float]
    losses: list[float]
    accuracies: list[float] | None
    barrier: float
    barrier_linear: float
    midpoint_loss: float
    midpoint_accuracy: float | None


def _lambda_grid(lambdas: int | Sequence[float]) -> list[float]:
    if isinstance(lambdas, int):
        if lambdas < 2:
            raise ValueError(f"need at least 2 lambdas (0 and 1), got {lambdas}")
        return [float(x) for x in np.linspace(0.0, 1.0, lambdas)]
    grid = [float(x) for x in lambdas]
    if 0.0 not in grid or 1.0 not in grid:
        raise ValueError("lambdas must include 0.0 and 1.0: the barrier is measured against the endpoints")
    return grid


def evaluate(model: nn.Module, data: Iterable, loss_fn: Callable | None = None,
             device: torch.device | str | None = None) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over ``data`` in eval mode, without grad.

    Batches are ``(input, target)`` pairs or dicts (keyword inputs of the model's
    forward, such as ``{"input_ids": ...}``, are passed by name: see
    :func:`autobasin.batches.batch_inputs`). The default loss is the batch's
    (:func:`autobasin.batches.score_batch`): cross-entropy against the target,
    weighted by batch size, with top-1 accuracy; for a causal LM batch
    (``input_ids``, no target) next-token cross-entropy and accuracy over every
    predicted token; for a masked LM batch (``input_ids`` and per-token ``labels``)
    the cross-entropy of the labelled tokens. ``loss_fn(logits, target)`` replaces
    the cross-entropy of ``(input, target)`` batches. The model's train/eval modes
    are restored. Under torch.distributed (an initialised process group), each
    rank's ``data`` is its shard and every rank returns the mean over all of them.
    """
    device = torch.device(device) if device is not None else model_device(model)
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model), torch.no_grad():
        for batch in data:
            loss, right, n = score_batch(run_batch(model, batch, device), batch, loss_fn)
            total_loss += loss
            correct += right
            count += n
    # under torch.distributed each rank's data is its shard: sum over ranks
    total_loss, correct, count = all_sum_floats(total_loss, correct, count)
    if count == 0:
        raise ValueError("the evaluation data yielded no samples")
    return total_loss / count, correct / count


def loss_barrier(a: nn.Module, b: nn.Module, eval_fn_or_data: Callable | Iterable,
                 lambdas: int | Sequence[float] = 25, reset_bn: Iterable | None = None,
                 loss_fn: Callable | None = None, device: torch.device | str | None = None,
                 progress: bool = True, repair: str | None = None,
                 repair_data: Iterable | None = None,
                 repair_batches: int | None = None) -> BarrierResult:
    """Evaluate the models on the segment ``(1 - lam) * a + lam * b``.

    Args:
        a, b: two models of one architecture (align ``b`` to ``a`` first, e.g. with
            :func:`autobasin.auto_rebasin`); neither is modified.
        eval_fn_or_data: a callable ``model -> loss`` or ``model -> (loss, accuracy)``,
            or an iterable of batches scored by :func:`evaluate`: ``(input, target)``
            batches with the mean of ``loss_fn`` (default cross-entropy) and top-1
            accuracy; ``{"input_ids": ...}`` batches of a causal LM with next-token
            cross-entropy and accuracy (so two ``LlamaForCausalLM`` need no more
            arguments); masked LM batches with ``labels`` with the labelled tokens' loss.
        lambdas: an int ``k`` for ``k`` evenly spaced points from 0 to 1 inclusive, or
            the points themselves (they must include 0 and 1).
        reset_bn: if an iterable of batches, BatchNorm statistics are recomputed on
            it (:func:`autobasin.reset_bn_stats`) at *every* lambda, the endpoints
            included, so all points of the curve are treated alike.
        repair: ``"reset_bn"``, ``"repair"`` or ``"rescale"``: every point of the path,
            the endpoints included, is first repaired with :func:`autobasin.repair`
            (``alphas = (1 - lam, lam)``, endpoints ``a`` and ``b``) on ``repair_data``
            (default: the ``reset_bn`` batches), using at most ``repair_batches``
            batches. At ``lam = 0`` and ``1`` REPAIR changes nothing (up to rounding);
            BatchNorm models get their statistics reset. The endpoints' channel
            statistics are measured once for the whole sweep.
        repair_data: batches for ``repair`` (typically training data).
        device: where to evaluate (default: ``a``'s device).
        progress: show a tqdm bar over lambdas.
    """
    grid = _lambda_grid(lambdas)
    if repair is not None:
        check_repair_option(repair)
        repair_data = repair_data if repair_data is not None else reset_bn
        if repair_data is None:
            raise ValueError(f"repair={repair!r} needs repair_data=<batches>")
        repair_data = InputBatches(repair_data, repair_batches)
        endpoint_stats = None
        if repair != "reset_bn":
            endpoint_stats = [channel_stats(m, repair_data) for m in (a, b)]
    sd_a, sd_b = a.state_dict(), b.state_dict()
    model = copy.deepcopy(a)
    if device is not None:
        model.to(device)
    losses: list[float] = []
    accuracies: list[float] | None = []
    for lam in tqdm(grid, desc="loss barrier", disable=not progress):
        model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, lam))
        point = model
        if repair is not None:
            point = repair_model(model, endpoint_stats or [], repair_data, alphas=(1 - lam, lam),
                                 mode=repair, device=device)
        elif reset_bn is not None:
            reset_bn_stats(model, reset_bn, device=device)
        if callable(eval_fn_or_data):
            out = eval_fn_or_data(point)
        else:
            out = evaluate(point, eval_fn_or_data, loss_fn=loss_fn, device=device)
        if isinstance(out, (tuple, list)):
            loss, acc = float(out[0]), float(out[1])
        else:
            loss, acc = float(out), None
        losses.append(loss)
        if acc is None:
            accuracies = None
        elif accuracies is not None:
            accuracies.append(acc)

    lam_arr, loss_arr = np.asarray(grid), np.asarray(losses)
    l0, l1 = losses[grid.index(0.0)], losses[grid.index(1.0)]
    order = np.argsort(lam_arr)
    midpoint = float(np.interp(0.5, lam_arr[order], loss_arr[order]))
    mid_acc = None
    if accuracies is not None:
        mid_acc = float(np.interp(0.5, lam_arr[order], np.asarray(accuracies)[order]))
    return BarrierResult(
        lambdas=grid, losses=losses, accuracies=accuracies,
        barrier=float(loss_arr.max() - (l0 + l1) / 2),
        barrier_linear=float(np.max(loss_arr - ((1 - lam_arr) * l0 + lam_arr * l1))),
        midpoint_loss=midpoint, midpoint_accuracy=mid_acc)


def plot_barrier(results: Mapping[str, BarrierResult] | BarrierResult, path: str | None = None,
                 title: str | None = None, metric: str = "loss"):
    """Plot ``metric`` ('loss' or 'accuracy') against lambda, one curve per label.

    Draws on a standalone Agg figure (pyplot's global state is left alone);
    returns the ``matplotlib.figure.Figure`` and saves it to ``path`` if given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    if isinstance(results, BarrierResult):
        results = {"": results}
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, res in results.items():
        values = res.losses if metric == "loss" else res.accuracies
        if values is None:
            raise ValueError(f"result {label!r} has no accuracies to plot")
        ax.plot(res.lambdas, values, marker="o", markersize=3, label=label or None)
    ax.set_xlabel("λ  (0 = model A, 1 = model B)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    if any(results):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
