"""Contractions and attention: matmul, bmm, einsum, scaled dot-product
attention and nn.MultiheadAttention.

A contraction sum_k a[..., k] b[k, ...] is unchanged when both sides permute
k alike, so contracted axes are identified; batch axes broadcast. Beyond
permutations, a contraction keeps any invertible map M of k when the other
side takes M^-T (the axes are dual), and passes any map of a free axis to the
result; an axis both factors carry as a batch axis is multiplied entry by
entry, which only permutations keep.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ALL, PERMUTATION, rule
from .common import broadcast_layouts


def _broadcast_batch(ctx, la, sa, lb, sb, out_batch_shape):
    return broadcast_layouts(ctx, [(la, sa), (lb, sb)], out_batch_shape)


def _batch_kinds(ctx, la, sa, lb, sb) -> None:
    """Batch axes both factors carry (heads in q @ k^T): permutations only."""
    for x, y, nx, ny in zip(reversed(la), reversed(lb), reversed(sa), reversed(sb)):
        if nx == ny > 1:
            ctx.restrict(x, PERMUTATION, "a batch axis of both factors")
            ctx.restrict(y, PERMUTATION, "a batch axis of both factors")


@rule(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", torch.mm, "mm", kinds=ALL)
def _matmul(ctx):
    a, b = ctx.args[0], ctx.args[1]
    la, lb = list(ctx.layout(a)), list(ctx.layout(b))
    sa, sb = list(ctx.shape(a)), list(ctx.shape(b))
    a_vec, b_vec = len(sa) == 1, len(sb) == 1
    if a_vec:
        la, sa = [ctx.new(1)] + la, [1] + sa
    if b_vec:
        lb, sb = lb + [ctx.new(1)], sb + [1]
    ctx.union(la[-1], lb[-2], dual=True)
    _batch_kinds(ctx, la[:-2], sa[:-2], lb[:-2], sb[:-2])
    out_shape = list(ctx.shape())
    n_batch = max(len(sa), len(sb)) - 2
    batch = _broadcast_batch(ctx, la[:-2], sa[:-2], lb[:-2], sb[:-2],
                             out_shape[:n_batch] if not (a_vec or b_vec) else
                             _batch_shape(sa[:-2], sb[:-2]))
    out = batch + ([] if a_vec else [la[-2]]) + ([] if b_vec else [lb[-1]])
    return out


def _batch_shape(a, b):
    nd = max(len(a), len(b))
    a = [1] * (nd - len(a)) + list(a)
    b = [1] * (nd - len(b)) + list(b)
    return [max(x, y) for x, y in zip(a, b)]


@rule(torch.einsum, kinds=ALL)
def _einsum(ctx):
    eq = ctx.value(ctx.args[0]).replace(" ", "")
    operands = list(ctx.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not rhs and "->" not in eq:
        letters = sorted({c for t in terms for c in t if c.isalpha() and
                          sum(tt.count(c) for tt in terms) == 1})
        rhs = ("..." if "..." in lhs else "") + "".join(letters)
    by_letter: dict[str, int] = {}
    ell_max = 0
    for t, op in zip(terms, operands):
        n_named = len(t.replace("...", ""))
        ell_max = max(ell_max, len(ctx.shape(op)) - n_named)

    def expand(term, ndim):
        if "..." in term:
            pre, post = term.split("...")
            n_ell = ndim - len(pre) - len(post)
            return list(pre) + [f"@{ell_max - n_ell + i}" for i in range(n_ell)] + list(post)
        return list(term)

    seen: dict[str, list[int]] = {}
    for t, op in zip(terms, operands):
        lay, shape = ctx.layout(op), ctx.shape(op)
        for letter, s, n in zip(expand(t, len(shape)), lay, shape):
            if n == 1:
                continue
            seen.setdefault(letter, []).append(s)
    out_letters = set(expand(rhs, len(ctx.shape())))
    for letter, syms in seen.items():
        # a letter summed over between exactly two operands is a contraction
        # (dual axes); one in the result is mapped along; any other use (a batch
        # letter of several operands, a diagonal) multiplies entries
        dual = len(syms) == 2 and letter not in out_letters
        for s in syms[1:]:
            ctx.union(syms[0], s, dual=dual)
        if len(syms) > 1 and not dual:
            ctx.restrict(syms[0], PERMUTATION, f"einsum index {letter!r} of several factors")
        if len(syms) == 1 and letter not in out_letters:
            ctx.restrict(syms[0], PERMUTATION, f"einsum sums over {letter!r}")
        by_letter[letter] = syms[0]
    out_shape = ctx.shape()
    out = []
    for letter, n in zip(expand(rhs, len(out_shape)), out_shape):
        out.append(by_letter[letter] if letter in by_letter and n > 1 else ctx.new(n))
    return out


@rule(F.scaled_dot_product_attention, kinds=ALL)
def _sdpa(ctx):
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    lq, lk, lv = ctx.layout(q), ctx.layout(k), ctx.layout(v)
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    # q . k contracts the head dim (dual axes: q's map M, k's M^-T); v's head dim
    # is carried to the result; heads, tokens and the softmax's axis only permute
    ctx.union(lq[-1], lk[-1], dual=True)
    ctx.union(lk[-2], lv[-2])
    for lay in (lq, lk, lv):
        ctx.restrict_layout(lay[:-1], PERMUTATION, "attention's heads and tokens")
    gqa = bool(ctx.value(ctx.arg(7, "enable_gqa", False))) and len(sq) >= 3 and \
        (sq[-3] != sk[-3] or sq[-3] != sv[-3])
    if gqa and (sq[-3] % sk[-3] or sq[-3] % sv[-3]):
        for lay in (lq, lk, lv):
            ctx.block(lay[-3], "grouped-query attention heads of uneven groups")
        gqa = False
    if gqa:
        # grouped-query attention inside SDPA: key (value) head j serves query heads
        # j*G .. j*G+G-1 (repeat_interleave by G = query heads / key heads), so the
        # query heads are a grid (key heads x G) whose first factor is the key heads
        for lx, sx in ((lk, sk), (lv, sv)):
            if sx[-3] == sq[-3]:
                ctx.union(lq[-3], lx[-3])
            else:
                kids = ctx.refine_product(lq[-3], [sx[-3], sq[-3] // sx[-3]])
                ctx.union(kids[0], lx[-3])
        batch_shape = _batch_shape(_batch_shape(sq[:-3], sk[:-3]), sv[:-3])
        batch = _broadcast_batch(ctx, lq[:-3], sq[:-3], lk[:-3], sk[:-3], batch_shape)
        batch = _broadcast_batch(ctx, batch, batch_shape, lv[:-3], sv[:-3], batch_shape)
        batch, batch_shape = batch + [lq[-3]], batch_shape + [sq[-3]]
    else:
        batch_shape = _batch_shape(_batch_shape(sq[:-2], sk[:-2]), sv[:-2])
        batch = _broadcast_batch(ctx, lq[:-2], sq[:-2], lk[:-2], sk[:-2], batch_shape)
        batch = _broadcast_batch(ctx, batch, batch_shape, lv[:-2], sv[:-2], batch_shape)
    if ctx.value(ctx.arg(5, "is_causal", False)):
        ctx.block(lq[-2], "causal mask", structural=True)
        ctx.block(lk[-2], "causal mask", structural=True)
    mask = ctx.arg(3, "attn_mask")
    if ctx.is_tensor(mask):
        lm, sm = ctx.layout(mask), ctx.shape(mask)
        full = batch + [lq[-2], lk[-2]]
        full_shape = batch_shape + [sq[-2], sk[-2]]
        for j in range(len(sm)):
            jj = len(full_shape) - len(sm) + j
            if sm[j] == full_shape[jj] and sm[j] > 1:
                ctx.union(lm[j], full[jj])
    return batch + [lq[-2], lv[-1]]


@rule(nn.MultiheadAttention, kinds=ALL)
def _mha(ctx):
    """nn.MultiheadAttention: the model dimension E is shared by the inputs,
    the input projection's 'in' axis and the output projection's 'out' axis.
    The packed input projection is a concat (q, k, v), each (heads, head_dim):
    heads are shared by q, k and v; q and k share head_dim; v's head_dim is
    shared with the output projection's input."""
    m = ctx.module
    query = ctx.arg(0, "query")
    key = ctx.arg(1, "key")
    value = ctx.arg(2, "value")
    lq, lk, lv = ctx.layout(query), ctx.layout(key), ctx.layout(value)
    h = m.num_heads
    e = m.embed_dim
    d = e // h
    out_w = ctx.param("out_proj.weight")
    if m._qkv_same_embed_dim:
        w = ctx.param("in_proj_weight")
        for lay in (lq, lk, lv):
            ctx.union(lay[-1], w[1], dual=True)
        parts = ctx.refine_concat(w[0], [e, e, e])
        if m.in_proj_bias is not None:
            ctx.union(ctx.param("in_proj_bias")[0], w[0])
    else:
        wq, wk, wv = (ctx.param(n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        ctx.union(lq[-1], wq[1], dual=True)
        ctx.union(lk[-1], wk[1], dual=True)
        ctx.union(lv[-1], wv[1], dual=True)
        parts = [wq[0], wk[0], wv[0]]
        if m.in_proj_bias is not None:
            bias = ctx.param("in_proj_bias")
            for a, b in zip(ctx.refine_concat(bias[0], [e, e, e]), parts):
                ctx.union(a, b)
    q_hd = ctx.refine_product(parts[0], [h, d])
    k_hd = ctx.refine_product(parts[1], [h, d])
    v_hd = ctx.refine_product(parts[2], [h, d])
    o_hd = ctx.refine_product(out_w[1], [h, d])
    for x in (k_hd, v_hd, o_hd):
        ctx.union(q_hd[0], x[0])
    ctx.restrict(q_hd[0], PERMUTATION, "attention heads")
    ctx.union(q_hd[1], k_hd[1], dual=True)
    ctx.union(v_hd[1], o_hd[1], dual=True)
    for lay in (lq, lk, lv):
        ctx.restrict_layout(list(lay)[:-1], PERMUTATION, "attention's tokens")
    if m.out_proj.bias is not None:
        ctx.union(ctx.param("out_proj.bias")[0], out_w[0])
    if m.bias_k is not None:
        # bias_k / bias_v append a learned key/value token: (1, 1, E)
        ctx.block(ctx.param("bias_k")[2], "bias_k")
        ctx.block(ctx.param("bias_v")[2], "bias_v")
    batch_first = m.batch_first
    lay_q = list(lq)
    if len(lay_q) == 3:
        b_axis, t_axis = (0, 1) if batch_first else (1, 0)
        lk_ = list(lk)
        ctx.union(lay_q[b_axis], lk_[b_axis])
        ctx.union(lk_[b_axis], list(lv)[b_axis])
        ctx.union(lk_[t_axis], list(lv)[t_axis])
    out = lay_q[:-1] + [out_w[0]]
    meta = ctx.meta()
    weights_meta = meta[1] if isinstance(meta, (list, tuple)) else None
    weights = [ctx.new(n, "attention weights") for n in weights_meta.shape] \
        if weights_meta is not None and hasattr(weights_meta, "shape") else None
    return [out, weights]
