"""Checkpoint files: load, check against an architecture, save atomically.

* :func:`load_state_dict` reads ``.safetensors`` and PyTorch pickles
  (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``) with ``weights_only=True``,
  unwraps the usual training-checkpoint layouts (``{"state_dict": ...}``,
  ``{"model": ...}``, ``{"module": ...}``, ...), and strips the ``module.``
  (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes. Tensors keep
  the dtype they were stored with. The ``argparse.Namespace`` of training
  arguments that timm's ``train.py`` and torchvision's reference scripts store
  under ``"args"`` is allowed (with ``pathlib`` paths inside it).
* :func:`load_into` copies a state dict into a model strictly; a
  :class:`CheckpointMismatchError` names the missing and unexpected keys and
  every shape mismatch. :func:`load_checkpoint` does both for a copy of a model;
  :func:`load_spec` reads a spec's JSON file.
* :func:`save_state_dict` and :func:`save_perms` write to a temporary file in
  the destination folder and rename it into place, so an interrupted run never
  leaves a half-written output.

Errors are :class:`CheckpointError` (a ``ValueError``): :class:`CheckpointReadError`
for a missing, unreadable or corrupt file, :class:`CheckpointMismatchError` for
a checkpoint that does not fit the architecture. Both name the file.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import pathlib
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "CheckpointReadError", "CheckpointMismatchError",
           "load_state_dict", "save_state_dict", "save_safetensors_streaming", "load_into",
           "save_perms", "load_perms", "atomic_write"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# Keys under which training scripts nest the model's state, most specific first.
# EMA weights are only taken when nothing else is there (timm's default too).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net",
                "network", "params", "weights", "state_dict_ema", "model_ema", "ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Plain-data classes that training checkpoints pickle besides tensors: timm's train.py
# and torchvision's references/classification/train.py both save ``"args": Namespace``.
SAFE_GLOBALS = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
                pathlib.PurePosixPath, pathlib.PureWindowsPath)


def _safe_globals():
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return allow(list(SAFE_GLOBALS)) if allow is not None else contextlib.nullcontext()


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, or it does not fit the model."""


class CheckpointReadError(CheckpointError):
    """A checkpoint file is missing, unreadable, corrupt, or holds no tensors."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not match the architecture it is loaded into."""


# ---------------------------------------------------------------------- loading
def _sniff(path: Path) -> str:
    """``"safetensors"`` or ``"torch"`` from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":       # u64 header length, then JSON
        return "safetensors"
    return "torch"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                have = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointReadError(f"{path}: no entry {part!r} (from key {key!r}); "
                                          f"top-level entries: {have}")
            obj = obj[part]
    for _ in range(4):  # nested wrappers: {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and _is_state_dict(obj[k])), None)
        if inner is None:
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)
                          and any(isinstance(v, Mapping) for v in obj[k].values())), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not _is_state_dict(obj):
        what = (f"top-level entries: {list(obj)[:10]}" if isinstance(obj, Mapping)
                else f"it holds a {type(obj).__name__}")
        raise CheckpointReadError(f"{path}: found no state dict of tensors ({what}); "
                                  "pass key=... to pick the entry that holds the weights")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _unpickling_reason(e: Exception) -> str:
    """The useful line of torch's long weights_only message."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = " ".join(m.group(1).split()) if m else (text.strip().splitlines() or [""])[0]
    return reason.split(" was not an allowed global")[0][:200] or type(e).__name__


def load_state_dict(path: str | os.PathLike, key: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the model state stored in a checkpoint file.

    Args:
        path: a ``.safetensors`` file or a PyTorch file saved with ``torch.save``
            (any other suffix is recognised by its first bytes).
        key: dotted path of the entry holding the weights (e.g. ``"state_dict_ema"``);
            by default the common wrapper keys are tried (:data:`WRAPPER_KEYS`).
        map_location: where the tensors go (CPU by default).

    Returns:
        ``{name: tensor}`` with the dtypes stored in the file, ``module.`` and
        ``_orig_mod.`` prefixes removed when every key carries them. On the CPU
        the tensors are memory-mapped from the file (safetensors, and torch's
        zip format): nothing is read until it is used, and the pages read are
        the operating system's file cache, which it can drop under pressure.

    Raises:
        CheckpointReadError: the file is missing, corrupt, not a checkpoint, holds
            pickled objects other than tensors, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointReadError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointReadError(f"{path} is not a file")
    fmt = "safetensors" if path.suffix == ".safetensors" else (
        "torch" if path.suffix in TORCH_SUFFIXES else _sniff(path))
    if fmt == "safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - SafetensorsError, OSError, ...
            raise CheckpointReadError(f"{path}: not a readable safetensors file "
                                      f"({type(e).__name__}: {e})") from e
        if not obj:
            raise CheckpointReadError(f"{path}: the safetensors file holds no tensors")
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:2] != b"PK" and head[:1] != b"\x80":
            raise CheckpointReadError(f"{path}: not a PyTorch checkpoint (it starts with neither "
                                      "a zip nor a pickle header): corrupt, or another format")
        try:
            with warnings.catch_warnings():  # torch's pickle-protocol chatter on odd files
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")
                with _safe_globals():
                    # zip checkpoints on the CPU are memory-mapped: pages are read when used
                    mmap = head[:2] == b"PK" and torch.device(map_location).type == "cpu"
                    obj = torch.load(path, map_location=map_location, weights_only=True,
                                     mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointReadError(
                f"{path}: torch.load(weights_only=True) refused it ({_unpickling_reason(e)}); "
                "the file is corrupt or pickles Python objects besides tensors. Re-save just "
                "the weights: torch.save(model.state_dict(), path)") from e
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError,
                ImportError, IndexError, TypeError, UnicodeDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint, corrupt or "
                                      f"truncated ({type(e).__name__}: {first})") from e
    return _unwrap(obj, path, key)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
              source: str | os.PathLike | None = None, max_listed: int = 5,
              assign: bool = False) -> nn.Module:
    """Copy ``state_dict`` into ``model`` (in place), strictly; returns the model.

    Values are cast to the model's dtypes by ``load_state_dict``'s copy; the
    caller's tensors are not modified. With ``assign`` the model takes the
    tensors themselves (their dtypes too; no copy: a memory-mapped checkpoint
    stays mapped), see ``nn.Module.load_state_dict(assign=True)``.

    Raises:
        CheckpointMismatchError: naming ``source`` (the file), the first
            ``max_listed`` missing and unexpected keys, and every shape mismatch
            (key, checkpoint shape, model shape).
    """
    where = f"{source}" if source is not None else "the checkpoint"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(state_dict[k].shape), tuple(t.shape)) for k, t in expected.items()
              if k in state_dict and isinstance(t, torch.Tensor)
              and tuple(state_dict[k].shape) != tuple(t.shape)]
    if missing or unexpected or shapes:
        def listed(keys):
            more = f" (+{len(keys) - max_listed} more)" if len(keys) > max_listed else ""
            return ", ".join(repr(k) for k in keys[:max_listed]) + more
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys of the model are missing from it: {listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} of its keys are not in the model: "
                         f"{listed(unexpected)}")
        for k, got, want in shapes[:max_listed]:
            parts.append(f"{k!r} has shape {got} in the checkpoint but {want} in the model")
        if len(shapes) > max_listed:
            parts.append(f"(+{len(shapes) - max_listed} more shape mismatches)")
        raise CheckpointMismatchError(f"{where} does not fit {type(model).__name__}: "
                                      + "; ".join(parts))
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=assign)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointMismatchError(f"{where} does not load into {type(model).__name__}: "
                                      f"{str(e).strip().splitlines()[-1]}") from e
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike, key: str | None = None,
                    in_place: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``model`` (a deep copy unless ``in_place``) holding ``path``'s weights, in eval mode,
    and the state dict as stored (its own dtypes): :func:`load_state_dict` then
    :func:`load_into`, with their errors."""
    sd = load_state_dict(path, key=key)
    out = model if in_place else copy.deepcopy(model)
    load_into(out, sd, source=path)
    return out.eval(), sd


def load_spec(path: str | os.PathLike):
    """A :class:`~autobasin.spec.PermutationSpec` from a JSON file (``spec.to_json()``, what
    ``autobasin inspect --json`` writes); :class:`CheckpointReadError` naming the file when
    it is not one."""
    from .spec import PermutationSpec, SpecError
    path = Path(path).expanduser()
    try:
        return PermutationSpec.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, SpecError) as e:
        raise CheckpointReadError(f"{path}: not an autobasin spec JSON ({e})") from e


# ----------------------------------------------------------------------- saving
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    ``os.replace`` is atomic within one file system, so readers see the old file
    or the complete new one, never a partial write; on any exception (Ctrl-C
    included) the temporary file is removed and ``path`` is left as it was.
    The parent folder is created if needed.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _safetensors_ready(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory with another."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if ptr in seen or not whole:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[k] = t
    return out


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict atomically; returns the path written.

    ``.pt``/``.pth``/``.bin``/``.ckpt`` get ``torch.save``; anything else
    (``.safetensors`` recommended) a safetensors file, with ``metadata``
    (string to string) in its header. Dtypes are written as they are.
    """
    path = Path(path).expanduser()
    if path.suffix in TORCH_SUFFIXES:
        sd = {k: v.detach().cpu() for k, v in state_dict.items()}
        return atomic_write(path, lambda tmp: torch.save(sd, tmp))
    from safetensors.torch import save_file
    sd = _safetensors_ready(state_dict)
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    **{getattr(torch, n): c for n, c in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"))
       if hasattr(torch, n)},
}


def save_safetensors_streaming(layout: Mapping[str, torch.Tensor], entry: Callable[[str], torch.Tensor],
                               path: str | os.PathLike,
                               metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time, atomically; returns the path.

    ``layout`` gives the keys, shapes and dtypes (its tensors are not read:
    memory-mapped or meta tensors do); ``entry(key)`` makes each tensor when it
    is written, so at most one is held. safetensors' own ``save_file`` needs the
    whole dict in memory, hence this writer of its documented layout (an
    8-byte little-endian header length, the JSON header, the tensors' bytes);
    the file loads with ``safetensors.torch.load_file``. Raises ValueError naming
    the key when ``entry`` returns another shape or dtype than ``layout`` says.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **{str(k): str(v) for k, v in
                                                                   (metadata or {}).items()}}}
    offset = 0
    for key, t in layout.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"state dict entry {key!r} has dtype {t.dtype}, which safetensors "
                             f"does not store")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for key, like in layout.items():
                t = entry(key).detach()
                if t.shape != like.shape or t.dtype != like.dtype:
                    raise ValueError(f"entry {key!r} came out {tuple(t.shape)} {t.dtype}, "
                                     f"expected {tuple(like.shape)} {like.dtype}")
                if t.numel():
                    f.write(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
    return atomic_write(path, write)


PERMS_FORMAT = "autobasin.perms/1"


def save_perms(perms: Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``{group: LongTensor (n,)}`` atomically as JSON (``.json``) or safetensors;
    the elements of groups of other kinds (float (n, n) matrices) are kept as float64."""
    path = Path(path).expanduser()
    perms = {k: _element(v) for k, v in perms.items()}
    if path.suffix == ".json":
        doc = {"format": PERMS_FORMAT, **({"metadata": dict(metadata)} if metadata else {}),
               "perms": {k: v.tolist() for k, v in perms.items()}}
        text = json.dumps(doc)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    if path.suffix in TORCH_SUFFIXES:
        return atomic_write(path, lambda tmp: torch.save(perms, tmp))
    from safetensors.torch import save_file
    meta = {"format": PERMS_FORMAT, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    sd = {k: v.contiguous().clone() for k, v in perms.items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def load_perms(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read permutations written by :func:`save_perms`."""
    path = Path(path).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise CheckpointReadError(f"no such file: {path}")
        try:
            doc = json.loads(path.read_text())
            return {k: _element(torch.tensor(v, dtype=torch.float64 if _nested(v) else torch.long))
                    for k, v in doc["perms"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointReadError(f"{path}: not an autobasin permutations file ({e})") from e
    return {k: _element(v) for k, v in load_state_dict(path).items()}


def _element(v) -> torch.Tensor:
    """A group's element: a permutation as a LongTensor, a matrix as float64."""
    v = torch.as_tensor(v).cpu()
    return v.to(torch.float64) if v.is_floating_point() and v.dim() == 2 else v.long()


def _nested(v) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], list)
