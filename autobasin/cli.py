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

Every input is checked (files exist, checkpoints load into the architecture,
data yields batches the model accepts) before any long computation. Exit
codes (:data:`EXIT_CODES_HELP`, shown by ``autobasin --help``): 0 success,
2 usage or input error, 3 checkpoint/architecture mismatch, 4 verification
failed (the aligned model computes something else), 1 unexpected error, 130
interrupted. Expected errors print one line ``autobasin: error: ...``.
"""
from __future__ import annotations

import argparse
import ast
import copy
import inspect as _inspect
import json
import math
import os
import random
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

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


class UsageError(ValueError):
    """Bad arguments or unreadable inputs (exit code 2)."""


class DataError(UsageError):
    """The DATA argument names nothing usable (exit code 2)."""


# ---------------------------------------------------------------------- logging
class _Log:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def _out(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------- arguments
def _model_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
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


def _device(name: str) -> torch.device:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} {p}: no such file")
    if not p.is_file():
        raise UsageError(f"{what} {p} is not a file")
    return p


def _output_path(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {p}: cannot write to {parent}")
    return p


# ----------------------------------------------------------------------- models
def _build(args) -> nn.Module:
    from .models import build_model
    return build_model(args.model, num_classes=args.num_classes,
                       **_model_kwargs(args.model_kwargs))


def _example_inputs(model: nn.Module, input_size: Sequence[int] | None, batch: int = 2):
    """Inputs to trace and verify with (``--input-size`` or the model's own); the model is run
    on them once here, so a wrong shape is an input error before anything long starts."""
    from .trace import default_inputs
    if input_size:
        gen = torch.Generator().manual_seed(0)
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        example = (torch.randn(batch, *input_size, generator=gen).to(dtype),)
        what = f"--input-size {' '.join(map(str, input_size))}"
    else:
        try:
            example = default_inputs(model, batch=batch)
        except ValueError as e:
            raise UsageError(f"{e}; or pass --input-size with the input shape (no batch dim)") \
                from e
        what = "the default example input"
    failure = _run_naming_layer(model, example)
    if failure is not None:
        layer, e = failure
        shapes = ", ".join(str(tuple(t.shape)) for t in example if isinstance(t, torch.Tensor))
        at = f" at layer {layer!r}" if layer else ""
        hint = "" if input_size else "; pass --input-size with the input shape (no batch dim)"
        raise UsageError(f"{type(model).__name__} cannot run on {what} (shape {shapes}){at}: "
                         f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}{hint}")
    return example


def _load_checkpoint(model: nn.Module, path: Path, key: str | None, log: _Log,
                     in_place: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``model`` (a copy unless ``in_place``) holding ``path``'s weights, and the stored
    state dict (its own dtypes)."""
    from .io import load_into, load_state_dict
    log(f"loading {path}")
    sd = load_state_dict(path, key=key)
    out = model if in_place else copy.deepcopy(model)
    load_into(out, sd, source=path)
    return out.eval(), sd


# ------------------------------------------------------------------------- data
@dataclass
class DataSource:
    """Resolved DATA: ``eval`` batches for the chosen split, ``train`` batches for
    matching and BatchNorm resets (the training split when the source has one)."""

    description: str
    eval: Iterable
    train: Iterable
    has_train_split: bool
    train_description: str = ""  # what matching and BatchNorm resets run on

    @property
    def matching_description(self) -> str:
        return self.train_description or self.description


def _dataloader(dataset, args, shuffle: bool = False):
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle,
                      num_workers=args.workers,
                      generator=torch.Generator().manual_seed(args.seed))


def _to_rgb(image):
    return image.convert("RGB")


def _image_transform(model: nn.Module, input_size: Sequence[int] | None):
    from torchvision import transforms as T
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    torchvision_model = type(model).__module__.startswith("torchvision.models")
    if input_size:
        if len(input_size) != 3:
            raise UsageError(f"--input-size for image data is C H W, got {list(input_size)}")
        c, h, w = input_size
    elif cfg.get("input_size"):
        c, h, w = cfg["input_size"][-3:]
    elif torchvision_model:
        c, h, w = 3, 224, 224
    else:
        raise DataError(f"cannot tell what image size {type(model).__name__} expects: "
                        "pass --input-size C H W")
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None and torchvision_model:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    crop_pct = cfg.get("crop_pct")
    steps: list = []
    if c == 1:
        steps.append(T.Grayscale(1))
    elif c == 3:
        steps.append(T.Lambda(_to_rgb))
    if crop_pct:
        steps += [T.Resize(int(math.floor(min(h, w) / crop_pct))), T.CenterCrop((h, w))]
    else:
        steps.append(T.Resize((h, w)))
    steps.append(T.ToTensor())
    if mean is not None and std is not None and len(mean) == c:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps), (c, h, w)


_TRAIN_DIRS = ("train", "training")
_HELDOUT_DIRS = ("val", "validation", "valid", "test", "heldout")


def _image_folder(root: Path, model, args) -> DataSource:
    from torchvision.datasets import ImageFolder
    transform, size = _image_transform(model, args.input_size)
    train_dir = next((root / d for d in _TRAIN_DIRS if (root / d).is_dir()), None)
    held_dir = next((root / d for d in _HELDOUT_DIRS if (root / d).is_dir()), None)
    if train_dir is not None and held_dir is not None:
        eval_dir = held_dir if args.split == "heldout" else train_dir
    else:
        train_dir = eval_dir = root

    def folder(path: Path):
        try:
            return ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError, OSError) as e:
            raise DataError(f"image folder {path}: {e}") from e

    eval_ds = folder(eval_dir)
    train_ds = eval_ds if train_dir == eval_dir else folder(train_dir)
    desc = (f"image folder {eval_dir} ({len(eval_ds)} images, {len(eval_ds.classes)} classes, "
            f"resized to {size[0]}x{size[1]}x{size[2]})")
    return DataSource(desc, _dataloader(eval_ds, args), _dataloader(train_ds, args),
                      has_train_split=train_dir != eval_dir,
                      train_description=f"image folder {train_dir} ({len(train_ds)} images)")


def _from_function(target: str, args) -> DataSource:
    from torch.utils.data import Dataset
    from .models import ModelSpecError, load_callable
    try:
        fn = load_callable(target, what="function")
    except ModelSpecError as e:
        raise DataError(f"DATA {target!r}: {e}") from e

    def call(split: str):
        try:
            params = _inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        kwargs = {"split": split} if "split" in params else {}
        obj = fn(**kwargs)
        if isinstance(obj, Dataset) and not isinstance(obj, torch.utils.data.IterableDataset):
            obj = _dataloader(obj, args)
        try:
            if iter(obj) is obj:  # a one-shot iterator: keep its batches, they are read many times
                obj = list(obj)
        except TypeError as e:
            raise DataError(f"DATA {target!r} returned a {type(obj).__name__}, "
                            "not a DataLoader or an iterable of batches") from e
        return obj

    eval_data = call(args.split)
    takes_split = "split" in getattr(_safe_signature(fn), "parameters", {})
    train_data = call("train") if takes_split and args.split != "train" else eval_data
    return DataSource(f"{target} ({args.split})", eval_data, train_data,
                      has_train_split=takes_split,
                      train_description=f"{target} (train)" if takes_split else "")


def _safe_signature(fn):
    try:
        return _inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def resolve_data(spec: str, model: nn.Module, args) -> DataSource:
    """Turn a DATA argument into batches (see the module docstring)."""
    from .data import MNIST_IMAGES, digits_split, mnist_split
    path = Path(spec).expanduser()
    if spec == "digits" and not path.exists():
        train, held = digits_split(seed=0)
        eval_ds = held if args.split == "heldout" else train
        return DataSource(f"sklearn digits, {args.split} split ({len(eval_ds)} images)",
                          _dataloader(eval_ds, args), _dataloader(train, args), True,
                          f"sklearn digits, train split ({len(train)} images)")
    if path.is_dir():
        if (path / MNIST_IMAGES).is_file():
            try:
                train, held = mnist_split(path)
            except (OSError, ValueError) as e:  # missing labels, bad checksum, malformed IDX
                raise DataError(f"MNIST data {path}: {e}") from e
            eval_ds = held if args.split == "heldout" else train
            return DataSource(f"MNIST IDX {path}, {args.split} split ({len(eval_ds)} images)",
                              _dataloader(eval_ds, args), _dataloader(train, args), True,
                              f"MNIST IDX {path}, train split ({len(train)} images)")
        return _image_folder(path, model, args)
    if path.exists():
        raise DataError(f"DATA {path} is a file; DATA is an image folder, an MNIST IDX folder, "
                        "'digits', or module:function")
    if ":" in spec:
        return _from_function(spec, args)
    raise DataError(f"DATA {spec!r}: no such folder; DATA is an image folder, an MNIST IDX "
                    "folder, 'digits', or module:function returning a DataLoader")


def _first_batch(data: Iterable, what: str):
    try:
        return next(iter(data))
    except StopIteration:
        raise DataError(f"{what} yielded no batches") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable images, bad files, user code
        raise DataError(f"reading the first batch of {what} failed: {type(e).__name__}: {e}") from e


def _check_batch(model: nn.Module, batch, what: str, need_target: bool) -> torch.Tensor:
    """The input of ``batch``; the model must accept it (and a target exist if needed)."""
    from .barrier import _batch_target
    from .repair import batch_input
    try:
        x = batch_input(batch)
    except TypeError as e:
        raise DataError(f"{what}: {e}") from e
    if need_target:
        try:
            _batch_target(batch)
        except TypeError as e:
            raise DataError(f"{what}: batches must be (input, target) pairs to score a loss") from e
    layer = _run_naming_layer(model, (x[:2],))
    if layer is not None:
        where, e = layer
        at = f" at layer {where!r}" if where else ""
        raise DataError(f"the model cannot run on a batch of {what} (input shape "
                        f"{tuple(x.shape)}){at}: {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]}") from e
    return x


def _run_naming_layer(model: nn.Module, inputs: tuple) -> tuple[str, Exception] | None:
    """Run ``model(*inputs)`` in eval mode without grad; on failure, the qualified name of the
    innermost module that was running ("" for the top level) and the exception."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []
    failed: list[str] = []

    def enter(module, args):
        running.append(names.get(module, ""))

    def leave(module, args, output):
        running.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names] + \
        [m.register_forward_hook(leave) for m in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
        return None
    except Exception as e:  # noqa: BLE001 - reported as a DataError by the caller
        failed.extend(running)
        return (failed[-1] if failed else ""), e
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training


# ------------------------------------------------------------------------ plots
def plot_spec(spec, path: str | os.PathLike | None = None, title: str | None = None):
    """Draw a spec's groups over the model's tensors; returns the matplotlib Figure.

    Tensors (state_dict order) sit on a horizontal line, left to right; each
    group is a coloured hub above them, joined to the tensors it permutes: a
    solid edge for axis 0 (outputs), dashed for axis 1 (inputs), dotted for
    other axes. Parameters no group touches are red; buffers are small grey
    squares. Saved to ``path`` (PNG) when given.
    """
    import networkx as nx
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = [n for n, info in spec.tensors.items() if info.floating]
    index = {n: i for i, n in enumerate(names)}
    by_param = spec.members_by_param()
    graph = nx.MultiGraph()
    pos: dict = {}
    for n in names:
        graph.add_node(("t", n))
        pos[("t", n)] = (float(index[n]), 0.0)

    groups = [g for g in spec.groups.values() if any(m.param in index for m in g.members)]
    hub_x = {g.name: sum(index[m.param] for m in g.members if m.param in index)
             / sum(1 for m in g.members if m.param in index) for g in groups}
    groups.sort(key=lambda g: hub_x[g.name])
    levels = max(1, min(5, math.ceil(2.5 * len(groups) / max(len(names), 1))))
    levels = max(levels, min(len(groups), 3))
    cmap = colormaps["tab20"]
    # dark tab20 shades first, so neighbouring hubs differ clearly
    colour = {g.name: cmap((2 * i) % 20 + (i // 10) % 2) for i, g in enumerate(groups)}
    for k, g in enumerate(groups):
        node = ("g", g.name)
        graph.add_node(node)
        pos[node] = (hub_x[g.name], 1.0 + 0.6 * (k % levels))
        for m in g.members:
            if m.param in index:
                graph.add_edge(node, ("t", m.param), axis=m.axis, group=g.name)

    width = min(80.0, max(8.0, 0.2 * len(names) + 2))
    height = 3.0 + 0.6 * levels
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {0: "solid", 1: "dashed"}
    for style in ("solid", "dashed", "dotted"):
        edges = [(u, v) for u, v, d in graph.edges(data=True)
                 if styles.get(d["axis"], "dotted") == style]
        if edges:
            cols = [colour[(u if u[0] == "g" else v)[1]] for u, v in edges]
            nx.draw_networkx_edges(graph, pos, edgelist=edges, edge_color=cols, style=style,
                                   width=1.3, alpha=0.8, ax=ax)
    params = [("t", n) for n in names if spec.tensors[n].is_parameter]
    covered = [t for t in params if t[1] in by_param]
    uncovered = [t for t in params if t[1] not in by_param]
    buffers = [("t", n) for n in names if not spec.tensors[n].is_parameter]
    nx.draw_networkx_nodes(graph, pos, nodelist=covered, node_size=40, node_color="#9ecae1",
                           edgecolors="k", linewidths=0.5, ax=ax)
    if uncovered:
        nx.draw_networkx_nodes(graph, pos, nodelist=uncovered, node_size=40,
                               node_color="#fb6a4a", edgecolors="k", linewidths=0.5, ax=ax)
    if buffers:
        nx.draw_networkx_nodes(graph, pos, nodelist=buffers, node_size=18, node_shape="s",
                               node_color="#d9d9d9", edgecolors="#737373", linewidths=0.5, ax=ax)
    hubs = [("g", g.name) for g in groups]
    nx.draw_networkx_nodes(graph, pos, nodelist=hubs, node_size=110,
                           node_color=[colour[h[1]] for h in hubs], edgecolors="k",
                           linewidths=0.6, ax=ax)
    label_size = 7 if len(names) < 80 else 5
    for n in names:
        ax.text(index[n], -0.08, n, rotation=90, ha="center", va="top", fontsize=label_size)
    for g in groups:
        x, y = pos[("g", g.name)]
        ax.text(x, y + 0.1, f"{g.name} ({g.size})", rotation=30, ha="left", va="bottom",
                fontsize=label_size, color="k")
    ax.set_xlim(-1, max(len(names), 2))
    ax.set_ylim(-0.3, 1.9 + 0.6 * levels)
    ax.axis("off")
    handles = [Line2D([], [], color="k", linestyle="solid", label="axis 0 (outputs)"),
               Line2D([], [], color="k", linestyle="dashed", label="axis 1 (inputs)"),
               Line2D([], [], color="k", linestyle="dotted", label="other axis"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="#9ecae1",
                      markeredgecolor="k", label="parameter, permuted"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="#fb6a4a",
                      markeredgecolor="k", label="parameter, fixed"),
               Line2D([], [], marker="s", linestyle="", markerfacecolor="#d9d9d9",
                      markeredgecolor="#737373", label="buffer")]
    ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, ncol=6)
    ax.set_title(title or f"{len(spec.groups)} permutation groups over {len(names)} tensors, "
                 f"coverage {spec.coverage():.3f}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        from .io import atomic_write
        dest = Path(path)
        atomic_write(dest, lambda tmp: fig.savefig(tmp, dpi=100, format="png",
                                                      bbox_inches="tight"))
    return fig


# -------------------------------------------------------------------- commands
def cmd_inspect(args, log: _Log) -> int:
    from .infer import infer_spec
    from .permute import check_equivalence
    json_out = _output_path(args.json, "--json") if args.json else None
    plot_out = _output_path(args.plot, "--plot") if args.plot else None
    model = _build(args)
    example = _example_inputs(model, args.input_size)
    log(f"tracing {args.model} ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)")
    spec = infer_spec(model, example)
    _out(str(spec))
    n_params = sum(1 for i in spec.tensors.values() if i.is_parameter)
    touched = set(spec.members_by_param())
    fixed = [n for n, i in spec.tensors.items()
             if i.is_parameter and i.floating and n not in touched]
    _out("")
    _out(f"coverage: {spec.coverage():.3f} of hidden parameter axes are permuted; "
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
        probe = randomize_state_(copy.deepcopy(model), seed=args.seed)
        err = check_equivalence(probe, spec, example, seed=args.seed)
        _out(f"verified: a random permutation of every group leaves the outputs unchanged "
             f"(relative error {err:.2e})")
    if json_out is not None:
        from .io import atomic_write
        text = spec.to_json()
        atomic_write(json_out, lambda tmp: Path(tmp).write_text(text))
        _out(f"wrote {json_out}")  # results go to stdout, as align, barrier and merge print theirs
    if plot_out is not None:
        plot_spec(spec, plot_out, title=f"{args.model}: {len(spec.groups)} groups, "
                                        f"coverage {spec.coverage():.3f}")
        _out(f"wrote {plot_out}")
    return EXIT_OK


def _matcher_needs_data(method: str) -> bool:
    from .api import MATCHERS
    return bool(getattr(MATCHERS[method], "needs_data", False))


def _distance(sd_a: dict, sd_b: dict) -> float:
    total = 0.0
    for k, ta in sd_a.items():
        tb = sd_b[k]
        if ta.is_floating_point():
            total += float((ta.double() - tb.double()).pow(2).sum())
    return math.sqrt(total)


def _load_spec(path: str | None):
    if not path:
        return None
    from .spec import PermutationSpec, SpecError
    p = _existing_file(path, "--spec")
    try:
        return PermutationSpec.from_json(p.read_text())
    except (ValueError, KeyError, TypeError, SpecError) as e:
        raise UsageError(f"--spec {p}: not an autobasin spec JSON ({e})") from e


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
                          device=device, **extra)
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
    path_a = _existing_file(args.a, "--a")
    path_b = _existing_file(args.b, "--b")
    device = _device(args.device)
    spec = _load_spec(getattr(args, "spec", None))
    model = _build(args)
    model_b, raw_b = _load_checkpoint(model, path_b, args.checkpoint_key, log)
    model_a, _ = _load_checkpoint(model, path_a, args.checkpoint_key, log, in_place=True)
    data = None
    if need_data and not args.data:
        raise UsageError(f"--method {args.method} needs --data")
    if args.data:
        data = resolve_data(args.data, model_a, args)
        # barrier evaluates on the chosen split; align only matches, on the training split
        log(f"data: {data.description}" if need_target else
            f"matching data: {data.matching_description}")
        x = _check_batch(model_a, _first_batch(data.eval, f"DATA {args.data}"),
                         f"DATA {args.data}", need_target)
        if data.train is not data.eval:
            _check_batch(model_a, _first_batch(data.train, f"DATA {args.data} (train split)"),
                         f"DATA {args.data} (train split)", False)
        example = (x[:2].to(torch.float32) if x.is_floating_point() else x[:2],)
        if args.input_size:
            example = _example_inputs(model_a, args.input_size)
    else:
        example = _example_inputs(model_a, args.input_size)
    if spec is not None:  # a spec from another model fails here, not after the long part
        _check_spec_fits(spec, args, model_a)
    return model_a, model_b, raw_b, data, example, device, spec


def cmd_align(args, log: _Log) -> int:
    from .io import save_perms, save_state_dict
    from .permute import apply_permutation
    out = _output_path(args.out, "--out")
    perms_out = _output_path(args.perms, "--perms") if args.perms else \
        out.with_name(out.stem + ".perms.safetensors")
    model_a, model_b, raw_b, data, example, device, spec = _prepare_pair(
        args, log, need_data=_matcher_needs_data(args.method), need_target=False)
    result, seconds = _align(args, log, model_a, model_b, example, data, device, spec)
    # permute B's stored tensors, so the file keeps B's dtypes exactly
    aligned_sd = apply_permutation(result.spec, result.perms, raw_b)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    before, after = _distance(sd_a, sd_b), _distance(sd_a, result.state_dict)
    save_state_dict(aligned_sd, out, metadata={"autobasin": "aligned", "method": args.method,
                                               "reference": str(args.a), "source": str(args.b)})
    save_perms(result.perms, perms_out, metadata={"method": args.method})
    stats = result.stats
    _out(f"spec: {len(result.spec.groups)} groups, coverage {result.spec.coverage():.3f}")
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
    plot_out = _output_path(args.plot, "--plot") if args.plot else None
    json_out = _output_path(args.json, "--json") if args.json else None
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
        from .io import atomic_write
        fig = plot_barrier({"naive": naive, label: aligned},
                           title=f"{args.model}: loss along the path A -> B")
        atomic_write(plot_out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        _out(f"wrote {plot_out}")
    if json_out is not None:
        from .io import atomic_write
        text = json.dumps({"naive": asdict(naive), args.method: asdict(aligned),
                           "matching_seconds": seconds, "data": data.description}, indent=1)
        atomic_write(json_out, lambda tmp: Path(tmp).write_text(text))
        _out(f"wrote {json_out}")
    return EXIT_OK


def cmd_merge(args, log: _Log) -> int:
    from .io import save_state_dict
    from .merge import merge_many
    out = _output_path(args.out, "--out")
    if len(args.checkpoints) < 2:
        raise UsageError(f"merge needs at least 2 checkpoints, got {len(args.checkpoints)}")
    paths = [_existing_file(p, "checkpoint") for p in args.checkpoints]
    if args.reset_bn and args.repair:
        raise UsageError("--repair already recomputes BatchNorm statistics; drop --reset-bn")
    repair = "reset_bn" if args.reset_bn else args.repair
    if repair and not args.data:
        raise UsageError(f"--{'reset-bn' if args.reset_bn else 'repair'} needs --data")
    if args.max_rounds < 1:
        raise UsageError(f"--max-rounds must be at least 1, got {args.max_rounds}")
    if args.method == "activation" and not args.data:
        raise UsageError("--method activation needs --data")
    device = _device(args.device)
    spec = _load_spec(args.spec)
    model = _build(args)
    loaded = [_load_checkpoint(model, p, args.checkpoint_key, log) for p in paths]
    models = [m for m, _ in loaded]
    if spec is not None:  # a spec from another model fails here, not after the long part
        _check_spec_fits(spec, args, models[0])
    data = None
    if args.data:
        data = resolve_data(args.data, models[0], args)
        _check_batch(models[0], _first_batch(data.train, f"DATA {args.data}"),
                     f"DATA {args.data}", False)
        if args.method == "activation" and not repair:
            repair = "reset_bn"  # merge_many recomputes BatchNorm statistics whenever it has data
            log("note: BatchNorm statistics of the merged model are recomputed on DATA")
        elif not repair:
            log("note: DATA is only used to repair the merged model; add --reset-bn or --repair")
    example = _example_inputs(models[0], args.input_size)
    stats: dict = {}
    log(f"merging {len(models)} models")
    t0 = time.perf_counter()
    if device is not None:
        models = [m.to(device) for m in models]  # the loaded copies are ours to move
    # merge_many verifies that every checkpoint, permuted as merged, computes what it computed
    merged_model = merge_many(models, method=args.method, seed=args.seed, spec=spec,
                              progress=not args.quiet, example_inputs=example,
                              max_rounds=args.max_rounds, stats=stats,
                              data=data.train if repair else None, repair=repair)
    seconds = time.perf_counter() - t0
    first = loaded[0][1]
    sd = {k: (v.detach().cpu().to(first[k].dtype) if k in first and v.is_floating_point()
              else v.detach().cpu()) for k, v in merged_model.state_dict().items()}
    save_state_dict(sd, out, metadata={"autobasin": "merged",
                                       "sources": ",".join(str(p) for p in paths)})
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
    argv = ["--out", str(args.out), "--lambdas", str(args.lambdas)]
    if args.quick:
        argv.append("--quick")
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    demo_main(argv)
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def _methods() -> list[str]:
    from .api import MATCHERS
    return sorted(MATCHERS)


def build_parser() -> argparse.ArgumentParser:
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
                   help="timm:NAME, torchvision:NAME, or path/to/file.py:factory")
    g.add_argument("--num-classes", type=int, default=None,
                   help="number of classes of the classifier head (passed to the constructor)")
    g.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=[],
                   help="more constructor arguments, e.g. --model-kwargs drop_rate=0.1")
    g.add_argument("--input-size", type=int, nargs="+", metavar="N", default=None,
                   help="input shape without the batch dimension, e.g. 3 224 224 "
                        "(default: the model's pretrained_cfg, or a guess)")

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
                 "returning a DataLoader (called with split=... if it takes it)")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Align and merge neural networks modulo permutation symmetry "
                               "(Git Re-Basin), for any PyTorch model.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub_kwargs = {"epilog": EXIT_CODES_HELP,
                  "formatter_class": argparse.RawDescriptionHelpFormatter}
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
    g.add_argument("--method", default="weight", choices=_methods(), help="matching method")
    g.add_argument("--spec", metavar="SPEC.json",
                   help="use this spec (from inspect --json) instead of inferring one")
    g.add_argument("--max-iter", type=int, default=100, help="most matching sweeps (default 100)")
    g.add_argument("--tol", type=float, default=0.0,
                   help="weight matching: stop after a sweep that raises the objective by at "
                        "most this fraction (default 0: until a sweep changes nothing)")
    p = sub.add_parser("align", **sub_kwargs,
                       parents=[model_opts, ckpt_opts, data_opts, match_opts, common],
                       help="permute checkpoint B to line up with checkpoint A",
                       description="Write B permuted to line up with A (it computes what B "
                                   "computes, in B's dtypes), and the permutations.")
    p.add_argument("--a", required=True, metavar="A", help="reference checkpoint")
    p.add_argument("--b", required=True, metavar="B", help="checkpoint to permute")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="aligned B (.safetensors; .pt/.pth/.bin for torch.save)")
    p.add_argument("--data", metavar="DATA", help="batches for data-based methods: " + data_help)
    p.add_argument("--perms", metavar="PERMS",
                   help="where to write the permutations (.safetensors or .json; default "
                        "OUT's name with .perms.safetensors)")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("merge", **sub_kwargs, parents=[model_opts, ckpt_opts, data_opts, common],
                       help="merge several checkpoints (MergeMany)",
                       description="Align and average several checkpoints of one architecture.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--out", required=True, metavar="OUT", help="merged checkpoint")
    p.add_argument("--data", metavar="DATA", help="batches for BatchNorm resets: " + data_help)
    p.add_argument("--reset-bn", action="store_true",
                   help="recompute BatchNorm statistics of the merged model on DATA")
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
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("barrier", **sub_kwargs,
                       parents=[model_opts, ckpt_opts, data_opts, match_opts, common],
                       help="loss barrier between A and B, naive and aligned",
                       description="Evaluate the straight line between A and B before and after "
                                   "aligning B to A; print a table, optionally plot it.")
    p.add_argument("--a", required=True, metavar="A", help="checkpoint A")
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
    try:
        from .infer import ExampleInputError
    except ImportError:  # pragma: no cover - older inference module
        ExampleInputError = ()  # noqa: N806 - an empty tuple matches nothing in isinstance
    from .io import CheckpointMismatchError, CheckpointReadError
    from .models import ModelSpecError
    from .permute import EquivalenceError
    from .spec import SpecError
    from .trace import TraceError
    if isinstance(exc, (CheckpointMismatchError, ArchitectureMismatchError, SpecError)):
        return EXIT_MISMATCH
    if isinstance(exc, EquivalenceError):
        return EXIT_VERIFY
    if isinstance(exc, (UsageError, ModelSpecError, CheckpointReadError, ExampleInputError,
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
    log = _Log(getattr(args, "quiet", False))

    def show(message, category, filename, lineno, file=None, line=None):
        if not log.quiet:
            text = str(message)
            if text.startswith(f"{PROG}: "):
                text = text[len(PROG) + 2:]
            print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            if hasattr(args, "seed"):
                _seed_everything(args.seed)
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


if __name__ == "__main__":
    sys.exit(main())
