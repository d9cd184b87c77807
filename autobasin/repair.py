"""Repair interpolated models: recompute BatchNorm statistics.

Averaging two aligned networks shrinks the variance of hidden activations, so
BatchNorm running statistics copied from the endpoints no longer fit; Git
Re-Basin resets them on training data before evaluating a merged model.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "img", "pixel_values")


def batch_input(batch: Any) -> torch.Tensor:
    """The model input of one batch from a data loader.

    A tensor is the input; a tuple or list ``(input, target, ...)`` gives its
    element 0; a dict gives the value of the first of the keys ``input``,
    ``inputs``, ``x``, ``image``, ``images``, ``img``, ``pixel_values`` it has,
    else its first tensor value.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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

    ``data`` is an iterable of batches (see :func:`batch_input`); at most
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
        with torch.no_grad():
            for i, batch in enumerate(data):
                if num_batches is not None and i >= num_batches:
                    break
                model(batch_input(batch).to(device))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return model
