"""ATen ops, as torch.export captures them.

Most ATen ops take the same positional arguments as the torch function that
calls them (``aten.conv2d`` is ``F.conv2d``, ``aten.mean.dim`` is
``torch.mean``): those are aliases, served by the function's rule
(:func:`~autobasin.infer.registry.alias`). Elementwise, reshape and axis-order
ops are registered to the shared rules directly. The rest, whose arguments
differ (``aten.embedding(weight, indices)``, ``aten.slice.Tensor``,
``aten.index.Tensor``, ``aten.addmm``, the ``native_*`` norms that return
statistics too), have rules here. An ATen op that appears nowhere in this
file has no rule and fails closed like any other op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import ALL, PERMUTATION, alias, rule
from .common import broadcast_along, broadcast_along_last, broadcast_layouts, norm_dim, pair_axes
from .elementwise import elementwise_rule, constant_like, unary_rule
from .linear import bilinear_rule, conv_rule, embedding_bag_rule, embedding_rule
from .norm import group_norm_rule, layer_norm_rule, per_channel
from .shape import index_tensor, permute_rule, reshape_rule, split_outputs, strided_slice

aten = torch.ops.aten


def _ops(*names: str) -> list:
    """The ATen op packets of these names that this torch has."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


# ------------------------------------------------------------- elementwise
_ELEMENTWISE = (
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
    "float_power", "maximum", "minimum", "fmax", "fmin", "where", "lerp", "addcmul", "addcdiv",
    "masked_fill", "clamp", "clamp_min", "clamp_max", "clip", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or",
    "bitwise_xor", "bitwise_not", "__and__", "__or__", "__xor__", "__invert__", "atan2",
    "hypot", "copysign", "xlogy", "multiply", "divide", "subtract", "greater", "greater_equal",
    "less", "less_equal", "not_equal", "arctan2", "absolute", "negative",
    "relu", "relu6", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "leaky_relu", "elu", "selu", "celu", "softplus", "softshrink", "hardshrink",
    "log_sigmoid", "threshold", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt",
    "rsqrt", "abs", "neg", "sign", "sgn", "square", "reciprocal", "erf", "erfc", "erfinv", "sin",
    "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "floor",
    "ceil", "round", "trunc", "frac", "nan_to_num", "isnan", "isinf", "isfinite", "logit",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "dropout", "feature_dropout",
    "alpha_dropout", "fill", "polar", "complex",
)
# in-place forms (``x.add_(y)``, ``x.masked_fill_(m, v)``) write the result into
# their first argument, whose layout the broadcast already shares
rule(*_ops(*_ELEMENTWISE, *(name + "_" for name in _ELEMENTWISE), "copy_", "zero_"))(elementwise_rule)
# the first tensor's layout only: casts, copies, views of the whole tensor
rule(*_ops("to", "_to_copy", "clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy",
           "type_as", "_to_dim_order_copy", "real", "imag", "conj", "_conj", "resolve_conj", "resolve_neg",
           "conj_physical", "angle"))(unary_rule)


# complex views (complex RoPE, e.g. Llama 4): a complex tensor's real view has one more
# axis, (real, imaginary); that axis has a meaning, so it is never permuted
@rule(*_ops("view_as_real", "view_as_real_copy"), torch.view_as_real)
def _view_as_real(ctx):
    return [*ctx.layout(ctx.args[0]), ctx.new(2, "real and imaginary parts", structural=True)]


@rule(*_ops("view_as_complex", "view_as_complex_copy"), torch.view_as_complex)
def _view_as_complex(ctx):
    lay = list(ctx.layout(ctx.args[0]))
    ctx.block(lay[-1], "real and imaginary parts", structural=True)
    return lay[:-1]
# tensors of one value everywhere: any permutation leaves them as they are
rule(*_ops("zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones",
           "new_full", "new_empty", "zeros", "ones", "full", "empty", "scalar_tensor"))(constant_like)

# ---------------------------------------------------------- shapes and order
rule(*_ops("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten",
           "view_copy", "ravel", "reshape_as", "view_as"))(reshape_rule)
rule(*_ops("permute", "transpose", "swapaxes", "swapdims", "t", "numpy_T", "movedim",
           "moveaxis"))(permute_rule)
for _name, _fn in [("expand", "expand"), ("expand_as", "expand_as"), ("index_add", "index_add"),
                   ("index_add_", "index_add"), ("index_copy", "index_add"),
                   ("index_copy_", "index_add"), ("repeat", "repeat"), ("repeat_interleave", "repeat_interleave"),
                   ("narrow", "narrow"), ("select", "select"), ("unbind", "unbind"),
                   ("split", "split"), ("split_with_sizes", "split"), ("chunk", "chunk"),
                   ("tensor_split", "tensor_split"), ("index_select", "index_select"),
                   ("unfold", "unfold"), ("as_strided", "as_strided")]:
    if hasattr(aten, _name):
        alias(getattr(aten, _name), _fn)
for _name, _fn in [("cat", torch.cat), ("pad_sequence", torch.nn.utils.rnn.pad_sequence),
                   ("concat", torch.cat), ("concatenate", torch.cat),
                   ("stack", torch.stack), ("tile", torch.tile),
                   ("gather", torch.gather), ("roll", torch.roll), ("flip", torch.flip),
                   ("diff", torch.diff), ("tril", torch.tril), ("triu", torch.triu),
                   ("rot90", torch.rot90), ("cumsum", torch.cumsum), ("cumprod", torch.cumprod),
                   ("logcumsumexp", torch.logcumsumexp),
                   ("argmax", torch.argmax), ("argmin", torch.argmin), ("topk", torch.topk),
                   ("sort", torch.sort), ("argsort", torch.argsort), ("max", torch.max),
                   ("min", torch.min), ("cdist", torch.cdist), ("_cdist_forward", torch.cdist),
                   ("one_hot", torch.nn.functional.one_hot), ("median", torch.median), ("nanmedian", torch.nanmedian),
                   ("kthvalue", torch.kthvalue), ("mode", torch.mode),
                   ("quantile", torch.quantile), ("nanquantile", torch.nanquantile),
                   # reductions over ``dim`` (keepdim is read from the result's rank)
                   ("mean", torch.mean), ("sum", torch.sum), ("amax", torch.amax),
                   ("amin", torch.amin), ("var", torch.var), ("std", torch.std),
                   ("logsumexp", torch.logsumexp), ("prod", torch.prod), ("all", torch.all),
                   ("any", torch.any), ("nansum", torch.nansum), ("nanmean", torch.nanmean),
                   ("linalg_vector_norm", torch.linalg.vector_norm), ("norm", torch.norm),
                   # contractions, layers with the functional signature
                   ("matmul", torch.matmul), ("bmm", torch.bmm), ("mm", torch.mm),
                   ("mv", torch.matmul), ("dot", torch.matmul), ("vdot", torch.matmul),
                   ("einsum", torch.einsum), ("linear", F.linear),
                   ("scaled_dot_product_attention", F.scaled_dot_product_attention),
                   ("conv1d", F.conv1d), ("conv2d", F.conv2d), ("conv3d", F.conv3d),
                   ("conv_transpose1d", F.conv_transpose1d),
                   ("conv_transpose2d", F.conv_transpose2d),
                   ("conv_transpose3d", F.conv_transpose3d),
                   ("batch_norm", torch.batch_norm), ("instance_norm", torch.batch_norm),
                   ("layer_norm", torch.layer_norm), ("rms_norm", F.rms_norm),
                   ("group_norm", torch.group_norm), ("prelu", F.prelu), ("glu", F.glu),
                   ("pad", F.pad), ("constant_pad_nd", torch.constant_pad_nd),
                   ("pixel_shuffle", F.pixel_shuffle), ("pixel_unshuffle", F.pixel_unshuffle),
                   ("_weight_norm", torch._weight_norm),
                   ("channel_shuffle", F.channel_shuffle), ("im2col", F.unfold), ("col2im", F.fold),
                   ("max_pool1d", F.max_pool1d), ("max_pool2d", F.max_pool2d),
                   ("max_pool3d", F.max_pool3d), ("avg_pool1d", F.avg_pool1d),
                   ("avg_pool2d", F.avg_pool2d), ("avg_pool3d", F.avg_pool3d),
                   ("max_pool2d_with_indices", F.max_pool2d_with_indices),
                   ("adaptive_avg_pool1d", F.adaptive_avg_pool1d),
                   ("adaptive_avg_pool2d", F.adaptive_avg_pool2d),
                   ("_adaptive_avg_pool2d", F.adaptive_avg_pool2d),
                   ("adaptive_avg_pool3d", F.adaptive_avg_pool3d),
                   ("adaptive_max_pool1d", F.adaptive_max_pool1d),
                   ("adaptive_max_pool2d", F.adaptive_max_pool2d),
                   ("upsample_nearest1d", F.interpolate), ("upsample_nearest2d", F.interpolate),
                   ("upsample_nearest3d", F.interpolate), ("upsample_bilinear2d", F.interpolate),
                   ("upsample_bicubic2d", F.interpolate), ("upsample_linear1d", F.interpolate),
                   ("_upsample_bilinear2d_aa", F.interpolate),
                   ("_upsample_bicubic2d_aa", F.interpolate), ("upsample_trilinear3d", F.interpolate),
                   ("_upsample_nearest_exact2d", F.interpolate),
                   ("grid_sampler", F.grid_sample), ("grid_sampler_2d", F.grid_sample),
                   ("grid_sampler_3d", F.grid_sample), ("affine_grid_generator", F.affine_grid)]:
    if hasattr(aten, _name):
        alias(getattr(aten, _name), _fn)


@rule(*_ops("slice"), kinds=ALL)
def _slice(ctx):
    """``aten.slice.Tensor(x, dim, start, end, step)``: ``x[..., start:end:step]``."""
    x = ctx.args[0]
    shape = ctx.shape(x)
    dim = norm_dim(ctx.value(ctx.arg(1, "dim", 0)), len(shape))
    start, end = ctx.value(ctx.arg(2, "start", None)), ctx.value(ctx.arg(3, "end", None))
    step = ctx.value(ctx.arg(4, "step", 1))
    n = shape[dim]
    start, stop, step = slice(start, end, step).indices(n)
    lay = list(ctx.layout(x))
    if step == 1 and start == 0 and stop == n:
        return lay
    if step == 1 and stop > start:
        return split_outputs(ctx, x, dim, [start, stop - start, n - stop])[1]
    return strided_slice(ctx, lay, shape, dim, start, stop, step)


@rule(*_ops("index"))
def _index(ctx):
    """``aten.index.Tensor(x, [i0, None, i2, ...])``: ``x[i0, :, i2]``."""
    indices = ctx.arg(1, "indices")
    return index_tensor(ctx, ctx.args[0], tuple(slice(None) if i is None else i for i in indices))


@rule(*_ops("scatter", "scatter_"), torch.scatter, "scatter", "scatter_")
def _scatter(ctx):
    """``x.scatter(dim, index, src_or_value)``. When ``index`` holds positions
    along ``x``'s own axis ``dim`` (a router masking its top pick:
    ``scores.scatter(-1, top, -inf)``), permuting that axis renumbers the
    positions with it and the result is permuted the same way; the other
    axes pair up with the index's (and a source's). Else, the axes along which
    the index is equal (expanded from length 1: whole rows scattered, SAM 3
    appending one padded sequence to another) are written element for element:
    each is one axis of ``x``, the source and the result; the rest are fixed."""
    x, index = ctx.args[0], ctx.arg(2, "index")
    lay = list(ctx.layout(x))
    dim = norm_dim(ctx.value(ctx.arg(1, "dim")), len(lay))
    src = ctx.arg(3, "src", ctx.kwargs.get("value"))
    if ctx.positions(index) is None:
        return _scatter_rows(ctx, index, src, lay, dim)
    ctx.union(lay[dim], ctx.positions(index))
    ctx.consume(index)
    shape = ctx.shape(x)
    others = [index] + ([src] if ctx.is_tensor(src) else [])
    for t in others:
        t_lay, t_shape = ctx.layout(t), ctx.shape(t)
        if len(t_shape) != len(shape):
            return _write_at_positions(ctx)
        pair_axes(ctx, lay, shape, t_lay, t_shape, dim, "scattered in part")
        if t is not index:  # a source's entry j along dim goes where the index's entry j says
            if t_shape[dim] == ctx.shape(index)[dim]:
                ctx.union(t_lay[dim], ctx.layout(index)[dim])
            else:
                ctx.block(t_lay[dim], "scattered in part")
    return lay


def _scatter_rows(ctx, index, src, lay: list, dim: int) -> list:
    """``scatter`` whose index is equal along some axes other than ``dim``: see
    :func:`_scatter`. Nothing of the kind: every axis fixed."""
    shape, i_shape = ctx.shape(ctx.args[0]), ctx.shape(index)
    n = len(shape)
    tensors = [ctx.layout(src)] if ctx.is_tensor(src) else []
    sizes = [shape, i_shape] + ([ctx.shape(src)] if tensors else [])
    if any(len(sz) != n for sz in sizes):
        return _write_at_positions(ctx)
    free = [k for k in range(n) if k != dim and len({sz[k] for sz in sizes}) == 1
            and broadcast_along(ctx, index, k - n)]
    if not free:
        return _write_at_positions(ctx)
    why = f"{ctx.op_name} writes at indexed positions"
    i_lay = ctx.layout(index)
    for k in range(n):
        if k in free:  # the index is equal along it: nothing to block there
            for t_lay in tensors:
                ctx.union(lay[k], t_lay[k])
        else:
            for a in [lay[k], i_lay[k]] + [t_lay[k] for t_lay in tensors]:
                ctx.block(a, why)
    return lay


@rule(*_ops("index_put", "index_put_"))
def _index_put(ctx):
    """``x[i0, i1, ...] = values`` (``index_put``): the axes the index tensors
    address are fixed; the axes after them are written whole, so each is one
    axis with the matching trailing axis of ``values`` (a boolean mask over
    batch and tokens writing whole hidden vectors leaves the hidden axis free).
    Index tensors other than leading ones, one after another, fix everything."""
    x, indices, values = ctx.args[0], ctx.arg(1, "indices"), ctx.arg(2, "values")
    lay, shape = list(ctx.layout(x)), ctx.shape(x)
    entries = list(indices)
    while entries and entries[-1] is None:
        entries.pop()
    if not entries or any(e is None or not ctx.is_tensor(e) for e in entries) or \
            not ctx.is_tensor(values):
        return _write_at_positions(ctx)
    consumed = 0
    for e in entries:
        meta = ctx.meta(e)
        consumed += meta.ndim if meta.dtype == torch.bool else 1
    if consumed > len(shape):
        return _write_at_positions(ctx)
    for e in entries:
        ctx.block_layout(ctx.layout(e), "index")
    for s in lay[:consumed]:
        ctx.block(s, "written at indexed positions")
    v_lay, v_shape = ctx.layout(values), ctx.shape(values)
    trailing = len(shape) - consumed
    lead = len(v_shape) - min(trailing, len(v_shape))
    for j in range(lead):
        ctx.block(v_lay[j], "written at indexed positions")
    for j in range(lead, len(v_shape)):
        k = len(shape) - (len(v_shape) - j)
        if v_shape[j] == shape[k]:
            ctx.union(v_lay[j], lay[k])
        elif v_shape[j] != 1:  # (1: broadcast, equal along the axis)
            ctx.block(v_lay[j], "written in part")
            ctx.block(lay[k], "written in part")
    return lay


@rule(*_ops("scatter_add", "scatter_reduce", "index_fill", "index_copy"))
def _write_at_positions(ctx):
    """Writes at positions given by tensors: every axis involved is fixed."""
    for t in ctx.tensor_args():
        ctx.block_layout(ctx.layout(t), f"{ctx.op_name} writes at indexed positions")
    return ctx.fresh(blocked=f"{ctx.op_name} output")


@rule(*_ops("masked_scatter"), "masked_scatter")
def _masked_scatter(ctx):
    """``x.masked_scatter(mask, source)``: the elements of ``source``, in order,
    go where ``mask`` is true (a multimodal model's image features put in
    place of its image tokens). When the mask was expanded along the last
    axis from length 1 (one flag per token), whole rows of ``source`` land on
    whole rows of ``x``, element ``j`` on element ``j``: the last axes of
    ``x``, ``source`` and the result are one axis. The other axes are fixed.
    A flat ``source`` (features flattened and concatenated: LLaVA-NeXT-Video's
    videos) is read as rows of ``x``'s width, in order: the same thing."""
    x, mask, source = ctx.args[0], ctx.arg(1, "mask"), ctx.arg(2, "source")
    lay, src = list(ctx.layout(x)), list(ctx.layout(source))
    name = ctx.op_name
    x_shape, s_shape = ctx.shape(x), ctx.shape(source)
    width = x_shape[-1] if len(x_shape) > 1 else 0
    if len(s_shape) == 1 and width > 1 and s_shape[0] != width and s_shape[0] % width == 0 \
            and broadcast_along_last(ctx, mask):
        src = ctx.refine_product(src[0], [s_shape[0] // width, width])
        s_shape = (s_shape[0] // width, width)
    if not (broadcast_along_last(ctx, mask) and s_shape and x_shape and s_shape[-1] == x_shape[-1]):
        for t in (x, mask, source):
            ctx.block_layout(ctx.layout(t), f"{name} writes at indexed positions")
        return ctx.fresh(blocked=f"{name} output")
    ctx.union(lay[-1], src[-1])
    if ctx.shape(mask) and ctx.shape(mask)[-1] == ctx.shape(x)[-1]:
        ctx.union(lay[-1], ctx.layout(mask)[-1])  # expanded: equal along it
    for s in (*lay[:-1], *src[:-1]):
        ctx.block(s, f"{name} writes at indexed positions")
    return lay


@rule(*_ops("outer", "ger"), torch.outer, "outer")
def _outer(ctx):
    """``outer(a, b)[i, j] = a[i] * b[j]``: each input's axis is one of the result's."""
    return [ctx.layout(ctx.args[0])[0], ctx.layout(ctx.args[1])[0]]


@rule(*_ops("embedding"), kinds=ALL)
def _embedding(ctx):
    """``aten.embedding(weight, indices, ...)``: the functional order swapped."""
    return embedding_rule(ctx, ctx.arg(1, "indices"), ctx.layout(ctx.arg(0, "weight")))


@rule(*_ops("bilinear"), kinds=ALL)
def _bilinear(ctx):
    """``aten.bilinear(input1, input2, weight, bias)``: as ``F.bilinear``."""
    b = ctx.arg(3, "bias")
    return bilinear_rule(ctx, ctx.arg(0, "input1"), ctx.arg(1, "input2"),
                         ctx.layout(ctx.arg(2, "weight")), ctx.layout(b) if b is not None else None)


@rule(*_ops("embedding_renorm_", "embedding_renorm"), kinds=ALL)
def _embedding_renorm(ctx):
    """``embedding_renorm_(weight, indices, max_norm, norm_type)``: the looked-up rows
    longer than ``max_norm`` are shortened (``nn.Embedding(max_norm=...)``); a
    permutation of the embedding axis keeps every row's norm, a general map does not."""
    w = ctx.layout(ctx.arg(0, "weight"))
    ctx.restrict(w[1], PERMUTATION, "rows renormalised to max_norm")
    return list(w)


@rule(*_ops("_embedding_bag", "embedding_bag", "_embedding_bag_forward_only"), kinds=ALL)
def _embedding_bag(ctx):
    """``aten._embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode, sparse,
    per_sample_weights, include_last_offset, padding_idx)``: mode 0 sum, 1 mean, 2 max;
    its other outputs (offset2bag, bag sizes, max indices) index bags and rows."""
    meta = ctx.meta()
    out = embedding_bag_rule(ctx, ctx.arg(1, "indices"), ctx.layout(ctx.arg(0, "weight")),
                             ctx.value(ctx.arg(4, "mode", 0)), None, meta[0].shape[0])
    return [out] + [ctx.fresh(m, blocked="embedding bag bookkeeping") for m in meta[1:]]


@rule(*_ops("addmm", "baddbmm", "addbmm"), kinds=ALL)
def _addmm(ctx):
    """``addmm(bias, a, b) = bias + a @ b`` (GPT-2's Conv1D, BLOOM's ALiBi)."""
    bias, a, b = ctx.args[0], ctx.args[1], ctx.args[2]
    if ctx.op_name == "addbmm":
        raise ValueError("addbmm sums over the batch")
    product = _matmul_of(ctx, a, b)
    if not ctx.is_tensor(bias):
        return product
    return _add_broadcast(ctx, bias, product)


def _matmul_of(ctx, a, b) -> list[int]:
    la, lb = list(ctx.layout(a)), list(ctx.layout(b))
    ctx.union(la[-1], lb[-2], dual=True)
    sa, sb = ctx.shape(a), ctx.shape(b)
    batch = []
    for x, y, nx, ny in zip(la[:-2], lb[:-2], sa[:-2], sb[:-2]):
        if nx == ny:
            ctx.union(x, y)
            ctx.restrict(x, PERMUTATION, "a batch axis of both factors")
        batch.append(x if nx > 1 else y)
    return batch + [la[-2], lb[-1]]


def _add_broadcast(ctx, bias, product: list[int]) -> list[int]:
    return broadcast_layouts(ctx, [(ctx.layout(bias), ctx.shape(bias)),
                                   (product, ctx.shape())], ctx.shape())


@rule(*_ops("convolution", "_convolution"), kinds=ALL)
def _convolution(ctx):
    """``convolution(input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups)``."""
    x, w, b = ctx.args[0], ctx.args[1], ctx.arg(2, "bias")
    transposed = bool(ctx.value(ctx.arg(6, "transposed")))
    groups = ctx.value(ctx.arg(8, "groups", 1))
    spatial = len(ctx.shape(w)) - 2
    return conv_rule(ctx, x, ctx.layout(w), ctx.layout(b) if ctx.is_tensor(b) else None,
                     groups, spatial, transposed)


@rule(*_ops("native_layer_norm"))
def _native_layer_norm(ctx):
    """``native_layer_norm(x, shape, w, b, eps) -> (y, mean, rstd)``."""
    shape = ctx.value(ctx.arg(1, "normalized_shape"))
    w, b = ctx.arg(2, "weight"), ctx.arg(3, "bias")
    y = layer_norm_rule(ctx, ctx.args[0], len(shape), ctx.layout(w) if ctx.is_tensor(w) else None,
                        ctx.layout(b) if ctx.is_tensor(b) else None)
    meta = ctx.meta()
    return [y] + [ctx.fresh(m, blocked="normalisation statistics") for m in meta[1:]]


@rule(*_ops("_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
            "native_batch_norm", "_native_batch_norm_legit_functional"))
def _native_batch_norm(ctx):
    """``(x, weight, bias, running_mean, running_var, ...) -> (y, stats...)``;
    the statistics it returns are per channel."""
    x = ctx.args[0]
    lay = ctx.layout(x)
    tensors = [ctx.layout(t) for t in ctx.args[1:5] if ctx.is_tensor(t)]
    y = per_channel(ctx, lay, 1 if len(lay) > 1 else 0, tensors)
    outs = [y]
    for m in ctx.meta()[1:]:
        if hasattr(m, "shape") and len(m.shape) == 1 and m.shape[0] == ctx.size[y[1]]:
            outs.append([y[1]])
        else:
            outs.append(ctx.fresh(m, blocked="normalisation statistics"))
    return outs


@rule(*_ops("native_group_norm"))
def _native_group_norm(ctx):
    """``native_group_norm(x, w, b, N, C, HxW, group, eps) -> (y, mean, rstd)``."""
    w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    y = group_norm_rule(ctx, ctx.args[0], ctx.value(ctx.arg(6, "group")),
                        ctx.layout(w) if ctx.is_tensor(w) else None,
                        ctx.layout(b) if ctx.is_tensor(b) else None)
    return [y] + [ctx.fresh(m, blocked="normalisation statistics") for m in ctx.meta()[1:]]


@rule(*_ops("native_dropout"))
def _native_dropout(ctx):
    lay = list(ctx.layout(ctx.args[0]))
    return [lay, list(lay)]


@rule(*_ops("linalg_solve_triangular"), torch.linalg.solve_triangular)
def _solve_triangular(ctx):
    """``solve_triangular(A, B, upper=, left=True)``: ``X`` with ``A @ X = B``
    (``X @ A = B`` when not ``left``), over broadcast batch axes (Qwen3.5's
    chunked gated delta rule). Which entries are zero depends on the order of
    A's axes, so they and the axis of B they meet are fixed; B's other axis
    passes through, and the batch axes (heads) broadcast."""
    a, b = ctx.args[0], ctx.args[1]
    left = ctx.value(ctx.kwargs.get("left", True))
    la, lb = list(ctx.layout(a)), list(ctx.layout(b))
    out_shape = ctx.shape()
    batch = broadcast_layouts(ctx, [(la[:-2], ctx.shape(a)[:-2]), (lb[:-2], ctx.shape(b)[:-2])],
                              out_shape[:-2])
    why = "a triangular solve needs its order"
    for s in la[-2:]:
        ctx.block(s, why)
    met = lb[-2] if left else lb[-1]
    ctx.union(met, la[-1] if left else la[-2])
    return batch + ([met, lb[-1]] if left else [lb[-2], met])
