"""Statistics over data sharded across torch.distributed ranks.

Under ``torchrun`` with an initialised default process group of more than one
process, autobasin's data-driven functions treat each rank's ``data`` as its
shard: they accumulate their sums and counts locally, combine them here with
``torch.distributed`` collectives (all-reduce of sums, a broadcast of what is
solved once), and every rank returns the same result, equal to one process
given every rank's batches. Without a process group (or with one process) every
function here is the identity, so single-process code pays nothing.

We build on ``torch.distributed`` rather than a scheduler of our own: it is what
a PyTorch user already launches (``torchrun``), and gloo (CPU) and NCCL (GPU)
come with it. Collectives run on the tensors' device, except that a gloo group
gets CPU copies (gloo reduces CUDA tensors only for some ops).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch

__all__ = ["world", "rank", "is_main", "all_sum", "all_sum_floats", "all_gather_objects", "broadcast", "shard",
           "lockstep", "average_gradients", "mean_over_ranks", "ShardError", "require_every_rank"]


class ShardError(ValueError):
    """A rank's shard cannot take part (e.g. it holds no batch); raised on every rank."""


def world() -> tuple[int, int] | None:
    """``(rank, world size)`` when a default process group of 2+ processes is
    initialised, else None."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


def rank() -> int:
    w = world()
    return w[0] if w else 0


def is_main() -> bool:
    """True on rank 0, and without a process group: the process that writes files."""
    return rank() == 0


def _device_for(t: torch.Tensor) -> torch.device:
    import torch.distributed as dist
    return torch.device("cpu") if dist.get_backend() == "gloo" else t.device


def all_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over ranks, as new tensors on each input's device and dtype
    (the inputs are not modified). Without a process group: the inputs."""
    if world() is None:
        return list(tensors)
    import torch.distributed as dist
    out = []
    for t in tensors:
        buf = t.detach().to(_device_for(t), copy=True).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out.append(buf.to(t.device))
    return out


def all_sum_floats(*values: float) -> list[float]:
    """Sums over ranks of a few numbers (float64)."""
    if world() is None:
        return [float(v) for v in values]
    total, = all_sum(torch.tensor([float(v) for v in values], dtype=torch.float64))
    return total.tolist()


def mean_over_ranks(value: float) -> float:
    """The mean of a number over ranks (the number itself without a process group)."""
    w = world()
    if w is None:
        return float(value)
    total, = all_sum_floats(value)
    return total / w[1]


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object; tensors come back on
    the CPU). Without a process group: ``obj``."""
    if world() is None:
        return obj
    import torch.distributed as dist
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects). Without a process
    group: ``[obj]``."""
    if world() is None:
        return [obj]
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def lockstep(data: Iterable) -> Iterator:
    """The items of ``data`` while every rank still has one: ranks whose shards differ
    in length take the same number of steps (one collective per item). Without a
    process group: every item."""
    if world() is None:
        yield from data
        return
    size = world()[1]
    end = object()
    items = iter(data)
    while True:
        item = next(items, end)
        have, = all_sum_floats(0.0 if item is end else 1.0)
        if have < size:
            return
        yield item


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over ranks (a missing gradient
    counts as zero), as DistributedDataParallel does. No-op without a process group."""
    w = world()
    if w is None:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, total in zip(params, all_sum(*grads)):
        p.grad = total / w[1]


def require_every_rank(ok: bool, what: str) -> None:
    """Raise :class:`ShardError` on every rank unless ``ok`` holds on all of them
    (so no rank is left waiting in a collective its peers skipped)."""
    w = world()
    if w is None:
        return
    flags = torch.zeros(w[1], dtype=torch.float64)
    flags[w[0]] = 1.0 if ok else 0.0
    flags, = all_sum(flags)
    missing = [r for r in range(w[1]) if flags[r] == 0]
    if missing:
        raise ShardError(f"rank(s) {missing} of {w[1]}: {what}")


class shard:
    """Every ``size``-th batch of ``data``, starting at ``rank``: one rank's share of
    a batch stream that every rank can read (the command line's ``--data``).
    Re-iterable when ``data`` is. Without a process group: every batch."""

    def __init__(self, data: Iterable, rank_and_size: Sequence[int] | None = None):
        self.data = data
        self.where = tuple(rank_and_size) if rank_and_size is not None else world()

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.data):
            if self.where is None or i % self.where[1] == self.where[0]:
                yield batch

    def __len__(self) -> int:
        n = len(self.data)  # TypeError for an unsized stream, as len() should
        if self.where is None:
            return n
        r, size = self.where
        return len(range(r, n, size))
