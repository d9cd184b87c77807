"""Small offline datasets for the demo, the benchmarks and the tests.

Two sources, neither of which downloads anything:

* the MNIST *test set* as raw gzip IDX files in a folder the user points at
  (:func:`load_mnist_idx`, :func:`mnist_split`), split by the project's
  protocol: images 0-7,999 train, 8,000-9,999 held out;
* scikit-learn's bundled 8x8 digits (:func:`digits_split`), for a demo that
  runs anywhere.
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import torch
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
