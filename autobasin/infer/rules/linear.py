"""Linear, convolution and embedding layers (module and functional forms).

Conventions (PyTorch): Linear weight (out, in); Conv weight
(out, in/groups, *kernel); ConvTranspose weight (in, out/groups, *kernel).
A grouped conv's channels are a product (groups, channels per group): the
groups are permuted together on both sides and the channels within a group
by one permutation shared by all groups, which is exactly what one weight
tensor of shape (out, in/groups, ...) allows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ALL, PERMUTATION, rule


def linear_rule(ctx, x, w, b):
    lay = list(ctx.layout(x))
    ctx.union(lay[-1], w[1], dual=True)
    if b:
        ctx.union(b[0], w[0])
    return lay[:-1] + [w[0]]


@rule(nn.Linear, inherit=True, params=("weight", "bias"), kinds=ALL)
def _linear_module(ctx):
    b = ctx.param("bias") if ctx.has_param("bias") else None
    return linear_rule(ctx, ctx.args[0], ctx.param("weight"), b)


@rule(F.linear, torch._C._nn.linear, kinds=ALL)
def _linear_fn(ctx):
    b = ctx.arg(2, "bias")
    return linear_rule(ctx, ctx.arg(0, "input"), ctx.layout(ctx.arg(1, "weight")),
                       ctx.layout(b) if b is not None else None)


def bilinear_rule(ctx, x1, x2, w, b):
    """``y[..., o] = sum_ij x1[..., i] w[o, i, j] x2[..., j] + b[o]`` (``nn.Bilinear``):
    each input's features are contracted with their axis of the weight (dual: any
    invertible map of them passes), the output follows the weight's rows, and the
    leading axes of both inputs are one."""
    l1, l2 = list(ctx.layout(x1)), list(ctx.layout(x2))
    ctx.union(l1[-1], w[1], dual=True)
    ctx.union(l2[-1], w[2], dual=True)
    for a, c in zip(l1[:-1], l2[:-1]):
        ctx.union(a, c)
    if b:
        ctx.union(b[0], w[0])
    return l1[:-1] + [w[0]]


@rule(F.bilinear, torch.bilinear, kinds=ALL)
def _bilinear_fn(ctx):
    b = ctx.arg(3, "bias")
    return bilinear_rule(ctx, ctx.arg(0, "input1"), ctx.arg(1, "input2"),
                         ctx.layout(ctx.arg(2, "weight")), ctx.layout(b) if b is not None else None)


def conv_rule(ctx, x, w, b, groups: int, spatial: int, transposed: bool):
    lay = list(ctx.layout(x))
    c = len(lay) - spatial - 1  # channel axis (0 for unbatched input)
    for s in lay[c + 1:]:
        ctx.block(s, "conv spatial axis", structural=True)
    for s in w[2:]:
        ctx.block(s, "conv kernel axis", structural=True)
    out_shape = ctx.shape()
    spatial_out = [ctx.new(n, "conv spatial axis", structural=True) for n in out_shape[c + 1:]]
    if not transposed:
        cin_g, cout = ctx.size[w[1]], ctx.size[w[0]]
        # a conv mixes channels linearly, the same way at every position: any map
        # of its input channels (dual: the weight reads them) and output channels
        # commutes with it; a grouped conv's groups only permute (block-diagonal)
        if groups == 1:
            ctx.union(lay[c], w[1], dual=True)
        else:
            xg = ctx.refine_product(lay[c], [groups, cin_g])
            wg = ctx.refine_product(w[0], [groups, cout // groups])
            ctx.union(xg[0], wg[0])
            ctx.union(xg[1], w[1], dual=True)
            ctx.restrict(xg[0], PERMUTATION, "groups of a grouped convolution")
        out_c = w[0]
    else:
        cin, cout_g = ctx.size[w[0]], ctx.size[w[1]]
        ctx.union(lay[c], w[0], dual=True)
        if groups == 1:
            out_c = w[1]
        else:
            out_c = ctx.new(cout_g * groups)
            og = ctx.refine_product(out_c, [groups, cout_g])
            wg = ctx.refine_product(w[0], [groups, cin // groups])
            ctx.union(og[0], wg[0])
            ctx.union(og[1], w[1])
            ctx.restrict(og[0], PERMUTATION, "groups of a grouped convolution")
    if b:
        ctx.union(b[0], out_c)
    return lay[:c] + [out_c] + spatial_out


CONV_MODULES = {nn.Conv1d: (1, False), nn.Conv2d: (2, False), nn.Conv3d: (3, False),
                nn.ConvTranspose1d: (1, True), nn.ConvTranspose2d: (2, True),
                nn.ConvTranspose3d: (3, True)}


@rule(*CONV_MODULES, inherit=True, params=("weight", "bias"), kinds=ALL)
def _conv_module(ctx):
    m = ctx.module
    spatial, transposed = next(v for k, v in CONV_MODULES.items() if isinstance(m, k))
    b = ctx.param("bias") if m.bias is not None else None
    return conv_rule(ctx, ctx.args[0], ctx.param("weight"), b, m.groups, spatial, transposed)


CONV_FUNCS = {F.conv1d: (1, False), F.conv2d: (2, False), F.conv3d: (3, False),
              F.conv_transpose1d: (1, True), F.conv_transpose2d: (2, True),
              F.conv_transpose3d: (3, True)}


@rule(*CONV_FUNCS, kinds=ALL)
def _conv_fn(ctx):
    spatial, transposed = CONV_FUNCS[ctx.target]
    b = ctx.arg(2, "bias")
    # conv: (input, weight, bias, stride, padding, dilation, groups); transposed:
    # (input, weight, bias, stride, padding, output_padding, groups, dilation)
    groups = ctx.value(ctx.arg(6, "groups", 1))
    return conv_rule(ctx, ctx.arg(0, "input"), ctx.layout(ctx.arg(1, "weight")),
                     ctx.layout(b) if b is not None else None, groups, spatial, transposed)


def embedding_rule(ctx, idx, w, max_norm=None):
    if max_norm is not None:  # rows longer than max_norm (in a p-norm) are shortened
        ctx.restrict(w[1], PERMUTATION, "rows renormalised to max_norm")
    if ctx.positions(idx) is not None:  # rows picked by positions along another axis
        ctx.union(w[0], ctx.positions(idx))
        ctx.restrict(w[0], PERMUTATION, "rows picked by positions")
        ctx.consume(idx)
    else:
        ctx.block(w[0], "embedding rows are looked up by index", structural=True)
    return list(ctx.layout(idx)) + [w[1]]


def embedding_bag_rule(ctx, idx, w, mode, max_norm, bags: int):
    """Rows of ``w`` looked up by index and reduced over each bag (sum, mean or
    max): the embedding axis passes to the output's last axis. A sum or mean is
    linear in the rows (every kind passes); a max, or a renormalisation of rows
    longer than ``max_norm``, commutes only with permutations of that axis."""
    ctx.block(w[0], "embedding rows are looked up by index", structural=True)
    if mode == "max" or mode == 2:
        ctx.restrict(w[1], PERMUTATION, "the largest entry of each bag, entry by entry")
    if max_norm is not None:
        ctx.restrict(w[1], PERMUTATION, "rows renormalised to max_norm")
    lay = ctx.layout(idx)
    # a 2-D input is a batch of equal bags, one per row; a 1-D one is cut by offsets
    first = lay[0] if len(lay) == 2 else ctx.new(bags, "bags cut by offsets", structural=True)
    return [first, w[1]]


@rule(F.embedding_bag, kinds=ALL)
def _embedding_bag_fn(ctx):
    """``F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
    mode, sparse, per_sample_weights, ...)`` (``nn.EmbeddingBag``)."""
    return embedding_bag_rule(ctx, ctx.arg(0, "input"), ctx.layout(ctx.arg(1, "weight")),
                              ctx.value(ctx.arg(6, "mode", "mean")),
                              ctx.value(ctx.arg(3, "max_norm", None)), ctx.shape()[0])


@rule(nn.Embedding, inherit=True, params=("weight",), kinds=ALL)
def _embedding_module(ctx):
    return embedding_rule(ctx, ctx.args[0], ctx.param("weight"), ctx.module.max_norm)


@rule(F.embedding, kinds=ALL)
def _embedding_fn(ctx):
    return embedding_rule(ctx, ctx.arg(0, "input"), ctx.layout(ctx.arg(1, "weight")),
                          ctx.value(ctx.arg(3, "max_norm", None)))


@rule(torch.cdist, kinds=ALL)
def _cdist(ctx):
    """``cdist(x1, x2, p)[..., i, j] = ||x1[..., i, :] - x2[..., j, :]||_p``: both
    inputs' features are one space (a map of it applied to both keeps every
    difference), the rows of each input pass; a Euclidean distance admits
    orthogonal maps, any p-norm signed permutations."""
    x1, x2 = ctx.layout(ctx.arg(0, "x1")), ctx.layout(ctx.arg(1, "x2"))
    p = ctx.value(ctx.arg(2, "p", 2.0))
    ctx.union(x1[-1], x2[-1])
    ctx.restrict(x1[-1], {"sign", "orthogonal"} if p == 2 else {"sign"}, f"a {p}-norm distance")
    # batch axes broadcast against each other (from the right)
    out_shape = ctx.shape()
    batch = []
    for k in range(len(out_shape) - 2):
        cands = [lay[len(lay) - 2 - (len(out_shape) - 2 - k)] for lay in (x1, x2)
                 if len(lay) - 2 - (len(out_shape) - 2 - k) >= 0]
        full = [c for c in cands if ctx.size[c] == out_shape[k]]
        for c in full[1:]:
            ctx.union(full[0], c)
        batch.append(full[0] if full else ctx.new(out_shape[k]))
    return batch + [x1[-2], x2[-2]]
