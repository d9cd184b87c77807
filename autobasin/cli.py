"""The ``autobasin`` command line.

::

    autobasin inspect MODEL [--input-size C H W] [--json SPEC.json] [--plot SPEC.png]
    autobasin align   MODEL --a A --b B --out OUT [--method weight] [--data DATA] [--perms P]
    autobasin merge   MODEL CKPT CKPT ... --out OUT [--spec SPEC.json] [--data DATA --reset-bn | --repair repair]
    autobasin barrier MODEL --a A --b B --data DATA [--plot FILE.png] [--reset-bn | --repair repair] [--lambdas 25]
    autobasin demo    [--out DIR] [--quick]

MODEL is ``timm:NAME``, ``torchvision:NAME`` or ``path/to/file.py:factory``
(:func:`autobasin.models.build_model`). Checkpoints are ``.safetensors`` or
PyTorch files (:mod:`autobasin.io`). DATA is an image folder, a folder holding
the MNIST IDX test files, ``digits`` (scikit-learn's bundled digits) or
``module:function`` / ``file.py:function`` returning a DataLoader.
MODEL ``hf:DIR`` is a ``save_pretrained`` folder (:mod:`autobasin.hf`): then
checkpoints and OUT are such folders (``--a`` defaults to DIR) and DATA may be
a text file or folder (:mod:`autobasin.text`).

Under ``torchrun --nproc-per-node N -m autobasin ...`` each rank joins the
process group (gloo; NCCL with ``--device cuda``), keeps one batch of DATA in N
(:mod:`autobasin.distributed`), and rank 0 alone prints and writes files; the
results equal one process given every batch.

Every input is checked (files exist, checkpoints load into the architecture,
data yields batches the model accepts) before any long computation. Exit
codes (:data:`EXIT_CODES_HELP`, shown by ``autobasin --help``): 0 success,
2 usage or input error, 3 checkpoint/architecture mismatch, 4 verification
failed (the aligned model computes something else), 1 unexpected error, 130
interrupted. Expected errors print one line ``autobasin: error: ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .distributed import is_main, shard, world
from .data import (DataError, DataSource, check_source, example_of, make_example_inputs,
                   resolve_data)
from .cliargs import (UsageError, checkpoint_path, existing_file, model_kwargs,
                      output_path, parse_device, save_result, seed_everything, symmetries_arg)
from .hf import hf_folder, is_hf, load_folder
from .spec import format_coverage

PROG = "autobasin"

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_MISMATCH, EXIT_VERIFY = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT (128 + 2)

EXIT_CODES_HELP = """exit codes:
  0    success
  1    unexpected error (with a traceback), or a model torch.fx cannot trace
  2    usage or input error: bad option, missing or corrupt file, unknown model,
       unreadable DATA
  3    a checkpoint does not fit MODEL (missing/unexpected keys, shapes), or a
       --spec names tensors MODEL does not have
  4    verification failed: the aligned (or merged-in) model computes something
       else than its checkpoint
  130  interrupted (Ctrl-C); no output file is left half-written
"""


# ---------------------------------------------------------------------- logging
class _Log:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def _out(msg: str = "") -> None:
    if not is_main():  # under torchrun: one report, from rank 0
        return
    try:
        print(msg, flush=True)
    except BrokenPipeError:  # the reader stopped (`| head`): finish, write the files
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def _stage(log: _Log, what: str):
    """Progress on stderr: ``what ...`` now, ``what: done in N s`` after (with the notes
    the block appends to the list it is given)."""
    log(f"{what} ...")
    t0, notes = time.perf_counter(), []
    yield notes
    log(f"{what}: done in {time.perf_counter() - t0:.1f} s" + "".join(f"; {n}" for n in notes))


# ----------------------------------------------------------------------- models
def _build(args, log: _Log) -> nn.Module:
    from .models import build_model
    if is_hf(args.model) and (args.num_classes is not None or args.model_kwargs):
        raise UsageError("hf: models are built from their folder's config.json; drop "
                         "--num-classes / --model-kwargs")
    with _stage(log, f"{'loading' if is_hf(args.model) else 'building'} {args.model}") as notes:
        model = load_folder(args.model, not args.quiet) if is_hf(args.model) else \
            build_model(args.model, num_classes=args.num_classes, **model_kwargs(args.model_kwargs))
        notes.append(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
                     "parameters")
    return model


def _load_checkpoint(model: nn.Module, path: Path, args, log: _Log, in_place: bool = False):
    from .io import load_checkpoint
    log(f"loading {path}")
    if is_hf(args.model):  # a model folder: its own config and weights
        out = model if in_place and path == hf_folder(args.model) else \
            load_folder(path, not args.quiet)
        return out, out.state_dict()
    return load_checkpoint(model, path, args.checkpoint_key, in_place=in_place)


def _write(log: _Log, path: Path, write) -> None:
    """``write(tmp)`` atomically to ``path``, with a progress line before and the result after."""
    from .io import atomic_write
    if not is_main():  # under torchrun: rank 0 writes the files
        return
    log(f"writing {path}")
    atomic_write(path, write)
    _out(f"wrote {path}")


# -------------------------------------------------------------------- commands
def cmd_inspect(args, log: _Log) -> int:
    from .infer import infer_spec
    from .permute import check_equivalence
    json_out = output_path(args.json, "--json") if args.json else None
    plot_out = output_path(args.plot, "--plot") if args.plot else None
    model = _build(args, log)
    example = make_example_inputs(model, args.input_size, seq_len=args.seq_len)
    with _stage(log, f"inferring the spec of {args.model}") as notes:
        spec = infer_spec(model, example)
        notes.append(f"{len(spec.groups)} groups")
    coverage = format_coverage(spec.coverage())
    table = str(spec).partition("\n")[2]  # its first line shows the coverage another way
    _out(f"PermutationSpec: {len(spec.groups)} groups, coverage {coverage} of hidden parameter "
         f"axes\n{table}")
    n_params = sum(1 for i in spec.tensors.values() if i.is_parameter)
    touched = set(spec.members_by_param())
    fixed = [n for n, i in spec.tensors.items()
             if i.is_parameter and i.floating and n not in touched]
    _out(f"\ncoverage: {coverage} of hidden parameter axes are permuted; "
         f"{len(spec.groups)} groups over {n_params} parameters "
         f"({len(fixed)} fixed{': ' + ', '.join(fixed[:6]) if fixed else ''}"
         f"{', ...' if len(fixed) > 6 else ''})")
    for title, rows in (("blocked ops", spec.blocked_ops()),
                        ("hidden axes left fixed", spec.fixed_axes())):
        if not rows:
            _out(f"{title}: none")
            continue
        shown = rows if args.all else rows[:20]
        _out(f"{title} ({len(rows)}), where inference left axes unpermuted:" if title == "blocked ops"
             else f"{title} ({len(rows)}), and why:")
        for name, reason in shown:
            _out(f"  {name}: {reason}")
        if len(shown) < len(rows):
            _out(f"  ... {len(rows) - len(shown)} more (--all lists them)")
    if args.verify and spec.groups:
        from .testing import randomize_state_
        with _stage(log, "verifying the spec"):
            probe = randomize_state_(copy.deepcopy(model), seed=args.seed)
            err = check_equivalence(probe, spec, example, seed=args.seed)
        _out(f"verified: a random permutation of every group leaves the outputs unchanged "
             f"(relative error {err:.2e})")
    if json_out is not None:
        _write(log, json_out, lambda tmp: Path(tmp).write_text(spec.to_json()))
    if plot_out is not None:
        from .plots import plot_spec
        with _stage(log, f"drawing {plot_out}"):
            plot_spec(spec, plot_out, title=f"{args.model}: {len(spec.groups)} groups, "
                                            f"coverage {coverage}")
        _out(f"wrote {plot_out}")  # results go to stdout, as align, barrier and merge print theirs
    return EXIT_OK


def _resolve_data(args, model: nn.Module) -> DataSource:
    source = resolve_data(args.data, model, split=args.split, batch_size=args.batch_size,
                          workers=args.workers, seed=args.seed, input_size=args.input_size,
                          seq_len=args.seq_len)
    if world() is None:
        return source
    # under torchrun every rank reads DATA and keeps every world-size-th batch: its shard
    r, size = world()
    eval_shard = shard(source.eval)
    train_shard = eval_shard if source.train is source.eval else shard(source.train)
    part = f" (rank {r} of {size}: one batch in {size})"
    return dataclasses.replace(source, eval=eval_shard, train=train_shard,
                               description=source.description + part,
                               train_description=(source.train_description + part
                                                  if source.train_description else ""))


def _join_process_group(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join the default process
    group: gloo, or NCCL when --device is CUDA (each rank on its LOCAL_RANK's GPU)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not dist.is_available() or dist.is_initialized():
        return False
    device = str(getattr(args, "device", None) or "cpu")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _load_spec(path: str | None):
    from .io import load_spec
    return load_spec(existing_file(path, "--spec")) if path else None


def _check_spec_fits(spec, args, model: nn.Module) -> None:
    """SpecError naming the group and tensor when ``--spec`` does not fit MODEL."""
    from .spec import SpecError
    try:
        spec.check_fits(model.state_dict(), label=args.model)
    except SpecError as e:
        raise SpecError(f"--spec {args.spec}: {e}") from None


def _align(args, log: _Log, model_a: nn.Module, model_b: nn.Module, example,
           data: DataSource | None, device: torch.device, spec=None):
    from .api import auto_rebasin
    t0 = time.perf_counter()
    log(f"aligning B to A ({args.method} matching)")
    extra = {"tol": args.tol} if args.tol else {}
    result = auto_rebasin(model_a, model_b, example_inputs=example, method=args.method,
                          data=data.train if data is not None else None, seed=args.seed,
                          spec=spec, max_iter=args.max_iter, progress=not args.quiet,
                          device=device, symmetries=args.symmetries, **extra)
    return result, time.perf_counter() - t0


def _prepare_pair(args, log: _Log, need_data: bool, need_target: bool):
    """Check every input and load A and B; nothing long has run yet."""
    from .api import MATCHERS
    if args.method not in MATCHERS:
        raise UsageError(f"unknown --method {args.method!r}; available: {sorted(MATCHERS)}")
    if not 0 <= args.tol < math.inf:
        raise UsageError(f"--tol must be a finite number >= 0, got {args.tol}")
    if args.tol and args.method != "weight":
        raise UsageError(f"--tol applies to weight matching only, not --method {args.method}")
    path_a, path_b = checkpoint_path(args, args.a, "--a"), checkpoint_path(args, args.b, "--b")
    device = parse_device(args.device)
    spec = _load_spec(getattr(args, "spec", None))
    model = _build(args, log)
    model_b, raw_b = _load_checkpoint(model, path_b, args, log)
    model_a, _ = _load_checkpoint(model, path_a, args, log, in_place=True)
    data = None
    if need_data and not args.data:
        raise UsageError(f"--method {args.method} needs --data")
    if args.data:
        data = _resolve_data(args, model_a)
        # barrier evaluates on the chosen split; align only matches, on the training split
        log(f"data: {data.description}" if need_target else
            f"matching data: {data.matching_description}")
        example = example_of(check_source(model_a, data, f"DATA {args.data}", need_target))
    if args.input_size or not args.data:
        example = make_example_inputs(model_a, args.input_size, seq_len=args.seq_len)
    if spec is not None:  # a spec from another model fails here, not after the long part
        _check_spec_fits(spec, args, model_a)
    return model_a, model_b, raw_b, data, example, device, spec


def _lean_model(args, log: _Log, first: Path) -> tuple[nn.Module, object]:
    """MODEL built on the meta device (on the CPU when it has tensors checkpoints do
    not hold, non-persistent buffers), holding ``first``'s tensors memory-mapped, and
    its example inputs."""
    from .io import load_into, load_state_dict
    from .models import build_model
    kwargs = model_kwargs(args.model_kwargs)
    with _stage(log, f"building {args.model} on the meta device") as notes:
        with torch.device("meta"):
            model = build_model(args.model, num_classes=args.num_classes, **kwargs)
        state = set(model.state_dict())
        unsaved = [n for n, t in (*model.named_parameters(), *model.named_buffers())
                   if t.is_meta and n not in state]
        if unsaved:
            notes.append(f"{unsaved[0]!r} is not saved in checkpoints: built on the CPU")
            model = build_model(args.model, num_classes=args.num_classes, **kwargs)
    load_into(model, load_state_dict(first), source=first, assign=True)
    return model, make_example_inputs(model, args.input_size, seq_len=args.seq_len)


def _align_low_memory(args, log: _Log) -> int:
    """align --low-memory: :func:`autobasin.files.align_files`, the model built once."""
    from .files import align_files
    if is_hf(args.model) or args.method != "weight" or args.data:
        raise UsageError("--low-memory aligns checkpoint files of a built model (not hf: "
                         "folders) with --method weight, without --data")
    out = output_path(args.out, "--out")
    if out.suffix != ".safetensors":
        raise UsageError(f"--low-memory writes safetensors: name --out *.safetensors, not {out}")
    perms_out = output_path(args.perms, "--perms") if args.perms else \
        out.with_name(out.stem + ".perms.safetensors")
    path_a, path_b = checkpoint_path(args, args.a, "--a"), checkpoint_path(args, args.b, "--b")
    if args.checkpoint_key:
        raise UsageError("--low-memory reads whole-file state dicts; drop --checkpoint-key")
    spec = _load_spec(args.spec)
    model, example = _lean_model(args, log, path_a)
    log(f"aligning {path_b} to {path_a} (weight matching, memory-mapped)")
    t0 = time.perf_counter()
    result = align_files(model, path_a, path_b, out, example, spec=spec, perms_out=perms_out,
                         seed=args.seed, max_iter=args.max_iter, tol=args.tol,
                         progress=not args.quiet)
    seconds = time.perf_counter() - t0
    _out(f"spec: {len(result.spec.groups)} groups, "
         f"coverage {format_coverage(result.spec.coverage())}")
    _out(f"aligned with weight matching in {seconds:.2f} s, {result.matching.sweeps} sweeps "
         "(spec inference, matching, writing and verification)")
    _out(f"verified: aligned B computes what B computes (relative error "
         f"{result.verify_error:.2e})")
    _out(f"wrote {out}")
    _out(f"wrote {perms_out}")
    return EXIT_OK


def cmd_align(args, log: _Log) -> int:
    if getattr(args, "low_memory", False):
        return _align_low_memory(args, log)
    from .api import MATCHERS
    from .io import save_perms
    from .state import state_dict_distance
    from .permute import apply_permutation
    out = Path(args.out).expanduser() if is_hf(args.model) else output_path(args.out, "--out")
    perms_out = output_path(args.perms, "--perms") if args.perms else \
        out.with_name(out.stem + ".perms.safetensors")
    model_a, model_b, raw_b, data, example, device, spec = _prepare_pair(
        args, log, need_data=getattr(MATCHERS.get(args.method), "needs_data", False),
        need_target=False)
    result, seconds = _align(args, log, model_a, model_b, example, data, device, spec)
    # permute B's stored tensors, so the file keeps B's dtypes exactly
    aligned_sd = apply_permutation(result.spec, result.perms, raw_b)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    before, after = (state_dict_distance(sd_a, sd) for sd in (sd_b, result.state_dict))
    log(f"writing {out} and {perms_out}")
    if is_main():  # under torchrun: rank 0 writes the files
        save_result(args, out, model_b, aligned_sd, args.b, {"autobasin": "aligned", "method": args.method,
                                                       "reference": str(args.a), "source": str(args.b)})
        save_perms(result.perms, perms_out, metadata={"method": args.method})
    stats = result.stats
    _out(f"spec: {len(result.spec.groups)} groups, "
         f"coverage {format_coverage(result.spec.coverage())}")
    extra = f", {stats['sweeps']} sweeps" if stats.get("sweeps") else ""
    _out(f"aligned with {args.method} matching in {seconds:.2f} s{extra} "
         "(spec inference, matching and verification)")
    if "verify_error" in stats:
        _out(f"verified: aligned B computes what B computes (relative error "
             f"{stats['verify_error']:.2e})")
    else:
        _out("not verified: no example inputs to check that aligned B computes what B "
             "computes; pass --input-size")
    _out(f"L2 distance to A: B {before:.4f} -> aligned B {after:.4f}")
    _out(f"wrote {out}")
    _out(f"wrote {perms_out}")
    return EXIT_OK


def cmd_barrier(args, log: _Log) -> int:
    from .barrier import loss_barrier, plot_barrier
    from .demo import barrier_table
    plot_out = output_path(args.plot, "--plot") if args.plot else None
    json_out = output_path(args.json, "--json") if args.json else None
    if args.lambdas < 2:
        raise UsageError(f"--lambdas must be at least 2, got {args.lambdas}")
    model_a, model_b, _, data, example, device, spec = _prepare_pair(args, log, need_data=True,
                                                                     need_target=True)
    if args.reset_bn and not data.has_train_split:
        log("note: --reset-bn recomputes BatchNorm statistics on the evaluation data itself "
            "(DATA has no separate training split)")
    if args.reset_bn and args.repair:
        raise UsageError("--repair already recomputes BatchNorm statistics; drop --reset-bn")
    reset = data.train if args.reset_bn else None
    fix = dict(repair=args.repair, repair_data=data.train) if args.repair else {}
    log("naive interpolation")
    naive = loss_barrier(model_a, model_b, data.eval, lambdas=args.lambdas, reset_bn=reset,
                         device=device, progress=not args.quiet, **fix)
    result, seconds = _align(args, log, model_a, model_b, example, data, device, spec)
    log("aligned interpolation")
    aligned = loss_barrier(model_a, result.model, data.eval, lambdas=args.lambdas,
                           reset_bn=reset, device=device, progress=not args.quiet, **fix)
    label = f"{args.method} matching"
    how = {None: "", "repair": "; every point REPAIRed", "rescale": "; every point rescaled"}
    how = "; BatchNorm statistics reset" if args.reset_bn else how[args.repair]
    _out(f"data: {data.description}{how}")
    _out(barrier_table({"naive": (naive, 0.0), label: (aligned, seconds)}))
    if plot_out is not None:
        fig = plot_barrier({"naive": naive, label: aligned},
                           title=f"{args.model}: loss along the path A -> B")
        _write(log, plot_out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    if json_out is not None:
        text = json.dumps({"naive": asdict(naive), args.method: asdict(aligned),
                           "matching_seconds": seconds, "data": data.description}, indent=1)
        _write(log, json_out, lambda tmp: Path(tmp).write_text(text))
    return EXIT_OK


def _merge_low_memory(args, log: _Log) -> int:
    """merge --low-memory: :func:`autobasin.files.merge_files`, the model built once."""
    from .files import merge_files
    if is_hf(args.model) or args.method != "weight" or args.data or args.reset_bn or args.repair:
        raise UsageError("--low-memory merges checkpoint files of a built model (not hf: "
                         "folders) with --method weight, without --data / --reset-bn / --repair")
    out = output_path(args.out, "--out")
    if out.suffix != ".safetensors":
        raise UsageError(f"--low-memory writes safetensors: name --out *.safetensors, not {out}")
    if len(args.checkpoints) < 2:
        raise UsageError(f"merge needs at least 2 checkpoints, got {len(args.checkpoints)}")
    paths = [checkpoint_path(args, p, "checkpoint") for p in args.checkpoints]
    model, example = _lean_model(args, log, paths[0])
    log(f"merging {len(paths)} checkpoints onto {paths[0]} (weight matching, memory-mapped)")
    t0 = time.perf_counter()
    result = merge_files(model, paths, out, example, spec=_load_spec(args.spec), seed=args.seed,
                         progress=not args.quiet)
    _out(f"merged {len(paths)} checkpoints (each aligned to the first by weight matching) in "
         f"{time.perf_counter() - t0:.2f} s")
    _out(f"verified: every checkpoint, permuted as merged, computes what it computed (largest "
         f"relative error {max(result.verify_errors):.2e})")
    _out(f"wrote {out}")
    return EXIT_OK


def cmd_merge(args, log: _Log) -> int:
    if getattr(args, "low_memory", False):
        return _merge_low_memory(args, log)
    from .state import cast_like
    from .merge import merge_many
    out = Path(args.out).expanduser() if is_hf(args.model) else output_path(args.out, "--out")
    if len(args.checkpoints) < 2:
        raise UsageError(f"merge needs at least 2 checkpoints, got {len(args.checkpoints)}")
    paths = [checkpoint_path(args, p, "checkpoint") for p in args.checkpoints]
    if args.reset_bn and args.repair:
        raise UsageError("--repair already recomputes BatchNorm statistics; drop --reset-bn")
    repair = "reset_bn" if args.reset_bn else args.repair
    if repair and not args.data:
        raise UsageError(f"--{'reset-bn' if args.reset_bn else 'repair'} needs --data")
    if args.max_rounds < 1:
        raise UsageError(f"--max-rounds must be at least 1, got {args.max_rounds}")
    if args.method == "activation" and not args.data:
        raise UsageError("--method activation needs --data")
    device = parse_device(args.device)
    spec = _load_spec(args.spec)
    model = _build(args, log)
    loaded = [_load_checkpoint(model, p, args, log) for p in paths]
    models = [m for m, _ in loaded]
    if spec is not None:  # a spec from another model fails here, not after the long part
        _check_spec_fits(spec, args, models[0])
    data = None
    if args.data:
        data = _resolve_data(args, models[0])
        check_source(models[0], data, f"DATA {args.data}", need_target=False, split="train")
        if args.method == "activation" and not repair:
            repair = "reset_bn"  # merge_many recomputes BatchNorm statistics whenever it has data
            log("note: BatchNorm statistics of the merged model are recomputed on DATA")
        elif not repair:
            log("note: DATA is only used to repair the merged model; add --reset-bn or --repair")
    example = make_example_inputs(models[0], args.input_size, seq_len=args.seq_len)
    stats: dict = {}
    t0 = time.perf_counter()
    if device is not None:
        models = [m.to(device) for m in models]  # the loaded copies are ours to move
    # merge_many verifies each checkpoint, permuted as merged; it reports each stage to log
    with _stage(log, f"merging {len(models)} models ({args.method} matching)"):
        merged_model = merge_many(models, method=args.method, seed=args.seed, spec=spec,
                                  progress=log, example_inputs=example,
                                  symmetries=args.symmetries,
                                  max_rounds=args.max_rounds, stats=stats,
                                  data=data.train if repair else None, repair=repair)
    seconds = time.perf_counter() - t0
    sd = cast_like(merged_model.state_dict(), loaded[0][1])  # the first checkpoint's dtypes
    log(f"writing {out}")
    if is_main():  # under torchrun: rank 0 writes the file
        save_result(args, out, models[0], sd, paths[0],
                    {"autobasin": "merged", "sources": ",".join(str(p) for p in paths)})
    rounds = f", {stats['rounds']} rounds" if stats.get("rounds") else ""
    how = {None: "", "reset_bn": "; BatchNorm statistics reset",
           "repair": "; REPAIRed (channel mean and std)", "rescale": "; rescaled (channel std)"}
    _out(f"merged {len(models)} checkpoints (MergeMany, {args.method} matching{rounds}) in "
         f"{seconds:.2f} s{how[repair]}")
    if stats.get("verify_errors"):
        _out(f"verified: every checkpoint, permuted as aligned for the merge, computes what it "
             f"computed (largest relative error {max(stats['verify_errors']):.2e})")
    else:
        _out("not verified: no example inputs to check the aligned checkpoints; "
             "pass --input-size")
    _out(f"wrote {out}")
    return EXIT_OK


def cmd_demo(args, log: _Log) -> int:
    from .demo import main as demo_main
    demo_main(["--out", str(args.out), "--lambdas", str(args.lambdas)] + ["--quick"] * args.quick
              + (["--epochs", str(args.epochs)] if args.epochs is not None else []))
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .api import MATCHERS
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, mps, or auto (cuda when available; default)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or progress messages")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest "
                        "for small models on a busy machine)")

    model_opts = argparse.ArgumentParser(add_help=False)
    g = model_opts.add_argument_group("model options")
    g.add_argument("model", metavar="MODEL",
                   help="timm:NAME, torchvision:NAME, path/to/file.py:factory, or hf:DIR (a "
                        "save_pretrained folder: checkpoints and OUT are then such folders)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="number of classes of the classifier head (passed to the constructor)")
    g.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=[],
                   help="more constructor arguments, e.g. --model-kwargs drop_rate=0.1")
    g.add_argument("--input-size", type=int, nargs="+", metavar="N", default=None,
                   help="input shape without the batch dimension, e.g. 3 224 224 "
                        "(default: the model's pretrained_cfg, or a guess)")
    g.add_argument("--seq-len", type=int, default=64, metavar="T",
                   help="tokens per window of text DATA and of random example input_ids of "
                        "a language model (default 64)")

    ckpt_opts = argparse.ArgumentParser(add_help=False)
    g = ckpt_opts.add_argument_group("checkpoint options")
    g.add_argument("--checkpoint-key", default=None, metavar="KEY",
                   help="entry of the checkpoint that holds the weights, e.g. state_dict_ema "
                        "(default: state_dict, model, module, ... whichever is there)")

    data_opts = argparse.ArgumentParser(add_help=False)
    g = data_opts.add_argument_group("data options")
    g.add_argument("--split", choices=["train", "heldout"], default="heldout",
                   help="which part of DATA to evaluate on (default heldout)")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="batch size (default 128)")
    g.add_argument("-j", "--workers", type=int, default=0,
                   help="data loading worker processes (default 0: load in the main process)")

    data_help = ("an image folder (class subfolders; train/ and val/ subfolders are used "
                 "as splits), a folder holding the MNIST IDX files (t10k-images-idx3-ubyte.gz), "
                 "'digits' (scikit-learn's digits), or module:function / file.py:function "
                 "returning a DataLoader (called with split=... if it takes it); for hf: "
                 "models, a text file or folder (bytes, or the model folder's tokenizer; the "
                 "last files or a single file's last 10%% held out)")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Align and merge neural networks modulo permutation symmetry "
                               "(Git Re-Basin), for any PyTorch model.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub_kwargs = dict(epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.required = True

    p = sub.add_parser("inspect", **sub_kwargs, parents=[model_opts, common],
                       help="infer and show a model's permutation spec",
                       description="Infer which parameter axes can be permuted together, show "
                                   "the groups, coverage and blocked ops, and check the spec.")
    p.add_argument("--json", metavar="OUT.json", help="write the spec as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw the groups over the model's tensors")
    p.add_argument("--all", action="store_true", help="list every blocked op")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the check that random permutations leave the outputs unchanged")
    p.set_defaults(func=cmd_inspect)

    match_opts = argparse.ArgumentParser(add_help=False)
    g = match_opts.add_argument_group("matching options")
    g.add_argument("--method", default="weight", choices=sorted(MATCHERS), help="matching method")
    g.add_argument("--spec", metavar="SPEC.json",
                   help="use this spec (from inspect --json) instead of inferring one")
    g.add_argument("--symmetries", type=symmetries_arg, default=("permutation",),
                   metavar="KINDS",
                   help="kinds of symmetry to align with, comma-separated: permutation (default), "
                        "sign, scale, orthogonal, invertible, or all; groups whose ops admit "
                        "more than permutations are aligned by signed or scaled permutations, "
                        "orthogonal or invertible maps (weight matching); RoPE head dims by "
                        "rotations (and scales) of their frequency pairs")
    g.add_argument("--max-iter", type=int, default=100, help="most matching sweeps (default 100)")
    g.add_argument("--tol", type=float, default=0.0,
                   help="weight matching: stop after a sweep that raises the objective by at "
                        "most this fraction (default 0: until a sweep changes nothing)")
    p = sub.add_parser("align", **sub_kwargs,
                       parents=[model_opts, ckpt_opts, data_opts, match_opts, common],
                       help="permute checkpoint B to line up with checkpoint A",
                       description="Write B permuted to line up with A (it computes what B "
                                   "computes, in B's dtypes), and the permutations.")
    p.add_argument("--a", metavar="A", help="reference checkpoint (hf: default MODEL's folder)")
    p.add_argument("--b", required=True, metavar="B", help="checkpoint to permute")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="aligned B (.safetensors; .pt/.pth/.bin for torch.save; hf: a folder)")
    p.add_argument("--data", metavar="DATA", help="batches for data-based methods: " + data_help)
    p.add_argument("--perms", metavar="PERMS",
                   help="where to write the permutations (.safetensors or .json; default "
                        "OUT's name with .perms.safetensors)")
    p.add_argument("--low-memory", action="store_true",
                   help="weight matching on two checkpoints that need not fit in memory "
                        "together: both memory-mapped, OUT (.safetensors) written one tensor "
                        "at a time, the model built on the meta device where it can be "
                        "(autobasin.files.align_files)")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("merge", **sub_kwargs, parents=[model_opts, ckpt_opts, data_opts, common],
                       help="merge several checkpoints (MergeMany)",
                       description="Align and average several checkpoints of one architecture.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--out", required=True, metavar="OUT", help="merged checkpoint")
    p.add_argument("--data", metavar="DATA", help="batches for BatchNorm resets: " + data_help)
    p.add_argument("--reset-bn", action="store_true",
                   help="recompute BatchNorm statistics of the merged model on DATA")
    p.add_argument("--low-memory", action="store_true",
                   help="checkpoints that need not fit in memory together: each aligned to the "
                        "first by weight matching (memory-mapped, verified), then averaged one "
                        "tensor at a time into OUT (.safetensors) (autobasin.files.merge_files)")
    p.add_argument("--repair", choices=("repair", "rescale"),
                   help="REPAIR the merged model on DATA: every hidden channel gets the parents' "
                        "mean activation mean and std ('rescale': std only); BatchNorm "
                        "statistics are recomputed too")
    p.add_argument("--max-rounds", type=int, default=10,
                   help="most MergeMany rounds over all checkpoints (default 10)")
    p.add_argument("--method", default="weight", choices=("weight", "activation"),
                   help="how each checkpoint is aligned to the mean of the others (default "
                        "weight; activation needs --data)")
    p.add_argument("--spec", metavar="SPEC.json",
                   help="use this spec (from inspect --json) instead of inferring one")
    p.add_argument("--symmetries", type=symmetries_arg, default=("permutation",), metavar="KINDS",
                   help="kinds of symmetry to merge with (as for align; weight matching only)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("barrier", **sub_kwargs,
                       parents=[model_opts, ckpt_opts, data_opts, match_opts, common],
                       help="loss barrier between A and B, naive and aligned",
                       description="Evaluate the straight line between A and B before and after "
                                   "aligning B to A; print a table, optionally plot it.")
    p.add_argument("--a", metavar="A", help="checkpoint A (hf: default MODEL's folder)")
    p.add_argument("--b", required=True, metavar="B", help="checkpoint B")
    p.add_argument("--data", required=True, metavar="DATA", help=data_help)
    p.add_argument("--plot", metavar="FILE.png", help="plot both loss curves")
    p.add_argument("--json", metavar="OUT.json", help="write both curves as JSON")
    p.add_argument("--reset-bn", action="store_true",
                   help="recompute BatchNorm statistics at every point (on the training split)")
    p.add_argument("--repair", choices=("repair", "rescale"),
                   help="REPAIR every point of both paths on the training split (channel mean "
                        "and std interpolated from A's and B's; 'rescale': std only)")
    p.add_argument("--lambdas", type=int, default=25,
                   help="number of interpolation points in [0, 1] (default 25)")
    p.set_defaults(func=cmd_barrier)

    p = sub.add_parser("demo", **sub_kwargs,
                       help="train two MLPs on sklearn digits, align, compare barriers",
                       description="The one-minute demo (autobasin.demo).")
    p.add_argument("--out", type=Path, default=Path("autobasin-demo"),
                   help="folder for barrier.png (default ./autobasin-demo)")
    p.add_argument("--quick", action="store_true", help="3 training epochs (a few seconds)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    p.add_argument("--lambdas", type=int, default=25, help="interpolation points (default 25)")
    p.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
    return parser


# ------------------------------------------------------------------------ main
def _exit_code(exc: BaseException) -> int | None:
    """The exit code for an expected error, or None for an unexpected one."""
    from .api import ArchitectureMismatchError
    from .infer import ExampleInputError
    from .io import CheckpointMismatchError, CheckpointReadError
    from .models import ModelSpecError
    from .permute import EquivalenceError
    from .spec import SpecError
    from .trace import TraceError
    if isinstance(exc, (CheckpointMismatchError, ArchitectureMismatchError, SpecError)):
        return EXIT_MISMATCH
    if isinstance(exc, EquivalenceError):
        return EXIT_VERIFY
    if isinstance(exc, (UsageError, DataError, ModelSpecError, CheckpointReadError, ExampleInputError,
                        FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError)):
        return EXIT_USAGE
    if isinstance(exc, TraceError):
        return EXIT_UNEXPECTED
    return None


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    joined = _join_process_group(args)
    if not is_main() and hasattr(args, "quiet"):
        args.quiet = True  # under torchrun: one report and one set of progress bars, rank 0's
    log = _Log(getattr(args, "quiet", False))

    def show(message, category, filename, lineno, file=None, line=None):
        if not log.quiet:
            text = str(message).removeprefix(f"{PROG}: ")
            print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            if hasattr(args, "seed"):
                seed_everything(args.seed)
            if getattr(args, "threads", None):
                torch.set_num_threads(args.threads)
            return args.func(args, log)
        except KeyboardInterrupt:
            _error("interrupted; no output was written partially")
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - mapped to exit codes below
            code = _exit_code(e)
            if code is None:
                traceback.print_exc()
                _error(f"unexpected {type(e).__name__}: {e}")
                return EXIT_UNEXPECTED
            _error(str(e).strip() if str(e).strip() else type(e).__name__)
            return code
        finally:
            if joined:
                import torch.distributed as dist
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
