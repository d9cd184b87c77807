"""Plumbing for batches: where a batch's model input and target are, and where a
model lives. Every layer above (matching, REPAIR, barriers, calibration, the CLI)
reads batches through these functions, so a new batch layout is taught here once."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn

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


def batch_target(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in ("target", "targets", "label", "labels", "y"):
            if key in batch:
                return batch[key]
    raise TypeError("a data loader for loss_barrier must yield (input, target) batches; "
                    "pass an eval_fn for other data")


class InputBatches:
    """Re-iterable model inputs: at most ``limit`` batches of ``data``.

    A one-shot iterator (a generator, ``iter(loader)``) is read once and its
    inputs are kept in memory, since REPAIR passes over the data several times.
    A tensor is one batch.
    """

    def __init__(self, data: Iterable, limit: int | None = None) -> None:
        if isinstance(data, InputBatches):
            data, limit = data.data, data.limit if limit is None else min(limit, data.limit or limit)
        if isinstance(data, torch.Tensor):
            data = [data]
        elif iter(data) is data:
            data = [batch_input(b) for b in itertools.islice(data, limit)]
        self.data, self.limit = data, limit

    def __iter__(self):
        for batch in itertools.islice(self.data, self.limit):
            yield batch_input(batch)


def batch_args(batch: Any, input_fn: Callable | None = None,
               device: torch.device | str | None = None) -> tuple:
    """The positional inputs of one batch: ``input_fn(batch)`` (default
    :func:`batch_input`) as a tuple, tensors moved to ``device`` when given."""
    x = input_fn(batch) if input_fn is not None else batch_input(batch)
    xs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    if device is None:
        return xs
    return tuple(to_device(t, device) for t in xs)


def to_device(x: Any, device: torch.device | str) -> Any:
    """``x`` on ``device`` if it is a tensor, else ``x``."""
    return x.to(device) if isinstance(x, torch.Tensor) else x
