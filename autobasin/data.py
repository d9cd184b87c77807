"""Small offline datasets for the demo, the benchmarks and the tests.

Two sources, neither of which downloads anything:

* the MNIST *test set* as raw gzip IDX files in a folder the user points at
  (:func:`load_mnist_idx`, :func:`mnist_split`), split by the project's
  protocol: images 0-7,999 train, 8,000-9,999 held out;
* scikit-learn's bundled 8x8 digits (:func:`digits_split`), for a demo that
  runs anywhere.

It also turns the command line's DATA argument into batches
(:func:`resolve_data`: an image folder, an MNIST IDX folder, ``digits`` or
``module:function``), checks that a model runs on them (:func:`check_batch`)
and makes the example inputs a command traces with (:func:`make_example_inputs`).
Every failure is a :class:`DataError` naming what was given.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_TRAIN_SIZE = 8_000  # protocol: first 8,000 images train, the rest held out

DIGITS_TRAIN_SIZE = 1_400  # of sklearn's 1,797; the remaining 397 are held out

# The IDX header: two zero bytes, a type code, the number of dimensions, then
# one big-endian uint32 per dimension. Only unsigned bytes (0x08) occur in MNIST.
_IDX_UBYTE = 0x08


class ChecksumError(ValueError):
    """A data file's MD5 differs from the one listed in its folder's MD5SUMS."""


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_md5sums(root: Path) -> dict[str, str]:
    """``{file name: md5}`` from ``root/MD5SUMS`` (``md5sum`` output format), or {}."""
    listing = root / "MD5SUMS"
    if not listing.is_file():
        return {}
    sums: dict[str, str] = {}
    for line in listing.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            # md5sum writes "<hash>  <name>" or "<hash> *<name>" (binary mode)
            sums[parts[-1].lstrip("*")] = parts[0].lower()
    return sums


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one gzip-compressed IDX file of unsigned bytes into a uint8 array.

    The array has the shape the header declares, e.g. (N, 28, 28) for images
    and (N,) for labels. Raises ValueError on a malformed header or a payload
    whose length does not match it.
    """
    path = Path(path)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim == 0:
        raise ValueError(f"{path}: not an unsigned-byte IDX file "
                         f"(magic {raw[:4].hex()}, expected 0000 08 0d with d = number of dims)")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(shape))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=header_end)
    if payload.size != expected:
        raise ValueError(f"{path}: header declares shape {shape} ({expected} bytes) "
                         f"but the file holds {payload.size} bytes of data")
    return payload.reshape(shape).copy()


def load_mnist_idx(root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the MNIST test set from ``root``.

    ``root`` must hold ``t10k-images-idx3-ubyte.gz`` and
    ``t10k-labels-idx1-ubyte.gz``. When ``root/MD5SUMS`` is present, every file
    it lists that is read here is checked against it (:class:`ChecksumError`).

    We parse IDX ourselves: torchvision's ``MNIST`` dataset only reads its own
    ``MNIST/raw`` folder layout (and wants the training files too), and it
    exposes no public function for decoding a standalone IDX file.

    Returns:
        images: uint8 tensor (N, 28, 28); labels: int64 tensor (N,).
    """
    root = Path(root).expanduser()
    images_path, labels_path = root / MNIST_IMAGES, root / MNIST_LABELS
    missing = [p.name for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST IDX files not found under {root} (missing: {', '.join(missing)}); "
            f"pass --data pointing at the folder holding {MNIST_IMAGES} and {MNIST_LABELS}")
    sums = _read_md5sums(root)
    for path in (images_path, labels_path):
        want = sums.get(path.name)
        if want is not None:
            got = _md5(path)
            if got != want:
                raise ChecksumError(f"{path}: MD5 {got} does not match {want} listed in "
                                    f"{root / 'MD5SUMS'}; the file is corrupt or not the one expected")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST under {root}: images {images.shape} and labels {labels.shape} "
                         f"do not pair up as (N, H, W) and (N,)")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def mnist_split(root: str | Path, normalize: bool = True,
                train_size: int = MNIST_TRAIN_SIZE) -> tuple[TensorDataset, TensorDataset]:
    """The project's MNIST protocol: first ``train_size`` test images train, the rest held out.

    Images become float32 (N, 1, 28, 28) in [0, 1], then, if ``normalize``,
    ``(x - 0.1307) / 0.3081``. Labels are int64 (N,).
    """
    images, labels = load_mnist_idx(root)
    if not 0 < train_size < images.shape[0]:
        raise ValueError(f"train_size must be in 1..{images.shape[0] - 1}, got {train_size}")
    x = images.unsqueeze(1).float().div_(255.0)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return (TensorDataset(x[:train_size], labels[:train_size]),
            TensorDataset(x[train_size:], labels[train_size:]))


def mnist_benchmark_split(root: str | Path, limit: int | None = None, prog: str = "benchmark"
                          ) -> tuple[Dataset, Dataset]:
    """:func:`mnist_split` for a command-line benchmark: a missing or corrupt
    folder exits with a message naming it, and ``limit`` keeps the first
    ``limit`` images of each part (smoke tests)."""
    try:
        train_set, heldout_set = mnist_split(root)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{prog}: {err}") from err
    if limit is not None:
        train_set = Subset(train_set, range(min(limit, len(train_set))))
        heldout_set = Subset(heldout_set, range(min(limit, len(heldout_set))))
    return train_set, heldout_set


def digits_split(seed: int = 0, train_size: int = DIGITS_TRAIN_SIZE
                 ) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits, shuffled by ``seed`` and split train/held out.

    Pixels (0..16) are standardized with the mean and std of the training
    split (one scalar each, so no pixel is divided by a zero std).

    Returns:
        train, heldout: TensorDatasets of images float32 (N, 1, 8, 8) and
        labels int64 (N,); 1,400 and 397 images by default.
    """
    from sklearn.datasets import load_digits  # optional dependency, only needed here

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    if not 0 < train_size < x.shape[0]:
        raise ValueError(f"train_size must be in 1..{x.shape[0] - 1}, got {train_size}")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    mean, std = x[:train_size].mean(), x[:train_size].std()
    x = (x - mean) / std
    return (TensorDataset(x[:train_size], y[:train_size]),
            TensorDataset(x[train_size:], y[train_size:]))


def loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False,
           seed: int = 0) -> DataLoader:
    """A single-process DataLoader whose shuffling order depends only on ``seed``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ the DATA argument
# DataError lives with the batch plumbing (autobasin.text raises it too); this
# module's name for it stays the public one.
from .batches import DataError  # noqa: E402


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


@dataclass(frozen=True)
class _Batching:
    split: str
    batch_size: int
    workers: int
    seed: int

    def loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.workers,
                          generator=torch.Generator().manual_seed(self.seed))


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(model: nn.Module, input_size: Sequence[int] | None):
    """The torchvision transform that feeds images to ``model`` (its ``pretrained_cfg`` size,
    mean, std and crop, or torchvision's), and the (C, H, W) it produces."""
    from torchvision import transforms as T
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    torchvision_model = type(model).__module__.startswith("torchvision.models")
    if input_size:
        if len(input_size) != 3:
            raise DataError(f"--input-size for image data is C H W, got {list(input_size)}")
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


TRAIN_DIRS = ("train", "training")
HELDOUT_DIRS = ("val", "validation", "valid", "test", "heldout")


def _image_folder(root: Path, model: nn.Module, input_size, how: _Batching) -> DataSource:
    from torchvision.datasets import ImageFolder
    transform, size = image_transform(model, input_size)
    train_dir = next((root / d for d in TRAIN_DIRS if (root / d).is_dir()), None)
    held_dir = next((root / d for d in HELDOUT_DIRS if (root / d).is_dir()), None)
    if train_dir is not None and held_dir is not None:
        eval_dir = held_dir if how.split == "heldout" else train_dir
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
    return DataSource(desc, how.loader(eval_ds), how.loader(train_ds),
                      has_train_split=train_dir != eval_dir,
                      train_description=f"image folder {train_dir} ({len(train_ds)} images)")


def _safe_signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _from_function(target: str, how: _Batching) -> DataSource:
    from .models import ModelSpecError, load_callable
    try:
        fn = load_callable(target, what="function")
    except ModelSpecError as e:
        raise DataError(f"DATA {target!r}: {e}") from e
    takes_split = "split" in getattr(_safe_signature(fn), "parameters", {})

    def call(split: str):
        obj = fn(**({"split": split} if takes_split else {}))
        if isinstance(obj, Dataset) and not isinstance(obj, torch.utils.data.IterableDataset):
            obj = how.loader(obj)
        try:
            if iter(obj) is obj:  # a one-shot iterator: keep its batches, they are read many times
                obj = list(obj)
        except TypeError as e:
            raise DataError(f"DATA {target!r} returned a {type(obj).__name__}, "
                            "not a DataLoader or an iterable of batches") from e
        return obj

    eval_data = call(how.split)
    train_data = call("train") if takes_split and how.split != "train" else eval_data
    return DataSource(f"{target} ({how.split})", eval_data, train_data,
                      has_train_split=takes_split,
                      train_description=f"{target} (train)" if takes_split else "")


def _text(path: Path, model: nn.Module, how: _Batching, seq_len: int) -> DataSource:
    """Batches of ``{"input_ids": ...}`` windows of a text file or folder, for a model
    that takes ``input_ids``: tokens of the model folder's tokenizer, else bytes."""
    from .text import (is_masked_lm, lm_batches, mask_batches, mask_token_id, text_splits,
                       tokenizer_for, windows)
    tokenizer = tokenizer_for(model)
    train, held, desc = text_splits(path, tokenizer)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max((int(t.max()) for t in (train, held) if t.numel()), default=0)
    if vocab and top >= vocab:
        raise DataError(f"DATA {path}: token id {top} is beyond the model's vocab_size {vocab}"
                        + ("; byte-level tokens need vocab_size >= 256, or a tokenizer in the "
                           "model folder" if tokenizer is None else ""))
    train_w, held_w = windows(train, seq_len), windows(held, seq_len)
    if len(train_w) == 0 or len(held_w) == 0:
        raise DataError(f"DATA {path}: too short for windows of --seq-len {seq_len} tokens in "
                        f"both splits ({train.numel()} training, {held.numel()} held-out tokens)")
    eval_w = held_w if how.split == "heldout" else train_w
    eval_b = lm_batches(eval_w, how.batch_size)
    train_b = lm_batches(train_w, how.batch_size, shuffle=True, seed=how.seed)
    kind = "windows"
    if is_masked_lm(model):  # scored by the model's own loss on masked tokens
        mask = mask_token_id(model, tokenizer)
        eval_b, train_b = mask_batches(eval_b, mask, seed=how.seed), \
            mask_batches(train_b, mask, seed=how.seed + 1)
        kind = "windows, 15% of tokens masked,"
    return DataSource(f"{desc}; {how.split} split: {len(eval_w)} {kind} of {seq_len}",
                      eval_b, train_b, has_train_split=True,
                      train_description=f"{desc}; train split: {len(train_w)} {kind} of {seq_len}")


def resolve_data(spec: str, model: nn.Module, split: str = "heldout", batch_size: int = 128,
                 workers: int = 0, seed: int = 0,
                 input_size: Sequence[int] | None = None, seq_len: int = 64) -> DataSource:
    """Turn a DATA argument into batches: an image folder (class subfolders; ``train/`` and
    ``val/`` subfolders are the splits; images resized for ``model`` or to ``input_size``),
    a folder holding the MNIST IDX test files, ``digits``, or ``module:function`` /
    ``file.py:function`` returning a DataLoader, a Dataset or batches (called with
    ``split=...`` if it takes it). ``split`` ("heldout" or "train") is what ``eval`` holds.

    For a model whose forward takes ``input_ids`` (a language model), a text file or a
    folder of text files gives ``{"input_ids": ...}`` batches of ``seq_len``-token windows
    (:func:`autobasin.text.text_splits`: the last files, or a single file's last 10%,
    held out; the training windows shuffled by ``seed``)."""
    from .batches import forward_parameters
    how = _Batching(split, batch_size, workers, seed)
    path = Path(spec).expanduser()
    if path.exists() and "input_ids" in forward_parameters(model) and \
            not (path / MNIST_IMAGES).is_file():
        return _text(path, model, how, seq_len)
    if spec == "digits" and not path.exists():
        train, held = digits_split(seed=0)
        eval_ds = held if split == "heldout" else train
        return DataSource(f"sklearn digits, {split} split ({len(eval_ds)} images)",
                          how.loader(eval_ds), how.loader(train), True,
                          f"sklearn digits, train split ({len(train)} images)")
    if path.is_dir():
        if (path / MNIST_IMAGES).is_file():
            try:
                train, held = mnist_split(path)
            except (OSError, ValueError) as e:  # missing labels, bad checksum, malformed IDX
                raise DataError(f"MNIST data {path}: {e}") from e
            eval_ds = held if split == "heldout" else train
            return DataSource(f"MNIST IDX {path}, {split} split ({len(eval_ds)} images)",
                              how.loader(eval_ds), how.loader(train), True,
                              f"MNIST IDX {path}, train split ({len(train)} images)")
        return _image_folder(path, model, input_size, how)
    if path.exists():
        raise DataError(f"DATA {path} is a file; DATA is an image folder, an MNIST IDX folder, "
                        "'digits', or module:function")
    if ":" in spec:
        return _from_function(spec, how)
    raise DataError(f"DATA {spec!r}: no such folder; DATA is an image folder, an MNIST IDX "
                    "folder, 'digits', or module:function returning a DataLoader")


def first_batch(data: Iterable, what: str):
    """The first batch of ``data``; a :class:`DataError` naming ``what`` when there is none
    or reading it fails."""
    try:
        return next(iter(data))
    except StopIteration:
        raise DataError(f"{what} yielded no batches") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable images, bad files, user code
        raise DataError(f"reading the first batch of {what} failed: {type(e).__name__}: {e}") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def check_batch(model: nn.Module, batch, what: str, need_target: bool) -> Any:
    """The input of ``batch`` (a dict of keyword inputs for a batch such as
    ``{"input_ids": ...}``, else the positional input tensor); the model must accept it,
    and a loss must be defined (a target, or an LM batch) if ``need_target``."""
    from .inputs import run_naming_layer
    from .batches import batch_input, batch_target, is_lm_batch, is_token_batch, keyword_inputs
    keywords = keyword_inputs(batch, model) if isinstance(batch, dict) else {}
    try:
        x = keywords or batch_input(batch)
    except TypeError as e:
        raise DataError(f"{what}: {e}") from e
    if need_target and not (is_lm_batch(batch) or is_token_batch(batch)):
        try:
            batch_target(batch)
        except TypeError as e:
            raise DataError(f"{what}: batches must be (input, target) pairs or language-model "
                            "batches ({'input_ids': ...}) to score a loss") from e
    first = example_of(x)
    failure = run_naming_layer(model, first)
    if failure is not None:
        where, e = failure
        at = f" at layer {where!r}" if where else ""
        shape = example_of(x, count=None).describe()  # the whole batch's shapes
        raise DataError(f"the model cannot run on a batch of {what} (input shape "
                        f"{shape}){at}: {type(e).__name__}: {_first_line(e)}") from e
    return x


def example_of(x, count: int | None = 2):
    """Example inputs from a checked batch input (:func:`check_batch`): its first
    ``count`` samples (all when None), floating tensors as float32, as
    :class:`autobasin.inputs.ModelInputs`."""
    from .inputs import as_inputs

    def head(t):
        if not isinstance(t, torch.Tensor) or not t.dim():
            return t
        return t[:count].float() if t.is_floating_point() else t[:count]
    return as_inputs(x if isinstance(x, dict) else (x,)).map_tensors(head)


def check_source(model: nn.Module, data: DataSource, what: str, need_target: bool,
                 split: str = "eval") -> torch.Tensor:
    """:func:`check_batch` on the first batch of ``data.eval`` (``split="eval"``; and of
    ``data.train`` when it is another split) or of ``data.train`` alone (``split="train"``);
    returns the input of the first batch checked."""
    if split == "train":
        return check_batch(model, first_batch(data.train, what), what, False)
    x = check_batch(model, first_batch(data.eval, what), what, need_target)
    if data.train is not data.eval:
        check_batch(model, first_batch(data.train, f"{what} (train split)"),
                    f"{what} (train split)", False)
    return x


def make_example_inputs(model: nn.Module, input_size: Sequence[int] | None = None,
                        batch: int = 2, seq_len: int = 64) -> Any:
    """Inputs to trace and verify with (``input_size``, without the batch dimension, or the
    model's own; for a language model, ``{"input_ids": ...}`` random ids of ``seq_len``
    below its ``config.vocab_size``); the model is run on them once here, so a wrong shape
    is a :class:`DataError` naming the layer before anything long starts."""
    from .hf import random_ids
    from .inputs import as_inputs, run_naming_layer
    from .trace import default_inputs
    ids = None if input_size else random_ids(model, seq_len, batch)
    if ids is not None:
        failure = run_naming_layer(model, as_inputs(ids, model))
        if failure is not None:
            layer, e = failure
            raise DataError(f"{type(model).__name__} cannot run on random input_ids of "
                            f"--seq-len {seq_len}{f' at layer {layer!r}' if layer else ''}: "
                            f"{type(e).__name__}: {_first_line(e)}")
        return ids
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
            raise DataError(f"{e}; or pass --input-size with the input shape (no batch dim)") \
                from e
        what = "the default example input"
    failure = run_naming_layer(model, example)
    if failure is not None:
        layer, e = failure
        shapes = ", ".join(str(tuple(t.shape)) for t in example if isinstance(t, torch.Tensor))
        at = f" at layer {layer!r}" if layer else ""
        hint = "" if input_size else "; pass --input-size with the input shape (no batch dim)"
        raise DataError(f"{type(model).__name__} cannot run on {what} (shape {shapes}){at}: "
                        f"{type(e).__name__}: {_first_line(e)}{hint}")
    return example
