"""Align checkpoint files that do not fit in memory together.

:func:`align_files` is :func:`~autobasin.auto_rebasin` with weight matching for
two checkpoint files, holding no copy of either model: both are memory-mapped
(:func:`~autobasin.io.load_state_dict`), so their pages are the operating
system's file cache, which it reads when needed and drops under memory
pressure; weight matching gathers what each group needs (its extra memory is
measured in ``docs/scale.md``); the aligned checkpoint is written one tensor at
a time (:func:`~autobasin.io.save_safetensors_streaming`); and one module is
used throughout, taking A's, B's and then the aligned tensors in turn
(``load_state_dict(assign=True)``) to infer the spec and to verify.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .guard import eval_mode
from .inputs import as_inputs, select_outputs
from .io import load_into, load_state_dict, save_perms, save_safetensors_streaming
from .match.weight import weight_matching
from .match.result import Matching
from .permute import EquivalenceError, permuted_entries, relative_error
from .spec import PermutationSpec, SpecError
from .state import average_entry

__all__ = ["align_files", "AlignedFiles", "merge_files", "MergedFiles"]


@dataclass
class AlignedFiles:
    """What :func:`align_files` wrote and measured."""

    path: Path
    perms: dict[str, torch.Tensor]
    spec: PermutationSpec
    matching: Matching
    verify_error: float | None = None
    seconds: float = 0.0
    perms_path: Path | None = None
    stats: dict = field(default_factory=dict)


def align_files(model: nn.Module, a: str | os.PathLike, b: str | os.PathLike,
                out: str | os.PathLike, example_inputs=None, *, spec: PermutationSpec | None = None,
                perms_out: str | os.PathLike | None = None, seed: int = 0, max_iter: int = 100,
                tol: float = 0.0, progress: bool = True, verify: bool = True,
                metadata: Mapping[str, str] | None = None, cache_budget: float = 0.0,
                **matching_kwargs) -> AlignedFiles:
    """Write ``out``: checkpoint ``b`` permuted to line up with checkpoint ``a``.

    Args:
        model: the architecture. Its tensors are replaced by the files' (it ends
            holding the aligned ones, memory-mapped from ``out``); its own are
            dropped, so build it once, e.g. with random initialisation.
        a, b: checkpoint files (safetensors, or torch's zip format) of ``model``.
        out: the aligned checkpoint, a safetensors file (written atomically).
        example_inputs: inputs to infer the spec with (unless ``spec`` is given)
            and to verify with (a tensor, a tuple, or a dict of keyword inputs).
        perms_out: also write the permutations there (:func:`~autobasin.io.save_perms`).
        seed, max_iter, tol, progress, **matching_kwargs: for
            :func:`~autobasin.match.weight.weight_matching`.
        cache_budget: weight matching's similarities kept between sweeps, as a share
            of the two checkpoints' bytes; 0 (the default here) recomputes them, so
            its extra memory is one group's similarity and one tensor's rows at a time
            (ViT-L/16: 0.16 GB; 0.25, weight matching's own default, took 1.05 GB).
        verify: check that the aligned checkpoint computes what ``b`` computes on
            ``example_inputs`` (relative error at most 1e-4); if not, ``out`` is
            removed and :class:`~autobasin.permute.EquivalenceError` raised. Half
            precision checkpoints are run for this on a float32 copy of the model
            (one at a time: the only copy this makes). There is no float64
            re-check (it would copy the model); where float32 rounding alone
            exceeds 1e-4, use :func:`~autobasin.auto_rebasin`. The example inputs
            are cast to the checkpoints' floating dtype to infer the spec.

    Raises :class:`~autobasin.io.CheckpointMismatchError` naming the file when a
    checkpoint does not fit ``model``, and :class:`SpecError` when the two differ.
    """
    start = time.perf_counter()
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ValueError(f"align_files writes safetensors; name the output *.safetensors, not {out}")
    sd_a, sd_b = load_state_dict(a), load_state_dict(b)
    for key, t in sd_a.items():
        if key in sd_b and (sd_b[key].shape != t.shape or sd_b[key].dtype != t.dtype):
            raise SpecError(f"{key!r} is {tuple(t.shape)} {t.dtype} in {a} but "
                            f"{tuple(sd_b[key].shape)} {sd_b[key].dtype} in {b}")
    load_into(model, sd_a, source=a, assign=True)
    model.eval()
    if example_inputs is not None:  # inputs in the checkpoints' floating dtype (bf16 runs as bf16)
        example_inputs = as_inputs(example_inputs, model).to(dtype=_floating_dtype(model))
    if spec is None:
        from .infer import infer_spec
        spec = infer_spec(model, example_inputs)
    matching = weight_matching(spec, sd_a, sd_b, max_iter=max_iter, seed=seed, tol=tol,
                               progress=progress, cache_budget=cache_budget, **matching_kwargs)
    perms = {k: torch.as_tensor(p).long().cpu() for k, p in matching.items()}
    meta = {"autobasin": "aligned", "method": "weight", "reference": str(a), "source": str(b),
            **(metadata or {})}
    save_safetensors_streaming(sd_b, permuted_entries(spec, perms, sd_b), out, metadata=meta)
    result = AlignedFiles(path=out, perms=perms, spec=spec, matching=matching)
    if perms_out is not None:
        result.perms_path = save_perms(perms, perms_out, metadata={"method": "weight"})
    if verify and example_inputs is not None:
        load_into(model, sd_b, source=b, assign=True)
        err = _relative_error_after_swap(model, example_inputs, load_state_dict(out), out,
                                         spec.outputs)
        result.verify_error = err
        if not err <= 1e-4:
            out.unlink(missing_ok=True)
            raise EquivalenceError(
                f"the aligned checkpoint computes something else than {b}: relative error "
                f"{err:.3g} > 1e-4; the permutation spec does not fit this model (check it "
                f"with autobasin.check_equivalence); {out} was removed")
    else:
        if verify:
            warnings.warn(f"align_files: no example inputs, so {out} was not verified; pass "
                          f"example_inputs=... to check it", stacklevel=2)
        load_into(model, load_state_dict(out), source=out, assign=True)
    result.seconds = time.perf_counter() - start
    result.stats = {**matching.as_dict(), "seconds": result.seconds,
                    **({"verify_error": result.verify_error} if result.verify_error is not None else {})}
    return result


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _relative_error_after_swap(model: nn.Module, example_inputs, aligned: Mapping[str, torch.Tensor],
                               source, outputs) -> float:
    """The relative error of ``model``'s outputs after it takes ``aligned`` against
    before (one module, so no second copy of the model). Half-precision models
    are run on a float32 copy, one at a time (a permutation changes the order of
    sums, which half precision rounds by about 1e-3), as auto_rebasin judges them."""
    low = any(t.is_floating_point() and t.element_size() < 4 for t in model.state_dict().values())
    inputs = as_inputs(example_inputs, model).to(dtype=torch.float32 if low else None)

    def run() -> object:
        m = copy.deepcopy(model).float() if low else model
        with torch.no_grad(), eval_mode(m):
            return select_outputs(inputs.call_seeded(m), outputs)
    before = run()
    load_into(model, aligned, source=source, assign=True)
    return relative_error(before, run())


@dataclass
class MergedFiles:
    """What :func:`merge_files` wrote and measured."""

    path: Path
    perms: list[dict[str, torch.Tensor]]       # each other checkpoint's, onto the first
    spec: PermutationSpec
    verify_errors: list[float] = field(default_factory=list)
    seconds: float = 0.0


def merge_files(model: nn.Module, checkpoints, out: str | os.PathLike, example_inputs=None, *,
                spec: PermutationSpec | None = None, seed: int = 0, max_iter: int = 100,
                tol: float = 0.0, progress: bool = True, verify: bool = True,
                metadata: Mapping[str, str] | None = None, **matching_kwargs) -> MergedFiles:
    """Write ``out``: the average of ``checkpoints`` after aligning each to the first,
    holding none of them (the memory of :func:`align_files`).

    Every other checkpoint is aligned to the first by :func:`align_files` into a
    temporary file beside ``out`` (verified there: it computes what its source
    computes), then the first and the aligned files are averaged one tensor at a
    time (memory-mapped in, streamed out; :func:`autobasin.state.average`'s rules:
    float entries in float32 or wider, written in the first checkpoint's dtypes;
    integer entries such as ``num_batches_tracked`` taken from the first). The
    temporary files are removed.

    This aligns to one reference (for two checkpoints, what MergeMany does); the
    in-memory :func:`~autobasin.merge_many` iterates over references, and can
    reset BatchNorm statistics or REPAIR on data, which this does not.
    """
    start = time.perf_counter()
    paths = [Path(p).expanduser() for p in checkpoints]
    if len(paths) < 2:
        raise ValueError(f"merge_files needs at least 2 checkpoints, got {len(paths)}")
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ValueError(f"merge_files writes safetensors; name the output *.safetensors, not {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        steps = []
        for i, path in enumerate(paths[1:], start=1):
            steps.append(align_files(model, paths[0], path, Path(tmp) / f"{i}.safetensors",
                                     example_inputs, spec=spec, seed=seed, max_iter=max_iter,
                                     tol=tol, progress=progress, verify=verify, **matching_kwargs))
            spec = steps[-1].spec  # inferred once
        sds = [load_state_dict(p) for p in (paths[0], *(s.path for s in steps))]
        weights = [1 / len(sds)] * len(sds)
        meta = {"autobasin": "merged", "sources": ",".join(str(p) for p in paths), **(metadata or {})}
        save_safetensors_streaming(sds[0], lambda key: average_entry(sds, weights, key), out,
                                   metadata=meta)
        load_into(model, load_state_dict(out), source=out, assign=True)  # let go of the temporary files
    return MergedFiles(path=out, perms=[s.perms for s in steps], spec=spec,
                       verify_errors=[s.verify_error for s in steps if s.verify_error is not None],
                       seconds=time.perf_counter() - start)
