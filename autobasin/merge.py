"""Merge models in weight space: linear interpolation."""
from __future__ import annotations

import copy
from typing import Mapping, TypeVar, overload

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)


def _check_compatible(sd_a: StateDict, sd_b: StateDict) -> None:
    for key in sd_a:
        if key not in sd_b:
            raise ValueError(f"key {key!r} is in a but not in b")
    for key in sd_b:
        if key not in sd_a:
            raise ValueError(f"key {key!r} is in b but not in a")
    for key, ta in sd_a.items():
        tb = sd_b[key]
        if isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor) and ta.shape != tb.shape:
            raise ValueError(f"{key!r} has shape {tuple(ta.shape)} in a but {tuple(tb.shape)} in b")


def _is_interpolable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _lerp(ta: torch.Tensor, tb: torch.Tensor, lam: float) -> torch.Tensor:
    wide = torch.float64 if ta.dtype == torch.float64 else torch.float32
    if ta.is_complex():
        wide = torch.complex128 if ta.dtype == torch.complex128 else torch.complex64
    x = ta.detach().to(wide)
    y = tb.detach().to(ta.device, wide)
    return ((1.0 - lam) * x + lam * y).to(ta.dtype)


def interpolate_state_dicts(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """``(1 - lam) * a + lam * b`` entry by entry; see :func:`interpolate`."""
    _check_compatible(sd_a, sd_b)
    out: dict[str, torch.Tensor] = {}
    for key, ta in sd_a.items():
        tb = sd_b[key]
        if isinstance(ta, torch.Tensor) and _is_interpolable(ta):
            out[key] = _lerp(ta, tb, float(lam))
        elif isinstance(ta, torch.Tensor):
            out[key] = ta.detach().clone()
        else:
            out[key] = copy.deepcopy(ta)
    return out


@overload
def interpolate(a: M, b: nn.Module, lam: float) -> M: ...
@overload
def interpolate(a: StateDict, b: StateDict, lam: float) -> dict[str, torch.Tensor]: ...


def interpolate(a, b, lam: float):
    """The point ``(1 - lam) * a + lam * b`` on the line between two models.

    ``a`` and ``b`` are both ``nn.Module`` (returns a deep copy of ``a`` holding the
    interpolated state) or both state dicts (returns a new dict). ``lam = 0``
    gives ``a``, ``lam = 1`` gives ``b``; values outside [0, 1] extrapolate.

    Floating (and complex) tensors are mixed in float32, or float64 when ``a``'s
    tensor is float64, and cast back to ``a``'s dtype, on ``a``'s device.
    Integer and bool tensors (e.g. BatchNorm's ``num_batches_tracked``) cannot be
    mixed and take ``a``'s value. Keys and shapes must agree: a ``ValueError``
    names the first key that differs. Neither input is modified.
    """
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        state = interpolate_state_dicts(a.state_dict(), b.state_dict(), lam)
        merged = copy.deepcopy(a)
        merged.load_state_dict(state)
        return merged
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return interpolate_state_dicts(a, b, lam)
    raise TypeError(f"interpolate needs two nn.Modules or two state dicts, "
                    f"got {type(a).__name__} and {type(b).__name__}")
