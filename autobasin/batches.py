"""Plumbing for batches: where a batch's model input and target are, and where a
model lives. Every layer above (matching, REPAIR, barriers, calibration, the CLI)
reads batches through these functions, so a new batch layout is taught here once.

A dict batch whose keys name parameters of the model's ``forward`` (``{"input_ids":
..., "attention_mask": ...}``) is passed by name (:func:`batch_inputs`,
:func:`run_batch`). Its loss, when the user gives none (:func:`default_loss`,
:func:`score_batch`): next-token cross-entropy for a causal LM batch (``input_ids``,
no target), the labelled tokens' cross-entropy for a masked LM batch (``labels``),
else cross-entropy against the target."""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import ModelInputs, as_inputs

_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "img", "pixel_values")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")
IGNORE_INDEX = -100  # the label of a token that is not scored (transformers' convention)


class DataError(ValueError):
    """DATA names nothing usable, or a model cannot run on its batches or on the example
    inputs (the command line's exit code 2). Re-exported by :mod:`autobasin.data`."""


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
        for key in _TARGET_KEYS:
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
            data = [_inputs_only(b) for b in itertools.islice(data, limit)]
        self.data, self.limit = data, limit

    def __iter__(self):
        for batch in itertools.islice(self.data, self.limit):
            yield _inputs_only(batch)


def _inputs_only(batch: Any) -> Any:
    """The input part of a batch: a dict batch less its target keys (it may hold
    keyword inputs, which :func:`run_batch` passes by name), else :func:`batch_input`."""
    if isinstance(batch, dict) and not any(k in batch for k in _INPUT_KEYS):
        kept = {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
        if kept:
            return kept
    return batch_input(batch)


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


# ------------------------------------------------------------ keyword inputs
def forward_parameters(model: nn.Module) -> set[str]:
    """The parameter names of ``model.forward`` (empty when it has no signature)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def keyword_inputs(batch: dict, model: nn.Module | None = None) -> dict:
    """The keyword inputs of a dict batch: its entries whose keys name parameters of
    ``model.forward`` (``{"input_ids": ..., "attention_mask": ...}`` for a Hugging
    Face model), target keys (``labels``, ``target``, ...) left out. Without a model,
    a batch with ``input_ids`` gives its non-target entries. ``{}`` when there are
    none: the batch's input is then positional (:func:`batch_input`)."""
    if model is None:
        if "input_ids" not in batch:
            return {}
        return {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
    names = forward_parameters(model)
    return {k: v for k, v in batch.items() if k in names and k not in _TARGET_KEYS}


def batch_inputs(batch: Any, input_fn: Callable | None = None,
                 device: torch.device | str | None = None,
                 model: nn.Module | None = None) -> ModelInputs:
    """What ``model`` is called with for one batch, as :class:`ModelInputs`.

    ``input_fn(batch)`` when given (a tensor, a tuple of positional inputs, a dict of
    keyword inputs or a ModelInputs); else a dict batch's :func:`keyword_inputs`
    when it has any, else :func:`batch_input` as the one positional input. Given the
    model, a forward that takes ``use_cache`` gets ``use_cache=False`` (see
    :func:`autobasin.inputs.as_inputs`). Tensors are moved to ``device`` when given.
    """
    if input_fn is not None:
        x = input_fn(batch)
        inputs = as_inputs(tuple(x) if isinstance(x, list) else x, model)
    elif isinstance(batch, dict) and keyword_inputs(batch, model):
        inputs = as_inputs(keyword_inputs(batch, model), model)
    else:
        inputs = as_inputs((batch_input(batch),), model)
    return inputs.to(device) if device is not None else inputs


def run_batch(model: nn.Module, batch: Any, device: torch.device | str | None = None) -> Any:
    """``model``'s output on one batch (:func:`batch_inputs`, moved to ``device``,
    default the model's)."""
    device = device if device is not None else model_device(model)
    return batch_inputs(batch, device=device, model=model).call(model)


# ------------------------------------------------------------ default losses
def lm_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``ModelOutput`` / dataclass with
    ``.logits``, a dict with ``"logits"``, or a tuple whose first element is them."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        if "logits" in output.keys():
            return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def causal_lm_loss(output: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM: the logits at positions
    0..T-2 predict ``input_ids`` at 1..T-1. ``output`` is a ``ModelOutput`` with
    ``.logits``, a dict, or the logits tensor ``(B, T, V)``; computed in float32."""
    logits = lm_logits(output)
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape[:2]:
        raise ValueError(f"causal LM logits must be (B, T, V) matching input_ids "
                         f"{tuple(input_ids.shape)}; got {tuple(logits.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError("a causal LM loss needs windows of at least 2 tokens")
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           input_ids[:, 1:].reshape(-1).to(logits.device))


def token_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of per-token ``labels`` (``-100`` not scored) from the
    output's logits: the loss a Hugging Face masked LM computes from ``labels``."""
    logits = lm_logits(output).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           labels.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)


def is_lm_batch(batch: Any) -> bool:
    """A causal LM batch: a dict with ``input_ids`` and no target or labels."""
    return isinstance(batch, dict) and "input_ids" in batch and \
        not any(k in batch for k in _TARGET_KEYS)


def is_token_batch(batch: Any, output: Any = None) -> bool:
    """A dict batch with ``input_ids`` and per-token ``labels`` (a masked LM batch)."""
    if not (isinstance(batch, dict) and "input_ids" in batch and "labels" in batch):
        return False
    labels = batch["labels"]
    return isinstance(labels, torch.Tensor) and labels.shape == batch["input_ids"].shape


def default_loss(output: Any, batch: Any) -> torch.Tensor:
    """The loss of a model ``output`` on ``batch`` when the user gave none:
    :func:`causal_lm_loss` for a causal LM batch (:func:`is_lm_batch`),
    :func:`token_loss` for a masked LM batch (``input_ids`` and per-token
    ``labels``), else ``F.cross_entropy(logits, target)`` (:func:`batch_target`)."""
    if is_lm_batch(batch):
        return causal_lm_loss(output, batch["input_ids"])
    if is_token_batch(batch):
        return token_loss(output, batch["labels"])
    logits = lm_logits(output)
    return F.cross_entropy(logits, batch_target(batch).to(logits.device))


def default_loss_fns(batch: Any) -> tuple[Callable, Callable] | None:
    """``(target_fn, loss_fn)`` for a matcher that scores ``loss_fn(output,
    target_fn(batch))`` (STE) when ``batch`` is a causal or masked LM batch;
    None for other batches (the matcher's own defaults apply)."""
    if is_lm_batch(batch):
        return (lambda b: b["input_ids"]), causal_lm_loss
    if is_token_batch(batch):
        return (lambda b: b["labels"]), token_loss
    return None


def score_batch(output: Any, batch: Any, loss_fn: Callable | None = None
                ) -> tuple[float, int, int]:
    """``(summed loss, correct predictions, count)`` of one batch, so that losses
    average over samples (classification: ``count`` = batch size, accuracy of
    ``logits.argmax(-1)``) or over scored tokens (LM batches: next tokens for a
    causal LM, labelled tokens for a masked LM). ``loss_fn(logits, target)``
    replaces the default loss of a batch with a target."""
    logits = lm_logits(output)
    if loss_fn is None and is_lm_batch(batch):
        ids = batch["input_ids"].to(logits.device)
        n = ids[:, 1:].numel()
        correct = int((logits[:, :-1].argmax(-1) == ids[:, 1:]).sum())
        return float(causal_lm_loss(logits, ids)) * n, correct, n
    if loss_fn is None and is_token_batch(batch):
        labels = batch["labels"].to(logits.device)
        scored = labels != IGNORE_INDEX
        n = int(scored.sum())
        correct = int(((logits.argmax(-1) == labels) & scored).sum())
        return float(token_loss(logits, labels)) * n, correct, n
    y = batch_target(batch).to(logits.device)
    n = y.shape[0]
    loss = (loss_fn or F.cross_entropy)(logits, y)
    return float(loss) * n, int((logits.argmax(-1) == y).sum()), n
