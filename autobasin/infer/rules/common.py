"""Helpers shared by rule families."""
from __future__ import annotations

from ..engine import Context


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def broadcast(ctx: Context, tensors: list, out_shape: tuple[int, ...]) -> list[int]:
    """Output layout of a broadcasting op: axes of equal non-trivial size are
    the same axis; size-1 axes broadcast and constrain nothing."""
    out = []
    nd = len(out_shape)
    for j in range(nd):
        size = out_shape[j]
        syms = []
        for t in tensors:
            lay, shape = ctx.layout(t), ctx.shape(t)
            k = j - (nd - len(shape))
            if k >= 0 and shape[k] == size:
                syms.append(lay[k])
        if not syms or size <= 1:
            out.append(ctx.new(size))
            continue
        for s in syms[1:]:
            ctx.union(syms[0], s)
        out.append(syms[0])
    return out


def first_tensor(ctx: Context):
    for a in list(ctx.args) + list(ctx.kwargs.values()):
        if ctx.is_tensor(a):
            return a
    raise ValueError("no tensor argument")
