"""Data loading (synthetic IDX files, sklearn digits) and the demo's end-to-end run."""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from autobasin.data import (MNIST_IMAGES, MNIST_LABELS, ChecksumError, digits_split,
                            load_mnist_idx, loader, mnist_split, read_idx)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip IDX file: magic 00 00 08 ndim, big-endian dims, bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(6,), dtype=np.uint8)
    write_idx(tmp_path / MNIST_IMAGES, images)
    write_idx(tmp_path / MNIST_LABELS, labels)
    return tmp_path, images, labels


def write_md5sums(root: Path, override: dict[str, str] | None = None) -> None:
    lines = []
    for name in (MNIST_IMAGES, MNIST_LABELS):
        digest = hashlib.md5((root / name).read_bytes()).hexdigest()
        lines.append(f"{(override or {}).get(name, digest)}  {name}")
    (root / "MD5SUMS").write_text("\n".join(lines) + "\n")


def test_load_mnist_idx_roundtrip(fake_mnist):
    root, images, labels = fake_mnist
    x, y = load_mnist_idx(root)
    assert x.dtype == torch.uint8 and x.shape == (6, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (6,)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_load_mnist_idx_checks_md5(fake_mnist):
    root, _, _ = fake_mnist
    write_md5sums(root)
    load_mnist_idx(root)  # matching sums pass
    write_md5sums(root, {MNIST_IMAGES: "0" * 32})
    with pytest.raises(ChecksumError, match="MD5"):
        load_mnist_idx(root)


def test_load_mnist_idx_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        load_mnist_idx(tmp_path / "nowhere")


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="10"):
        read_idx(truncated)


def test_mnist_split_shapes_and_normalisation(fake_mnist):
    root, images, _ = fake_mnist
    train, heldout = mnist_split(root, train_size=4)
    assert train.tensors[0].shape == (4, 1, 28, 28) and heldout.tensors[0].shape == (2, 1, 28, 28)
    assert train.tensors[0].dtype == torch.float32
    expected = (images[5].astype(np.float32) / 255 - 0.1307) / 0.3081
    assert np.allclose(heldout.tensors[0][1, 0].numpy(), expected, atol=1e-6)
    raw, _ = mnist_split(root, normalize=False, train_size=4)
    assert float(raw.tensors[0].max()) <= 1.0


def test_digits_split_shapes():
    pytest.importorskip("sklearn")
    train, heldout = digits_split(seed=0)
    assert train.tensors[0].shape == (1400, 1, 8, 8) and heldout.tensors[0].shape == (397, 1, 8, 8)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert abs(float(train.tensors[0].mean())) < 1e-4
    assert abs(float(train.tensors[0].std()) - 1.0) < 1e-3
    again, _ = digits_split(seed=0)
    assert torch.equal(train.tensors[0], again.tensors[0])
    other, _ = digits_split(seed=1)
    assert not torch.equal(train.tensors[1], other.tensors[1])


def test_loader_is_seeded():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    first = [b[0].tolist() for b in loader(data, batch_size=10, shuffle=True, seed=3)]
    second = [b[0].tolist() for b in loader(data, batch_size=10, shuffle=True, seed=3)]
    assert first == second and first[0] != list(range(10))


def test_demo_quick_writes_plot(tmp_path, capsys):
    from autobasin.demo import main

    out = main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "barrier.png").is_file()
    assert out["weight"].barrier <= out["naive"].barrier
    printed = capsys.readouterr().out
    assert "held-out loss barrier" in printed and "barrier.png" in printed
