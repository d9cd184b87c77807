"""Checks of the command line's arguments, and where its results go.

Every function raises :class:`UsageError` (exit code 2) naming the option when an
argument is unusable; :mod:`autobasin.cli` parses, calls these and prints.
"""
from __future__ import annotations

import ast
import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .hf import hf_folder, is_hf, save_state_folder


class UsageError(ValueError):
    """Bad arguments or unreadable inputs (exit code 2; so is a :class:`DataError`)."""


def model_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def symmetries_arg(text: str) -> tuple[str, ...]:
    """``--symmetries``: comma-separated kinds (or ``all``), checked."""
    import argparse
    from .spec import symmetry_kinds
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    try:
        symmetry_kinds(kinds)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(kinds)


def parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         "CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} {p}: no such file")
    if not p.is_file():
        raise UsageError(f"{what} {p} is not a file")
    return p


def output_path(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {p}: cannot write to {parent}")
    return p


def checkpoint_path(args, path: str | None, what: str) -> Path:
    """A checkpoint file, or for ``hf:`` a model folder (``--a`` defaults to MODEL's)."""
    if is_hf(args.model):
        return hf_folder(path or args.model)
    if path is None:
        raise UsageError(f"{what} is required")
    return existing_file(path, what)


def save_result(args, out: Path, model: nn.Module, sd, like, metadata: dict) -> None:
    """``sd`` to OUT: a model folder for ``hf:`` (tokenizer files copied from ``like``)."""
    from .io import save_state_dict
    if is_hf(args.model):
        save_state_folder(model, sd, out, like=like, progress=not args.quiet)
    else:
        save_state_dict(sd, out, metadata=metadata)
