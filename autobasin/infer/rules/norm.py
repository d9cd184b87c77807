"""Normalisation layers. Statistics over an axis are unchanged by permuting
it; per-channel scales, shifts and running statistics follow the channel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ALL, rule
from .common import norm_dim

BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def per_channel(ctx, lay, axis, tensors):
    for t in tensors:
        if t:
            ctx.union(lay[axis], t[0])
    return list(lay)


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
      nn.InstanceNorm2d, nn.InstanceNorm3d, inherit=True, params=BN_PARAMS)
def _batchnorm_module(ctx):
    """BatchNorm / InstanceNorm (and subclasses adding no parameters, such as
    timm's BatchNormAct2d, whose activation is elementwise)."""
    x = ctx.args[0]
    lay = ctx.layout(x)
    tensors = [ctx.param(n) for n in ("weight", "bias", "running_mean", "running_var")
               if getattr(ctx.module, n, None) is not None]
    axis = 1 if len(lay) > 1 else 0
    if isinstance(ctx.module, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        axis = len(lay) - {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[
            next(k for k in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
                 if isinstance(ctx.module, k))] - 1
    return per_channel(ctx, lay, axis, tensors)


@rule(F.batch_norm, torch.batch_norm, F.instance_norm)
def _batchnorm_fn(ctx):
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if ctx.target is F.instance_norm:
        names = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    elif ctx.target is torch.batch_norm:
        names = [(1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")]
    else:
        names = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]
    tensors = [ctx.layout(ctx.arg(i, n)) for i, n in names if ctx.arg(i, n) is not None]
    return per_channel(ctx, lay, 1 if len(lay) > 1 else 0, tensors)


def layer_norm_rule(ctx, x, k: int, w, b, rms: bool = False):
    lay = list(ctx.layout(x))
    for t in (w, b):
        if t:
            for i in range(k):
                ctx.union(lay[len(lay) - k + i], t[i])
    # an RMS norm without a gain divides by a norm orthogonal maps keep, so one
    # normalised axis admits them; LayerNorm's centering and a gain (entries
    # multiplied) admit permutations only, as do the other axes
    for i, s in enumerate(lay):
        if rms and not w and not b and k == 1 and i == len(lay) - 1:
            ctx.restrict(s, {"sign", "orthogonal"}, "RMS norm without a gain")
        else:
            ctx.restrict(s, {"permutation"}, "layer norm" if not rms else "RMS norm with a gain")
    return lay


@rule(nn.LayerNorm, nn.RMSNorm, inherit=True, params=("weight", "bias"), kinds=ALL)
def _layernorm_module(ctx):
    m = ctx.module
    k = len(m.normalized_shape)
    w = ctx.param("weight") if getattr(m, "weight", None) is not None else None
    b = ctx.param("bias") if getattr(m, "bias", None) is not None else None
    return layer_norm_rule(ctx, ctx.args[0], k, w, b, isinstance(m, nn.RMSNorm))


@rule(F.layer_norm, F.rms_norm, torch.layer_norm, kinds=ALL)
def _layernorm_fn(ctx):
    shape = ctx.value(ctx.arg(1, "normalized_shape"))
    k = 1 if isinstance(shape, int) else len(shape)
    w, b = ctx.arg(2, "weight"), ctx.arg(3, "bias") if ctx.target is not F.rms_norm else None
    return layer_norm_rule(ctx, ctx.arg(0, "input"), k,
                           ctx.layout(w) if w is not None else None,
                           ctx.layout(b) if b is not None else None, ctx.target is F.rms_norm)


def group_norm_rule(ctx, x, groups: int, w, b):
    """Statistics are per channel group, so a permutation must keep each group
    together. Channels are (groups, per_group): groups permuted among
    themselves and one shared within-group permutation. Where the channels are
    already a concat (a GroupNorm right after torch.cat), they are cut into
    the groups instead (each group permuted on its own, groups in place),
    which is always compatible with the concat's segments."""
    lay = list(ctx.layout(x))
    c = lay[1]
    n = ctx.size[c]
    ref = ctx.refined(c)
    if ref is not None and ref.kind == "concat":
        ctx.refine_concat(c, [n // groups] * groups)
    else:
        ctx.refine_product(c, [groups, n // groups])
    for t in (w, b):
        if t:
            ctx.union(c, t[0])
    return lay


@rule(nn.GroupNorm, inherit=True, params=("weight", "bias"))
def _groupnorm_module(ctx):
    m = ctx.module
    w = ctx.param("weight") if m.weight is not None else None
    b = ctx.param("bias") if m.bias is not None else None
    return group_norm_rule(ctx, ctx.args[0], m.num_groups, w, b)


@rule(F.group_norm, torch.group_norm)
def _groupnorm_fn(ctx):
    w, b = ctx.arg(2, "weight"), ctx.arg(3, "bias")
    return group_norm_rule(ctx, ctx.arg(0, "input"), ctx.value(ctx.arg(1, "num_groups")),
                           ctx.layout(w) if w is not None else None,
                           ctx.layout(b) if b is not None else None)


@rule(F.normalize, kinds=ALL)
def _normalize(ctx):
    lay = list(ctx.layout(ctx.arg(0, "input")))
    dim = norm_dim(ctx.value(ctx.arg(2, "dim", 1)), len(lay)) if lay else 0
    for i, s in enumerate(lay):  # x / ||x||: orthogonal maps of the normed axis keep it
        ctx.restrict(s, {"sign", "orthogonal"} if i == dim else {"permutation"}, "normalize")
    return lay


@rule(torch._weight_norm)
def _weight_norm(ctx):
    """``_weight_norm(v, g, dim) = g * v / ||v||`` with the norm over every axis
    but ``dim`` (``nn.utils.weight_norm`` and its parametrization): any
    permutation of any axis of ``v`` commutes with it; ``g`` follows ``dim``."""
    v, g = ctx.args[0], ctx.args[1]
    lay = list(ctx.layout(v))
    dim = ctx.value(ctx.arg(2, "dim", 0))
    lg, sg = ctx.layout(g), ctx.shape(g)
    if dim is None or dim == -1 and len(sg) == 0:
        return lay
    dim = dim % len(lay)
    if len(sg) == len(lay):
        ctx.union(lg[dim], lay[dim])
    elif len(sg) == 1 and sg[0] == ctx.shape(v)[dim]:
        ctx.union(lg[0], lay[dim])
    else:
        raise ValueError(f"weight-norm gain of shape {tuple(sg)}")
    return lay
