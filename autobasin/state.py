"""Plumbing for state dicts: compare, interpolate, average, measure and cast them.

Entries are mixed in float32 (float64 when the entry is float64) and cast back;
integer buffers are not mixed. Every result keeps the ``_metadata`` of the state
dict it was made from (see :func:`with_metadata`)."""
from __future__ import annotations

import collections
import copy
from typing import Mapping

import torch

StateDict = Mapping[str, torch.Tensor]


def with_metadata(out: dict, source: Mapping) -> dict:
    """Give ``out`` the ``_metadata`` of the state dict it was made from.

    ``nn.Module.state_dict()`` records each module's version there, and some
    modules' ``_load_from_state_dict`` need it (torchvision's MNASNet refuses a
    state dict without it). Returns ``out``.
    """
    meta = getattr(source, "_metadata", None)
    if meta is None:
        return out
    out = collections.OrderedDict(out)  # a plain dict cannot carry attributes
    out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
    return out


def state_dict_mismatch(sd_a: StateDict, sd_b: StateDict, dtypes: bool = False) -> str | None:
    """The first difference in keys, shapes (and dtypes) of two state dicts,
    as a sentence naming the key, or None when they match."""
    for key in sd_a:
        if key not in sd_b:
            return f"{key!r} is in a's state_dict but missing from b's"
    for key in sd_b:
        if key not in sd_a:
            return f"{key!r} is in b's state_dict but missing from a's"
    for key, ta in sd_a.items():
        tb = sd_b[key]
        if not (isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor)):
            continue
        if ta.shape != tb.shape:
            return f"{key!r} has shape {tuple(ta.shape)} in a but {tuple(tb.shape)} in b"
        if dtypes and ta.dtype != tb.dtype:
            return f"{key!r} has dtype {ta.dtype} in a but {tb.dtype} in b"
    return None


def check_compatible(sd_a: StateDict, sd_b: StateDict) -> None:
    problem = state_dict_mismatch(sd_a, sd_b)
    if problem:
        raise ValueError(problem)


def is_interpolable(t: torch.Tensor) -> bool:
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
    check_compatible(sd_a, sd_b)
    out: dict[str, torch.Tensor] = {}
    for key, ta in sd_a.items():
        tb = sd_b[key]
        if isinstance(ta, torch.Tensor) and is_interpolable(ta):
            out[key] = _lerp(ta, tb, float(lam))
        elif isinstance(ta, torch.Tensor):
            out[key] = ta.detach().clone()
        else:
            out[key] = copy.deepcopy(ta)
    return with_metadata(out, sd_a)


def average(state_dicts: list[StateDict], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of floating entries (computed in float32/64, cast back);
    integer buffers such as ``num_batches_tracked`` are taken from the first."""
    return with_metadata({key: average_entry(state_dicts, weights, key) for key in state_dicts[0]},
                         state_dicts[0])


def average_entry(state_dicts: list[StateDict], weights: list[float], key: str):
    """One entry of :func:`average` (to write a mean one tensor at a time)."""
    first = state_dicts[0][key]
    if not (isinstance(first, torch.Tensor) and is_interpolable(first)):
        return first
    wide = torch.float64 if first.dtype == torch.float64 else torch.float32
    if first.is_complex():
        wide = torch.complex128 if first.dtype == torch.complex128 else torch.complex64
    acc = torch.zeros(first.shape, dtype=wide, device=first.device)
    for sd, w in zip(state_dicts, weights):
        acc += w * sd[key].detach().to(first.device, wide)
    return acc.to(first.dtype)


def state_dict_distance(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]
                        ) -> float:
    """The L2 distance between two state dicts over ``sd_a``'s floating-point tensors
    (computed in float64)."""
    total = 0.0
    for k, ta in sd_a.items():
        if ta.is_floating_point():
            total += float((ta.double() - sd_b[k].double()).pow(2).sum())
    return total ** 0.5


def cast_like(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``state_dict``'s tensors, floating ones in the dtype of the
    same key in ``reference`` (a checkpoint as stored) where it has that key."""
    return {k: (v.detach().cpu().to(reference[k].dtype)
                if k in reference and v.is_floating_point() else v.detach().cpu())
            for k, v in state_dict.items()}
