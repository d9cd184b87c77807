"""Shape ops: reshape family, axis permutations, concat/split, indexing,
expansion. They move axes around without touching entries, so they relate
symbols rather than constrain them; a reshape that merges or splits axes
refines them as a row-major product (channels = heads x head_dim,
conv features -> flatten -> Linear)."""
from __future__ import annotations

import operator

import torch
from torch import nn

from ..registry import ALL, PERMUTATION, rule
from ...trace import OutputFields
from .common import broadcast_along_last, norm_dim, pair_axes


def reshape_layout(ctx, lay: list[int], in_shape, out_shape) -> list[int]:
    """Layout of a row-major reshape from ``in_shape`` to ``out_shape``."""
    out: list[int | None] = [None] * len(out_shape)
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i < n_in and in_shape[i] == 1:
            i += 1
            continue
        if j < n_out and out_shape[j] == 1:
            out[j] = ctx.new(1)
            j += 1
            continue
        if i >= n_in or j >= n_out:
            raise ValueError(f"cannot match reshape {in_shape} -> {out_shape}")
        a, b = [i], [j]
        pa, pb = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                a.append(i)
                pa *= in_shape[i]
                i += 1
            else:
                b.append(j)
                pb *= out_shape[j]
                j += 1
        ins = [lay[k] for k in a]
        in_sizes = [in_shape[k] for k in a]
        out_sizes = [out_shape[k] for k in b]
        if len(a) == 1:
            kids = ctx.refine_product(ins[0], out_sizes)
        else:
            merged = ctx.new(pa)
            for k, s in zip(ctx.refine_product(merged, in_sizes), ins):
                ctx.union(k, s)
            kids = ctx.refine_product(merged, out_sizes) if len(b) > 1 else [merged]
        for k, s in zip(b, kids):
            out[k] = s
    return out  # type: ignore[return-value]


@rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
      "squeeze_", "unsqueeze_", torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
      torch.unflatten, nn.Flatten, nn.Unflatten, torch.ravel, "ravel", torch.atleast_2d, kinds=ALL)
def reshape_rule(ctx):
    x = ctx.args[0]
    return reshape_layout(ctx, ctx.layout(x), ctx.shape(x), ctx.shape())


@rule("permute", torch.permute, "transpose", torch.transpose, "transpose_", "swapaxes",
      torch.swapaxes, "swapdims", torch.swapdims, "t", torch.t, "movedim", torch.movedim,
      "moveaxis", torch.moveaxis, torch.Tensor.permute, kinds=ALL)
def permute_rule(ctx):
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    nd = len(lay)
    name = ctx.op_name
    if name == "permute":
        dims = ctx.value(list(ctx.args[1:])) if len(ctx.args) > 1 else ctx.value(ctx.kwargs["dims"])
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [lay[norm_dim(d, nd)] for d in dims]
    if name in ("t", "numpy_T"):
        return lay[::-1]
    if name in ("movedim", "moveaxis"):
        src, dst = ctx.value(ctx.arg(1, "source")), ctx.value(ctx.arg(2, "destination"))
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [norm_dim(d, nd) for d in src]
        dst = [norm_dim(d, nd) for d in dst]
        order = [None] * nd
        for s, d in zip(src, dst):
            order[d] = s
        rest = iter(i for i in range(nd) if i not in src)
        order = [o if o is not None else next(rest) for o in order]
        return [lay[o] for o in order]
    a, b = ctx.value(ctx.arg(1, "dim0")), ctx.value(ctx.arg(2, "dim1"))
    a, b = norm_dim(a, nd), norm_dim(b, nd)
    lay[a], lay[b] = lay[b], lay[a]
    return lay


@rule(getattr, kinds=ALL)
def _getattr(ctx):
    x, attr = ctx.args[0], ctx.args[1]
    lay = ctx.layout(x)
    if attr in ("T", "mT", "mH", "H"):
        return lay[::-1] if attr in ("T", "H") else lay[:-2] + [lay[-1], lay[-2]]
    if attr in ("data", "real", "imag"):  # a complex tensor's parts: entry by entry
        return list(lay)
    if attr in ("values", "indices") and isinstance(lay, list) and len(lay) == 2 \
            and not hasattr(ctx.meta(x), "shape"):  # torch.return_types: (values, indices)
        return lay[{"values": 0, "indices": 1}[attr]]
    if isinstance(lay, dict):  # a field of a dataclass or ModelOutput
        if attr not in lay:
            # a field left unset (None on the example inputs, as ModelOutput
            # leaves hidden_states when not asked for): nothing to carry
            if ctx.node in ctx.engine.meta and ctx.engine.meta[ctx.node] is None:
                return None
            raise ValueError(f"field {attr!r} of a traced container")
        return lay[attr]
    if lay is not None and hasattr(ctx.meta(), "shape"):
        raise ValueError(f"attribute {attr!r}")
    return None


@rule(torch.cat, torch.concat, torch.concatenate, kinds=ALL)
def _cat(ctx):
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    dim = ctx.value(ctx.arg(1, "dim", 0))
    out_shape = ctx.shape()
    dim = norm_dim(dim, len(out_shape))
    tensors = [t for t in tensors if len(ctx.shape(t)) == len(out_shape)]
    layouts = [ctx.layout(t) for t in tensors]
    out = []
    for axis in range(len(out_shape)):
        if axis == dim:
            o = ctx.new(out_shape[axis])
            kids = ctx.refine_concat(o, [ctx.shape(t)[axis] for t in tensors])
            for k, lay in zip(kids, layouts):
                ctx.union(k, lay[axis])
            out.append(o)
        else:
            for lay in layouts[1:]:
                ctx.union(layouts[0][axis], lay[axis])
            out.append(layouts[0][axis])
    return out


@rule(torch.stack, kinds=ALL)
def _stack(ctx):
    tensors = list(ctx.arg(0, "tensors"))
    dim = ctx.value(ctx.arg(1, "dim", 0))
    out_shape = ctx.shape()
    dim = norm_dim(dim, len(out_shape))
    layouts = [ctx.layout(t) for t in tensors]
    for lay in layouts[1:]:
        for a, b in zip(layouts[0], lay):
            ctx.union(a, b)
    # the stacked axis is a concat of size-1 pieces: fixed, but cuttable again
    o = ctx.new(len(tensors))
    ctx.refine_concat(o, [1] * len(tensors))
    return layouts[0][:dim] + [o] + layouts[0][dim:]


@rule(torch.nn.utils.rnn.pad_sequence, *([torch._C._nn.pad_sequence] if hasattr(torch._C._nn, "pad_sequence") else []),
      kinds=ALL)
def _pad_sequence(ctx):
    """``pad_sequence(seqs, batch_first, padding_value)``: sequences of different
    lengths (their first axis) padded with a constant to the longest and
    stacked. The other axes of every sequence are one axis each (a constant
    pad keeps any map of them that fixes the pad value: a permutation); the
    lengths and the stacking axis are positions, fixed."""
    seqs = list(ctx.arg(0, "sequences"))
    batch_first = bool(ctx.value(ctx.arg(1, "batch_first", False)))
    pad = ctx.value(ctx.arg(2, "padding_value", 0.0))
    layouts = [ctx.layout(t) for t in seqs]
    for lay in layouts:
        ctx.block(lay[0], "padded to the longest sequence")
        for a, b in zip(layouts[0][1:], lay[1:]):
            ctx.union(a, b)
    out_shape = ctx.shape()
    n, length = (out_shape[0], out_shape[1]) if batch_first else (out_shape[1], out_shape[0])
    stacked = ctx.new(n, "sequences stacked")
    longest = ctx.new(length, "padded to the longest sequence")
    rest = list(layouts[0][1:])
    if pad not in (0, 0.0, None):
        for a in rest:  # a non-zero pad value: only permutations keep it in place
            ctx.restrict(a, PERMUTATION, "padded with a constant")
    return ([stacked, longest] if batch_first else [longest, stacked]) + rest


def split_outputs(ctx, x, dim, lengths, keep_dim=True):
    lay = list(ctx.layout(x))
    pieces = ctx.cut(lay, dim, lengths)
    if keep_dim:
        return pieces
    return [p[:dim] + p[dim + 1:] for p in pieces]


@rule(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split",
      torch.split_with_sizes, "split_with_sizes", kinds=ALL)
def _split(ctx):
    x = ctx.args[0]
    name = ctx.op_name
    default = 0
    dim = ctx.value(ctx.arg(2, "dim", default))
    outs = ctx.meta()
    dim = norm_dim(dim, len(ctx.shape(x)))
    lengths = [o.shape[dim] for o in outs]
    del name
    return split_outputs(ctx, x, dim, lengths)


@rule(torch.unbind, "unbind", kinds=ALL)
def _unbind(ctx):
    x = ctx.args[0]
    dim = norm_dim(ctx.value(ctx.arg(1, "dim", 0)), len(ctx.shape(x)))
    n = ctx.shape(x)[dim]
    return split_outputs(ctx, x, dim, [1] * n, keep_dim=False)


@rule("narrow", torch.narrow, kinds=ALL)
def _narrow(ctx):
    x = ctx.args[0]
    shape = ctx.shape(x)
    dim = norm_dim(ctx.value(ctx.arg(1, "dim")), len(shape))
    start = ctx.value(ctx.arg(2, "start"))
    length = ctx.value(ctx.arg(3, "length"))
    if start is None:  # narrow.Tensor: a start the graph computes; which positions is unknown
        lay = list(ctx.layout(x))
        why = "narrowed at a start computed in the graph"
        ctx.block(lay[dim], why)
        return lay[:dim] + [ctx.new(ctx.shape()[dim], why)] + lay[dim + 1:]
    start = start % shape[dim] if start < 0 else start
    return split_outputs(ctx, x, dim, [start, length, shape[dim] - start - length])[1]


@rule("select", torch.select, kinds=ALL)
def _select(ctx):
    x = ctx.args[0]
    shape = ctx.shape(x)
    dim = norm_dim(ctx.value(ctx.arg(1, "dim")), len(shape))
    i = ctx.value(ctx.arg(2, "index")) % shape[dim]
    return _select_axis(ctx, list(ctx.layout(x)), shape, dim, i)


def strided_slice(ctx, lay, shape, dim, start, stop, step) -> list[int]:
    """Layout of ``x[..., start:stop:step]`` along ``dim`` (step > 1). When it
    takes one offset of every block of ``step`` (``x[..., 0::2]``: interleaved
    gate and up projections), the axis is a grid (n / step, step) and the
    slice selects one column of it: rows permute together across every such
    slice. Anything else fixes the axis."""
    n = shape[dim]
    if n % step == 0 and start < step and len(range(start, stop, step)) == n // step:
        kids = ctx.refine_product(lay[dim], [n // step, step])
        grid = list(lay[:dim]) + list(kids) + list(lay[dim + 1:])
        return _select_axis(ctx, grid, (*shape[:dim], n // step, step, *shape[dim + 1:]), dim + 1, start)
    ctx.block(lay[dim], "strided slice")
    out = list(lay)
    out[dim] = ctx.new(len(range(start, stop, step)), "strided slice")
    return out


def _select_axis(ctx, lay, shape, dim, i):
    n = shape[dim]
    pieces = ctx.distribute(lay, dim, [1] * n) if n > 1 else None
    if pieces is not None:
        p = pieces[i]
    else:
        p = ctx.cut(lay, dim, [i, 1, n - i - 1])[1]
    return p[:dim] + p[dim + 1:]


@rule(operator.getitem, kinds=ALL)
def _getitem(ctx):
    x, idx = ctx.args[0], ctx.args[1]
    lay = ctx.layout(x)
    if lay is None:
        return None
    meta = ctx.meta(x)
    if not hasattr(meta, "shape"):
        # indexing a tuple/list of tensors, or a dict by key
        i = ctx.value(idx)
        if isinstance(lay, dict):
            if isinstance(i, int) and i not in lay and isinstance(meta, OutputFields):
                # a ModelOutput indexed like a tuple: its i-th field that is set
                return lay.get(list(meta)[i])
            return lay[i]
        return lay[i] if isinstance(i, int) else list(lay[i])
    return index_tensor(ctx, x, idx)


def _literal_range(ctx, index):
    """``("literal", (positions, index))`` for an index tensor that is a
    literal list of the code (Falcon's ``fused_qkv[..., [-2], :]``); None
    otherwise. Consecutive positions index like the slice they span."""
    t = ctx.constant(index)
    if t is None or t.dim() != 1 or t.numel() == 0 or t.dtype not in (torch.int64, torch.int32):
        return None
    return ("literal", (t.tolist(), index))


def _mask_index(ctx, items, masks, shape, lay):
    """``x[..., mask, ...]`` with a boolean ``mask``: the mask consumes as many axes
    of ``x`` as it has and puts one axis of the selected entries in their place
    (as many as the mask holds True, known only at run time). Those axes of ``x``
    are fixed; the result's new axis is fixed; full slices around it pass through.
    Anything else (several masks, ints, None) fixes every axis."""
    reason = "selected by a boolean mask"
    out_shape = list(ctx.meta().shape)
    (mi,) = masks if len(masks) == 1 else (None,)
    plain = mi is not None and all(
        i == mi or (k == "value" and (v is Ellipsis or v == slice(None)))
        for i, (k, v) in enumerate(items)) and sum(
        1 for k, v in items if k == "value" and v is Ellipsis) <= 1
    if plain:
        nd = len(ctx.shape(items[mi][1]))
        explicit = sum(1 for k, v in items if not (k == "value" and v is Ellipsis)) - 1 + nd
        fill = len(shape) - explicit
        before = sum(fill if (k == "value" and v is Ellipsis) else 1 for k, v in items[:mi])
        plain = fill >= 0 and len(out_shape) == len(shape) - nd + 1
    if not plain:
        for s in lay:
            ctx.block(s, reason)
        return ctx.fresh(blocked=reason)
    mask = items[mi][1]
    n = out_shape[before]
    if before + nd == len(shape) and isinstance(n, int) and n > 0 and shape[-1] > 1 and \
            n % shape[-1] == 0 and broadcast_along_last(ctx, mask):
        # a mask equal along x's last axis (one flag per row, expanded): whole rows
        # are selected, flattened row-major, so the result is (rows, last axis)
        for s in (*lay[before:-1], *ctx.layout(mask)[:-1]):
            ctx.block(s, reason)
        ctx.union(lay[-1], ctx.layout(mask)[-1])
        out = ctx.new(n)
        rows, last = ctx.refine_product(out, [n // shape[-1], shape[-1]])
        ctx.block(rows, reason)
        ctx.union(last, lay[-1])
        return lay[:before] + [out]
    for s in lay[before:before + nd]:
        ctx.block(s, reason)
    ctx.block_layout(ctx.layout(mask), reason)
    return lay[:before] + [ctx.new(n, reason)] + lay[before + nd:]


def index_tensor(ctx, x, idx):
    shape = list(ctx.shape(x))
    lay = list(ctx.layout(x))
    if not isinstance(idx, tuple):
        idx = (idx,)
    items = []
    for it in idx:
        if ctx.is_tensor(it):
            items.append(_literal_range(ctx, it) or ("tensor", it))
        else:
            items.append(("value", ctx.value(it)))
    masks = [i for i, (k, v) in enumerate(items) if k == "tensor" and
             getattr(ctx.meta(v), "dtype", None) in (torch.bool, torch.uint8)]
    if masks:
        ctx.restrict_layout(lay, PERMUTATION, "indexed by a mask")
        return _mask_index(ctx, items, masks, shape, lay)
    n_consuming = sum(1 for k, v in items if not (k == "value" and (v is None or v is Ellipsis)))
    expanded = []
    for k, v in items:
        if k == "value" and v is Ellipsis:
            expanded += [("value", slice(None))] * (len(shape) - n_consuming)
        else:
            expanded.append((k, v))
    while sum(1 for k, v in expanded if not (k == "value" and v is None)) < len(shape):
        expanded.append(("value", slice(None)))
    axis = 0
    for i, (k, v) in enumerate(expanded):  # literal positions: a slice when consecutive
        if k == "literal":
            pos = [p % shape[axis] for p in v[0]]
            run = pos == list(range(pos[0], pos[0] + len(pos)))
            expanded[i] = ("value", slice(pos[0], pos[0] + len(pos))) if run else ("tensor", v[1])
        if not (k == "value" and v is None):
            axis += 1
    tensor_items = [v for k, v in expanded if k == "tensor"]
    if tensor_items:
        # advanced indexing: the indexed axes are fixed, the result is fixed;
        # except an axis indexed by positions along itself (experts picked by
        # a router's topk): permuting both leaves the picked entries as they are
        axis = 0
        by_position = len(tensor_items) == 1 and ctx.positions(tensor_items[0]) is not None
        for k, v in expanded:
            if k == "value" and v is None:
                continue
            if k == "tensor" and by_position:
                ctx.union(lay[axis], ctx.positions(v))
                ctx.restrict(lay[axis], PERMUTATION, "indexed by positions along it")
                ctx.consume(v)
            elif k == "tensor" or not (isinstance(v, slice) and v == slice(None)):
                ctx.block(lay[axis], "indexed by a tensor")
            axis += 1
        if all(k == "tensor" or (k == "value" and v == slice(None)) for k, v in expanded):
            # index tensors and full slices (swin's relative position bias table,
            # x[rows, cols] picking patches): the sliced axes keep their symbols;
            # the indexed ones are replaced by the indices' broadcast shape, in
            # their place when they are adjacent, else in front (numpy's rule)
            out_shape = list(ctx.meta().shape)
            where = [i for i, (k, _) in enumerate(expanded) if k == "tensor"]
            idx_nd = len(out_shape) - (len(shape) - len(where))
            adjacent = where == list(range(where[0], where[-1] + 1))
            start = where[0] if adjacent else 0
            # entries picked from positions (an axis tied to the inputs, like the
            # sequence) are positions too: structural, like what they come from
            positions = all(ctx.sym.is_structural(lay[i]) for i in where)
            mid = list(ctx.layout(tensor_items[0])) if by_position else \
                [ctx.new(n, "gathered by index", structural=positions)
                 for n in out_shape[start:start + idx_nd]]
            kept = [lay[i] for i in range(len(lay)) if i not in where]
            if adjacent:
                return lay[:where[0]] + mid + lay[where[-1] + 1:]
            return mid + kept
        # anything else: every axis of x, whatever it becomes in the result, is fixed
        for s in lay:
            ctx.block(s, "advanced indexing")
        return ctx.fresh(blocked="advanced indexing")
    lists = [i for i, (k, v) in enumerate(expanded) if isinstance(v, (list, tuple))]
    if len(lists) > 1 or (lists and any(isinstance(v, int) for _, v in expanded)):
        # several lists (or a list and an integer) index jointly, numpy's way: fixed
        for s in lay:
            ctx.block(s, "picked by lists of positions")
        return ctx.fresh(blocked="picked by lists of positions")
    ints = [i for i, (k, v) in enumerate(expanded) if isinstance(v, int) and not isinstance(v, bool)]
    if len(ints) == 1 and all(v == slice(None) for i, (k, v) in enumerate(expanded) if i != ints[0]):
        d = ints[0]
        return _select_axis(ctx, lay, shape, d, expanded[d][1] % shape[d])
    out = []
    axis = 0
    for k, v in expanded:
        if v is None:
            out.append(ctx.new(1))
            continue
        s, n = lay[axis], shape[axis]
        if isinstance(v, int):
            i = v % n
            ctx.cut([s], 0, [i, 1, n - i - 1])
            axis += 1
            continue
        if isinstance(v, (list, tuple)):  # a list of positions (x[:, [3, 1, 2]])
            pos = [int(p) % n for p in v]
            if pos and pos == list(range(pos[0], pos[0] + len(pos))):
                v = slice(pos[0], pos[0] + len(pos))
            else:
                ctx.block(s, "picked by a list of positions")
                out.append(ctx.new(len(pos), "picked by a list of positions"))
                axis += 1
                continue
        start, stop, step = v.indices(n)
        if step == 1 and start == 0 and stop == n:
            out.append(s)
        elif step == 1 and stop > start:
            out.append(ctx.cut([s], 0, [start, stop - start, n - stop])[1][0])
        else:
            out.append(strided_slice(ctx, [s], [n], 0, start, stop, step)[0])
        axis += 1
    return out


@rule("expand", "expand_as", torch.broadcast_to, "broadcast_to", kinds=ALL)
def _expand(ctx):
    """Broadcast axes hold equal entries along them: any permutation of such
    an axis leaves the tensor unchanged, so it gets a new free symbol."""
    x = ctx.args[0]
    lay, shape = ctx.layout(x), ctx.shape(x)
    out_shape = ctx.shape()
    off = len(out_shape) - len(shape)
    out = [lay[j - off] if j >= off and shape[j - off] == out_shape[j] else ctx.new(out_shape[j])
           for j in range(len(out_shape))]
    for j, s in enumerate(out):  # equal entries along it: only permutations keep them so
        if not (j >= off and shape[j - off] == out_shape[j]):
            ctx.restrict(s, PERMUTATION, "broadcast copies")
    return out


@rule("repeat", "tile", torch.tile, kinds=ALL)
def _repeat(ctx):
    x = ctx.args[0]
    lay, shape = ctx.layout(x), ctx.shape(x)
    out_shape = ctx.shape()
    off = len(out_shape) - len(shape)
    out = []
    for j, n in enumerate(out_shape):
        if j < off:
            out.append(ctx.new(n))
            ctx.restrict(out[-1], PERMUTATION, "repeated copies")
            continue
        s, m = lay[j - off], shape[j - off]
        if m == n:
            out.append(s)
            continue
        o = ctx.new(n)
        kids = ctx.refine_product(o, [n // m, m])
        ctx.union(kids[1], s)
        ctx.restrict(kids[0], PERMUTATION, "repeated copies")
        out.append(o)
    return out


@rule("repeat_interleave", torch.repeat_interleave, kinds=ALL)
def _repeat_interleave(ctx):
    x = ctx.args[0]
    repeats = ctx.arg(1, "repeats")
    dim = ctx.value(ctx.arg(2, "dim"))
    if dim is None:
        raise ValueError("repeat_interleave without dim flattens its input")
    lay, shape = list(ctx.layout(x)), ctx.shape(x)
    dim = norm_dim(dim, len(shape))
    reps = None if ctx.is_tensor(repeats) else ctx.value(repeats)
    if not isinstance(reps, int):
        # a count per position (durations expanding phonemes into frames): the
        # axis's positions each become a run of their own length, so the axis is
        # fixed and the result's is new; the other axes pass through
        ctx.block(lay[dim], "repeated by a tensor of counts")
        lay[dim] = ctx.new(ctx.shape()[dim], "repeated by a tensor of counts")
        return lay
    o = ctx.new(shape[dim] * reps)
    kids = ctx.refine_product(o, [shape[dim], reps])
    ctx.union(kids[0], lay[dim])
    ctx.restrict(kids[1], PERMUTATION, "repeated copies")
    lay[dim] = o
    return lay


@rule("index_select", torch.index_select, torch.gather, "gather")
def _index_select(ctx):
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    dim = norm_dim(ctx.value(ctx.arg(1, "dim")), len(lay))
    index = ctx.arg(2, "index")
    if ctx.target in (torch.gather, "gather") and ctx.positions(index) is not None:
        # x.gather(dim, topk_idx): the values at positions along x's own axis
        # (a router's weights of its chosen experts). Permuting that axis
        # renumbers the positions with it: the result is unchanged. The other
        # axes pair up with the index's (gather needs them no longer).
        idx_lay, idx_shape, shape = ctx.layout(index), ctx.shape(index), ctx.shape(x)
        ctx.union(lay[dim], ctx.positions(index))
        ctx.consume(index)
        pair_axes(ctx, lay, shape, idx_lay, idx_shape, dim, "gathered in part")
        return list(idx_lay)
    if ctx.target not in (torch.gather, "gather") and ctx.positions(index) is not None:
        ctx.union(lay[dim], ctx.positions(index))  # picked by positions along itself
        ctx.consume(index)
        out = list(lay)
        out[dim] = ctx.layout(index)[0]
        return out
    ctx.block(lay[dim], "indexed by a tensor")
    if ctx.target in (torch.gather, "gather"):
        # out[p] = x[p with p[dim] = index[p]]: along every other axis x, the
        # index and the result go together (an index expanded over the hidden
        # axis, picking tokens, leaves that axis free); along dim the result
        # follows the index, and x's axis is fixed
        idx_lay, idx_shape, shape = ctx.layout(index), ctx.shape(index), ctx.shape(x)
        pair_axes(ctx, lay, shape, idx_lay, idx_shape, dim, "gathered in part")
        return list(idx_lay)
    out = list(lay)
    out[dim] = ctx.new(ctx.shape()[dim], "indexed by a tensor",
                       structural=ctx.sym.is_structural(lay[dim]))  # positions picked: positions
    return out


@rule("index_add", torch.index_add, "index_add_", "index_copy", torch.index_copy, "index_copy_")
def _index_add(ctx):
    """``index_add(x, dim, index, source)``: rows of ``source`` are added to the
    rows of ``x`` that ``index`` names (the dispatch of a sparse mixture of
    experts); ``index_copy`` writes them there instead. Axis ``dim`` of both
    is fixed; the others are one axis each."""
    x, source = ctx.args[0], ctx.arg(3, "source")
    lay, src = list(ctx.layout(x)), list(ctx.layout(source))
    dim = norm_dim(ctx.value(ctx.arg(1, "dim")), len(lay))
    ctx.block(lay[dim], "indexed by a tensor")
    ctx.block(src[dim], "indexed by a tensor")
    ctx.block_layout(ctx.layout(ctx.arg(2, "index")), "index")
    for j, (a, b) in enumerate(zip(lay, src)):
        if j != dim:
            ctx.union(a, b)
    return lay


@rule(operator.setitem)
def _setitem(ctx):
    """``x[idx] = v`` writes ``v`` into a slice of ``x`` in place: ``v`` must
    be permuted as that slice is (broadcasting like an elementwise op)."""
    x, idx, v = ctx.args[0], ctx.args[1], ctx.args[2]
    if not ctx.is_tensor(x):
        raise ValueError("setitem on a non-tensor")
    slice_lay = index_tensor(ctx, x, idx)
    if ctx.is_tensor(v):
        lv, sv = ctx.layout(v), ctx.shape(v)
        target = _slice_shape(ctx, x, idx)
        off = len(target) - len(sv)
        for j, (s, n) in enumerate(zip(lv, sv)):
            k = j + off
            if k >= 0 and n == target[k] and n > 1:
                ctx.union(s, slice_lay[k])
    return None


def _slice_shape(ctx, x, idx):
    shape = ctx.shape(x)
    probe = torch.empty(shape, device="meta")
    return tuple(probe[ctx.value(idx)].shape)


@rule("as_strided", torch.as_strided)
def _as_strided(ctx):
    """``as_strided(x, size, stride, offset)`` (Longformer's overlapping chunks).

    When ``x``'s entries fill their memory without gaps or overlaps (any axis
    order), each axis ``j`` of ``x`` is one digit of the memory position:
    ``(pos // stride_j) % size_j``. Entry ``i`` of the view reads position
    ``offset + sum_k i_k stride_k``. A view axis ``k`` *is* axis ``j`` when it
    has ``j``'s size and stride and every other term (the offset from ``x``'s
    first entry, the other axes' steps) either moves whole blocks of ``j``
    (a multiple of ``size_j * stride_j``) or stays, summed at its largest,
    below ``stride_j``: then the view's index along ``k`` is ``x``'s index
    along ``j`` whatever the others are, and permuting ``j`` permutes ``k``
    the same way. Every other axis of both (overlapping windows of positions)
    is fixed."""
    x = ctx.args[0]
    lay, shape = list(ctx.layout(x)), list(ctx.shape(x))
    meta = ctx.meta(x)
    size = list(ctx.shape())  # the result's (a size may be computed as a tensor)
    stride = ctx.value(ctx.arg(2, "stride"))
    offset = ctx.value(ctx.arg(3, "storage_offset", None))
    reason = "as_strided views positions along the axis"
    out: list = [None] * len(size)
    matched: set[int] = set()
    xstride = getattr(meta, "stride", None)
    # the view's first entry, counted from x's (as_strided's offset is the storage's)
    base = int(offset) - meta.offset if offset is not None and xstride is not None else 0
    if stride is not None and None not in stride and xstride is not None and base >= 0 \
            and _dense(shape, xstride):
        stride = [int(v) for v in stride]
        for k, (n, st) in enumerate(zip(size, stride)):
            for j, (m, xs) in enumerate(zip(shape, xstride)):
                if j in matched or m != n or n <= 1 or xs != st:
                    continue
                block = xs * m
                low = base % block
                for q, (nq, sq) in enumerate(zip(size, stride)):
                    if q != k and nq > 1 and sq % block:
                        low += sq * (nq - 1)  # a step inside the entries of axis j
                if low < xs:
                    out[k] = lay[j]
                    matched.add(j)
                    break
    for j, s in enumerate(lay):
        if j not in matched:
            ctx.block(s, reason)
    return [s if s is not None else ctx.new(n, reason) for s, n in zip(out, size)]


def _dense(shape, stride) -> bool:
    """Whether a tensor of these sizes and strides covers a block of memory
    once: in increasing stride, each stride the product of the sizes before."""
    step = 1
    for st, n in sorted((st, n) for st, n in zip(stride, shape) if n > 1):
        if st != step:
            return False
        step *= n
    return True


@rule(torch.nn.functional.one_hot, "one_hot", kinds=ALL)
def _one_hot(ctx):
    """``one_hot(idx, num_classes)``: a new last axis of classes. When ``idx`` holds
    positions along an axis (argmax or topk over it: a router's choice of expert)
    and there is one class per position, the classes are that axis: permuting it
    renumbers the positions and moves the ones with it. Otherwise the classes are
    what the numbers mean: structural."""
    idx = ctx.arg(0, "input")
    n = ctx.shape()[-1]
    s = ctx.positions(idx)
    if s is not None and ctx.size[s] == n:
        ctx.restrict(s, PERMUTATION, "one-hot of positions along it")
        ctx.consume(idx)
        return list(ctx.layout(idx)) + [s]
    return list(ctx.layout(idx)) + [ctx.new(n, "one-hot classes", structural=True)]
