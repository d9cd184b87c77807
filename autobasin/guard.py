"""Entry checks that keep autobasin from handing back weights that compute something else.

* :func:`unwrap_model`: the model inside ``nn.DataParallel`` /
  ``DistributedDataParallel`` (``.module``) and ``torch.compile``'s
  ``OptimizedModule`` (``._orig_mod``). Those wrappers share their parameters
  with the wrapped model, so aligning, inferring or merging the inner model is
  the same computation without the wrapper's ``module.`` / ``_orig_mod.`` key
  prefixes, and fx can trace it (it cannot trace either wrapper).
* :func:`check_finite`: NaN or Inf in a weight makes every similarity NaN and
  every permutation arbitrary; refuse up front, naming the tensor.
* :func:`check_materialized`: a model built on the ``meta`` device has shapes
  but no values. It can be inspected (:func:`autobasin.infer_spec`), never
  matched or verified; refuse naming the tensor instead of failing deep inside
  torch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["unwrap_model", "check_finite", "check_materialized", "NonFiniteWeightError",
           "MetaTensorError", "eval_mode"]


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or Inf."""


class MetaTensorError(ValueError):
    """A tensor lives on the ``meta`` device (shapes, no values) where values are needed."""


def _wrapped(model: nn.Module) -> nn.Module | None:
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, parallel):
        return model.module
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - no dynamo in this build: nothing to unwrap
        OptimizedModule = ()  # type: ignore[assignment]  # noqa: N806
    if OptimizedModule and isinstance(model, OptimizedModule):
        return model._orig_mod
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model that ``model`` wraps: ``DataParallel(m)``, ``DistributedDataParallel(m)``
    and ``torch.compile(m)`` give ``m`` (nested wrappers are all removed); any
    other model is returned as it is. The inner model shares its parameters
    with the wrapper: nothing is copied."""
    for _ in range(8):
        inner = _wrapped(model)
        if inner is None:
            return model
        model = inner
    return model


def _bad_values(t: torch.Tensor) -> str | None:
    if not (t.is_floating_point() or t.is_complex()) or t.is_meta or t.numel() == 0:
        return None
    # a sum is finite only when every entry is (NaN and Inf propagate): one cheap
    # reduction settles the common case; only a non-finite sum (or an overflow of
    # huge finite values) pays for the entrywise test
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} Inf"] if inf else [])
    return " and ".join(parts)


def check_finite(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None,
                 where: str = "the state_dict", notes: Mapping[str, str] | None = None) -> None:
    """Raise :class:`NonFiniteWeightError` naming the first of ``names`` (default:
    all) whose floating values are not all finite, e.g. ``"model b's parameter
    '2.weight' holds 1 NaN (of 64 values)"``; ``notes[name]`` is added after the name."""
    for name in (tensors if names is None else names):
        t = tensors.get(name)
        if not isinstance(t, torch.Tensor):
            continue
        bad = _bad_values(t.detach())
        if bad:
            note = f" ({notes[name]})" if notes and name in notes else ""
            raise NonFiniteWeightError(
                f"{where} {name!r}{note} holds {bad} (of {t.numel()} values): a non-finite weight makes "
                f"every similarity NaN and the permutation meaningless; fix or reload the weights")


def check_model_finite(model: nn.Module, label: str) -> None:
    """:func:`check_finite` over ``model``'s parameters (every buffer may legitimately
    hold ``-inf``, e.g. an attention mask; the matchers check the buffers they use)."""
    check_finite(dict(model.named_parameters()), where=f"model {label}'s parameter")


def check_materialized(tensors: Mapping[str, torch.Tensor], what: str, where: str) -> None:
    """Raise :class:`MetaTensorError` if a tensor of ``tensors`` is on the meta device.

    ``what`` names the operation (``"weight matching"``), ``where`` the owner
    (``"model a"``)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_meta:
            raise MetaTensorError(
                f"{what} needs the weights' values, but {where}'s {name!r} is on the meta "
                f"device (shapes only, for inspection with infer_spec); materialise it first, "
                f"e.g. model.to_empty(device='cpu') and load_state_dict(...)")


def check_model_materialized(model: nn.Module, what: str, where: str) -> None:
    """:func:`check_materialized` over ``model``'s parameters and buffers."""
    check_materialized(dict(model.state_dict(keep_vars=True)), what, where)


def is_meta_model(model: nn.Module) -> bool:
    """True when the model has tensors and every one of them is on the meta device."""
    tensors = list(model.parameters()) + list(model.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


@contextmanager
def eval_mode(*models: nn.Module):
    """Run ``models`` in eval mode, then give every submodule back its own
    train/eval flag (a model in train mode with a frozen, eval-mode BatchNorm
    inside stays exactly so; ``model.train(was)`` would flip the BatchNorm)."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            try:
                model.eval()
            except NotImplementedError:  # torch.export's modules refuse eval(): set the flags
                for m in model.modules():
                    m.training = False
        yield
    finally:
        for m, training in modes.items():
            m.training = training
