"""Repair interpolated models: recompute BatchNorm statistics, or REPAIR.

Averaging two aligned networks shrinks the variance of hidden activations, so
BatchNorm running statistics copied from the endpoints no longer fit; Git
Re-Basin resets them on training data before evaluating a merged model
(:func:`reset_bn_stats`). Networks without BatchNorm get the same correction
from :func:`repair` (REPAIR), fused into their Conv/Linear weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batches import InputBatches, model_device, run_batch
from .distributed import all_sum, all_sum_floats, require_every_rank, world
from .guard import eval_mode

def reset_bn_stats(model: nn.Module, data: Iterable, num_batches: int | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on ``data``; in place.

    This is the one function of autobasin that modifies its argument: ``model``
    itself gets the new statistics and is returned. Every
    ``torch.nn.modules.batchnorm._BatchNorm`` that tracks running statistics
    (BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d, ...) is reset and
    then, with ``momentum=None``, takes the cumulative average of the batch
    statistics over the forward passes: the running mean is the mean of the
    batch means (the dataset mean when batches are equal in size) and the
    running variance the mean of the unbiased batch variances.
    Under torch.distributed each rank's ``data`` is its shard, and every rank gets
    the means over all ranks' batches.

    ``data`` is an iterable of batches (see :func:`autobasin.batches.batch_inputs`); at most
    ``num_batches`` of them are used. Inputs go to ``device`` (the model is moved
    there too when given), else to the model's device. Each BatchNorm's momentum
    and every submodule's train/eval mode are restored afterwards. A model
    without BatchNorm is returned unchanged without looking at ``data``.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    if device is not None:
        model.to(device)
    device = torch.device(device) if device is not None else model_device(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        seen = 0
        with torch.no_grad():
            for i, batch in enumerate(data):
                if num_batches is not None and i >= num_batches:
                    break
                run_batch(model, batch, device)
                seen += 1
        _combine_bn_over_ranks(norms, seen)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return model


def _combine_bn_over_ranks(norms, batches: int) -> None:
    """Under torch.distributed: each rank's running statistics are the mean over its
    own batches; make every rank's the mean over all ranks' batches (what one
    process given every batch computes). No-op without a process group."""
    if world() is None:
        return
    require_every_rank(batches > 0, "reset_bn_stats got no batch on this rank")
    total, = all_sum_floats(batches)
    for m in norms:
        mean, var, tracked = all_sum(m.running_mean * batches, m.running_var * batches,
                                     m.num_batches_tracked.to(torch.float64))
        m.running_mean.copy_(mean / total)
        m.running_var.copy_(var / total)
        m.num_batches_tracked.copy_(tracked.round().to(m.num_batches_tracked.dtype))


# ====================================================================== REPAIR
# REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for
# Interpolation Repair"): averaging aligned networks shrinks the variance of
# hidden activations layer after layer ("variance collapse"). REPAIR measures
# every channel's mean and std in the endpoints and sets the merged model's to
# their interpolation. Here the correction is fused into the weight and bias of
# the Conv/Linear module that produces the channel, so the architecture is
# unchanged.

REPAIR_MODES = ("repair", "rescale", "reset_bn")


def check_repair_option(repair: str | None) -> None:
    """Raise ValueError unless ``repair`` is None or one of :data:`REPAIR_MODES`."""
    if repair is not None and repair not in REPAIR_MODES:
        raise ValueError(f"repair must be None or one of {REPAIR_MODES}, got {repair!r}")
REPAIRABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
              nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class ChannelStats:
    """Mean and variance (population, over samples and spatial positions) of
    each output channel of one module: ``mean``, ``var`` float64 (C,); ``count``
    the number of values per channel they summarise."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt()


class _Moments:
    """Streaming per-channel mean and sum of squared deviations in float64
    (Chan et al.'s pairwise update: one batch at a time, no catastrophic
    cancellation from raw sums of squares)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        """``values``: (n, C), any float dtype and device."""
        x = values.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def synchronize(self, channels: int) -> None:
        """Combine every torch.distributed rank's moments (no-op without a process
        group): afterwards each rank holds those of all ranks' values."""
        if world() is None:
            return
        if self.mean is None:
            self.mean = torch.zeros(channels, dtype=torch.float64)
            self.m2 = torch.zeros(channels, dtype=torch.float64)
        n = float(self.count)
        weighted, count = all_sum(self.mean * n, torch.tensor([n], dtype=torch.float64))
        total = float(count.item())
        if total == 0:
            self.mean = self.m2 = None
            self.count = 0
            return
        mean = weighted / total
        m2, = all_sum(self.m2 + n * (self.mean - mean).square())
        self.count, self.mean, self.m2 = int(round(total)), mean, m2

    def result(self) -> ChannelStats:
        if self.mean is None:
            raise ValueError("no values were seen")
        return ChannelStats(self.mean.cpu(), (self.m2 / self.count).cpu(), self.count)


def _channels_last(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` as (samples, C): every axis but the channel one
    (Linear: last; Conv: axis 1) is folded into samples."""
    if isinstance(module, nn.Linear):
        return out.reshape(-1, out.shape[-1])
    unbatched = out.dim() == module.weight.dim() - 1  # (C, *spatial)
    channels = out if unbatched else out.movedim(1, 0)
    return channels.reshape(channels.shape[0], -1).t()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted values are seen."""


def _output_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def _supported(module: nn.Module) -> bool:
    return isinstance(module, REPAIRABLE) and isinstance(getattr(module, "weight", None),
                                                         nn.Parameter)


@dataclass
class _Plan:
    order: list[str]          # repairable modules in the order they first run
    calls: dict[str, int]     # calls per forward pass
    last: str | None          # the last repairable module to run (the logits)
    feeds_batchnorm: set[str]  # modules whose output goes straight into a BatchNorm


def _plan(model: nn.Module, x: torch.Tensor) -> _Plan:
    """Run one batch and note which repairable modules run, in which order, and
    which of them feed a BatchNorm directly (their statistics are that norm's)."""
    names = {m: n for n, m in model.named_modules() if _supported(m)}
    order: list[str] = []
    calls: dict[str, int] = {}
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps ids unique while the pass runs
    feeds_bn: set[str] = set()
    last = [None]

    def after(module, args, out):
        name = names[module]
        if name not in calls:
            order.append(name)
        calls[name] = calls.get(name, 0) + 1
        last[0] = name
        if isinstance(out, torch.Tensor):
            alive.append(out)
            produced[id(out)] = name

    def before_bn(module, args):
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
            feeds_bn.add(produced[id(args[0])])

    handles = [m.register_forward_hook(after) for m in names]
    handles += [m.register_forward_pre_hook(before_bn) for m in model.modules()
                if isinstance(m, _BatchNorm)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return _Plan(order, calls, last[0], feeds_bn)


def _measure(model: nn.Module, batches: Iterable[torch.Tensor], names: Sequence[str],
             device: torch.device, stop_after: str | None = None) -> dict[str, ChannelStats]:
    """Per-channel statistics of the outputs of the modules ``names`` over
    ``batches``, in eval mode, without grad. With ``stop_after``, each forward
    pass ends as soon as that module has run (it must run once per pass)."""
    modules = dict(model.named_modules())
    moments = {name: _Moments() for name in names}
    handles = []
    for name in names:
        def hook(module, args, out, name=name):
            moments[name].update(_channels_last(module, out))
            if name == stop_after:
                raise _Stop
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                try:
                    run_batch(model, x, device)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    for name, m in moments.items():  # under torch.distributed: every rank's batches
        m.synchronize(_output_channels(modules[name]))
    missing = [n for n, m in moments.items() if m.mean is None]
    if missing:
        raise ValueError(f"module(s) {missing} did not run on the data (or the data is empty)")
    return {name: m.result() for name, m in moments.items()}


def channel_stats(model: nn.Module, data: Iterable, modules: Sequence[str] | None = None,
                  num_batches: int | None = None,
                  device: torch.device | str | None = None) -> dict[str, ChannelStats]:
    """Mean and variance of every output channel of Conv/Linear modules over ``data``.

    ``modules``: module names (default: every Conv*/ConvTranspose*/Linear that
    runs in the forward pass). Statistics are streamed over the batches in
    float64, in eval mode and without grad; spatial positions (Conv) and extra
    leading axes (Linear on tokens) count as samples. Returns
    ``{name: ChannelStats}`` in forward order. The model is not modified.
    """
    batches = InputBatches(data, num_batches)
    device = torch.device(device) if device is not None else model_device(model)
    if modules is None:
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("the data yielded no batches")
        with eval_mode(model):
            modules = _plan(model, first.to(device)).order
    return _measure(model, batches, list(modules), device)


def _output_scale_(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply output channel c of ``module``'s weight by ``scale[c]`` (in place)."""
    w = module.weight
    s = scale.to(w.device, torch.float64)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight (in, out/groups, *k): output channel g * out/groups + j is [g-th block of in, j]
        groups = module.groups
        blocks = w.detach().to(torch.float64).reshape(groups, w.shape[0] // groups, *w.shape[1:])
        s = s.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new = (blocks * s).reshape(w.shape)
    else:
        new = w.detach().to(torch.float64) * s.reshape(-1, *([1] * (w.dim() - 1)))
    w.data.copy_(new.to(w.dtype))


def _scale(measured: ChannelStats, target_std: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt((target_std**2 + e) / (var + e))`` per channel, with ``e`` = ``eps`` times
    the layer's mean target variance (so the result does not depend on the
    activations' units), floored at 1e-30."""
    target_var = target_std.square()
    e = eps * float(target_var.mean()) + 1e-30
    return ((target_var + e) / (measured.var + e)).sqrt()


def _fuse_(module: nn.Module, measured: ChannelStats, target_mean: torch.Tensor,
           scale: torch.Tensor, shift: bool) -> bool:
    """Make ``module``'s output ``y' = scale * y + t`` per channel, with
    ``t = target_mean - scale * mean`` (``t = 0`` without ``shift``), given the
    output's ``measured`` statistics. Returns False when the shift was wanted
    but the module has no bias to hold it (then only the scale is applied)."""
    _output_scale_(module, scale)
    bias = module.bias
    if bias is None:
        return not shift
    b = bias.detach().to(torch.float64) * scale.to(bias.device)
    if shift:
        b = b + (target_mean - scale * measured.mean).to(bias.device)
    bias.data.copy_(b.to(bias.dtype))
    return True


def _normalized_alphas(alphas, n: int) -> list[float]:
    if alphas is None:
        return [1.0 / n] * n
    if isinstance(alphas, (int, float)):
        if n != 2:
            raise ValueError(f"a single alpha (lambda) needs two endpoints, got {n}")
        alphas = (1.0 - float(alphas), float(alphas))
    alphas = [float(a) for a in alphas]
    if len(alphas) != n:
        raise ValueError(f"got {len(alphas)} alphas for {n} endpoints")
    total = sum(alphas)
    if abs(total) < 1e-12:
        raise ValueError("alphas sum to zero")
    return [a / total for a in alphas]


def repair(merged: nn.Module, endpoints: Sequence[nn.Module | Mapping[str, ChannelStats]],
           data: Iterable, alphas: float | Sequence[float] | None = None, mode: str = "repair",
           num_batches: int | None = None, device: torch.device | str | None = None,
           modules: Sequence[str] | None = None, eps: float = 1e-5,
           stats: dict | None = None) -> nn.Module:
    """REPAIR a merged model: its channels get the endpoints' interpolated statistics.

    A copy of ``merged`` is returned (``merged`` and the endpoints are left alone),
    with the same architecture and state_dict keys. For each selected module
    (below), in forward order, the per-channel mean ``mu`` and std ``sigma`` of its
    output are measured on ``data`` in the copy, and the module's weight and bias
    are rewritten so that the output becomes ``s * y + t`` with

        sigma_target = sum_i alpha_i * sigma_i,   mu_target = sum_i alpha_i * mu_i
        s = sqrt((sigma_target**2 + e) / (sigma**2 + e)),   t = mu_target - s * mu

    where ``mu_i, sigma_i`` are endpoint i's statistics of the same channel (the
    endpoints must be aligned to ``merged``: same channel order). As in the paper,
    means and stds (not variances) are interpolated.

    Modes:
        ``"repair"``: mean and std (REPAIR). A module without a bias cannot hold
            the shift ``t`` without a new parameter, so it gets the scale only;
            ``stats["scale_only"]`` lists such modules.
        ``"rescale"``: std only; ``t = 0``, so each channel is multiplied by
            ``s`` (weight rows and bias alike) and its mean is not targeted.
        ``"reset_bn"``: only recompute BatchNorm statistics (:func:`reset_bn_stats`).

    Which modules: ``modules`` (names), or by default every ``nn.Linear``,
    ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d`` that runs in the forward
    pass, except the last one to run (it produces the logits) and those whose
    output goes straight into a BatchNorm. Models with BatchNorm first get
    :func:`reset_bn_stats` on ``data`` (for a Conv -> BN pair that *is* REPAIR:
    the norm re-standardizes the channel and its affine parameters, interpolated
    with the rest of the weights, set the target); Conv/Linear layers not
    followed by a BatchNorm (e.g. a VGG-BN classifier) are then repaired as above.
    Other norms (LayerNorm, GroupNorm) are left as they are.

    Layers are corrected one at a time in forward order and the copy is
    re-measured before each correction, so every layer's statistics are
    measured with the layers before it already repaired (the most accurate
    variant; each measuring pass stops right after the layer it measures). The
    endpoints are measured once, all layers in one pass, in eval mode with their
    BatchNorm statistics as they are.

    Args:
        merged: the merged or interpolated model.
        endpoints: the models that were merged, aligned to ``merged``, or their
            :func:`channel_stats` (e.g. computed once for a whole lambda sweep).
        data: batches (see :func:`autobasin.batches.batch_inputs`; a tensor is one batch), at most
            ``num_batches`` of them. A one-shot iterator is read once into memory.
        alphas: one weight per endpoint (normalized to sum 1; default equal), or
            for two endpoints a single number ``lam`` meaning ``(1 - lam, lam)``.
        device: where to run (the copy is moved there), default ``merged``'s device.
        eps: ``e`` above is ``eps`` times the layer's mean target variance, added
            to both variances: it keeps dead channels finite, does not depend on
            the activations' units, and an endpoint (``alphas`` all on one model)
            maps exactly to itself.
        stats: if a dict, filled with ``modules`` (the names corrected),
            ``scale`` ({name: float64 (C,) scale}) and ``scale_only``.

    Returns:
        the repaired copy, in ``merged``'s train/eval mode.
    """
    if mode not in REPAIR_MODES:
        raise ValueError(f"mode must be one of {REPAIR_MODES}, got {mode!r}")
    endpoints = list(endpoints)
    if not endpoints and mode != "reset_bn":
        raise ValueError("repair needs the endpoints (the models that were merged)")
    weights = _normalized_alphas(alphas, len(endpoints)) if endpoints else []
    model = copy.deepcopy(merged)
    if device is not None:
        model.to(device)
    device = torch.device(device) if device is not None else model_device(model)
    batches = InputBatches(data, num_batches)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("the repair data yielded no batches")

    has_bn = any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())
    if has_bn:
        reset_bn_stats(model, batches, device=device)
    report = {"modules": [], "scale": {}, "scale_only": []}
    if mode == "reset_bn":
        if stats is not None:
            stats.update(report)
        return model

    with eval_mode(model):
        plan = _plan(model, first.to(device))
    if modules is None:
        targets = [n for n in plan.order if n != plan.last and n not in plan.feeds_batchnorm]
    else:
        named = dict(model.named_modules())
        unknown = [n for n in modules if n not in named or not _supported(named[n])]
        if unknown:
            raise ValueError(f"cannot repair {unknown}: not Conv/Linear modules of the model")
        idle = [n for n in modules if n not in plan.calls]
        if idle:
            raise ValueError(f"module(s) {idle} do not run in the forward pass")
        wanted = set(modules)
        targets = [n for n in plan.order if n in wanted]
    report["modules"] = targets
    if targets:
        reference = []
        for i, end in enumerate(endpoints):
            if isinstance(end, nn.Module):
                reference.append(_measure(end, batches, targets, model_device(end)))
            else:
                missing = [n for n in targets if n not in end]
                if missing:
                    raise ValueError(f"the statistics of endpoint {i} lack {missing}")
                reference.append(end)
        named = dict(model.named_modules())
        for name in targets:
            per_end = [ref[name] for ref in reference]
            sizes = {s.mean.numel() for s in per_end}
            channels = _output_channels(named[name])
            if sizes != {channels}:
                raise ValueError(f"{name!r}: {channels} channels in the merged model but "
                                 f"{sorted(sizes)} in the endpoints")
            target_mean = sum(w * s.mean for w, s in zip(weights, per_end))
            target_std = sum(w * s.std for w, s in zip(weights, per_end)).clamp_min(0)
            stop = name if plan.calls[name] == 1 else None
            measured = _measure(model, batches, [name], device, stop_after=stop)[name]
            scale = _scale(measured, target_std, eps)
            with torch.no_grad():
                complete = _fuse_(named[name], measured, target_mean, scale,
                                  shift=(mode == "repair"))
            report["scale"][name] = scale
            if not complete:
                report["scale_only"].append(name)
    if stats is not None:
        stats.update(report)
    return model
