"""Helpers shared by rule families."""
from __future__ import annotations

import torch.fx as fx

from ...trace import op_name_of
from ..context import VALUE_COPIES, Context, is_tensor_meta


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def broadcast_layouts(ctx: Context, operands: list[tuple[list[int], tuple[int, ...]]],
                      out_shape) -> list[int]:
    """Output layout of a broadcast over ``(layout, shape)`` operands: axes of
    equal non-trivial size are the same axis; size-1 axes broadcast and
    constrain nothing."""
    out = []
    nd = len(out_shape)
    for j, size in enumerate(out_shape):
        syms = []
        for lay, shape in operands:
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


def carriers(operands: list[tuple[list[int], tuple[int, ...]]], out_shape) -> list[int]:
    """For each output axis, how many ``(layout, shape)`` operands carry it
    (have it at full, non-trivial length rather than broadcast)."""
    nd = len(out_shape)
    return [sum(1 for _, shape in operands
                if j - (nd - len(shape)) >= 0 and shape[j - (nd - len(shape))] == size > 1)
            for j, size in enumerate(out_shape)]


def admit_sum(ctx: Context, operands, out: list[int], out_shape, constant: bool = False) -> None:
    """Kinds of a sum of broadcast operands: an axis every operand carries is
    mapped linearly (any kind); one an operand (or a nonzero ``constant``)
    broadcasts along adds a constant vector, which only permutations keep."""
    n = len(operands) + (1 if constant else 0)
    for s, c in zip(out, carriers(operands, out_shape)):
        if 0 < c < n:
            ctx.restrict(s, {"permutation"}, "a term broadcast along the axis")


def admit_product(ctx: Context, operands, out: list[int], out_shape) -> None:
    """Kinds of an elementwise product: an axis one factor carries is scaled
    linearly (any kind); one two factors carry is multiplied entry by entry,
    which only permutations keep."""
    for s, c in zip(out, carriers(operands, out_shape)):
        if c > 1:
            ctx.restrict(s, {"permutation"}, "entries of two factors multiplied")


def broadcast(ctx: Context, tensors: list, out_shape: tuple[int, ...]) -> list[int]:
    """:func:`broadcast_layouts` over tensor argument nodes."""
    return broadcast_layouts(ctx, [(ctx.layout(t), ctx.shape(t)) for t in tensors], out_shape)


def pair_axes(ctx: Context, lay, shape, other_lay, other_shape, skip: int, reason: str) -> None:
    """Relate two tensors' axes position by position, all but ``skip`` (an
    index and the tensor it gathers from or scatters into): an axis of equal
    length is one axis; one that ``other`` covers only in part is fixed, in
    both (the entries the index reaches keep their places, so the index's axis
    cannot move without the other's)."""
    for j, (a, b) in enumerate(zip(lay, other_lay)):
        if j == skip:
            continue
        if other_shape[j] == shape[j]:
            ctx.union(a, b)
        else:
            ctx.block(a, reason)
            ctx.block(b, reason)


def first_tensor(ctx: Context):
    for a in list(ctx.args) + list(ctx.kwargs.values()):
        if ctx.is_tensor(a):
            return a
    raise ValueError("no tensor argument")


def broadcast_along_last(ctx: Context, node, depth: int = 8) -> bool:
    """Is ``node`` equal along its last axis whatever the values: length 1
    there (it broadcasts), or an expand of such a tensor, through casts and
    copies? (fx method calls and ATen ops alike.)"""
    return broadcast_along(ctx, node, -1, depth)


def broadcast_along(ctx: Context, node, axis: int, depth: int = 8) -> bool:
    """Is ``node`` equal along ``axis`` (counted from the end: -1 the last)
    whatever the values: length 1 there, or an expand of a tensor that has
    length 1 there or lacks that axis, through casts and copies?"""
    def shape(n):
        m = ctx.meta(n) if isinstance(n, fx.Node) else None
        return tuple(m.shape) if is_tensor_meta(m) else None

    for _ in range(depth):
        out = shape(node)
        if out is None or -axis > max(len(out), 1):
            return False
        if len(out) == 0 or out[axis] == 1:
            return True
        if node.op not in ("call_function", "call_method"):
            return False
        name = op_name_of(node.target)
        if name in ("expand", "expand_as", "broadcast_to"):
            src = shape(node.args[0])
            return src is not None and (len(src) < -axis or src[axis] == 1)
        if name not in VALUE_COPIES:
            return False
        node = node.args[0]
    return False
