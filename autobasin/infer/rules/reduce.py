"""Reductions, pooling, resampling, padding and spatial ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ALL, PERMUTATION, rule
from .common import broadcast, norm_dim

SYMMETRIC_REDUCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                        torch.logsumexp, torch.prod, torch.nansum, torch.nanmean, torch.norm,
                        torch.linalg.vector_norm, torch.all, torch.any, torch.count_nonzero,
                        "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod",
                        "nansum", "nanmean", "norm", "all", "any", "count_nonzero"]


def _reduced_dims(ctx, dim, ndim):
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [norm_dim(dim, ndim)]
    return [norm_dim(d, ndim) for d in dim]


# sums are linear in the kept axes (any kind passes them); a max is positively
# homogeneous (positive scalings pass); other reductions admit permutations only
LINEAR_REDUCTIONS = {"mean", "sum", "nansum", "nanmean"}
HOMOGENEOUS_REDUCTIONS = {"amax", "amin"}


@rule(*SYMMETRIC_REDUCTIONS, kinds=ALL)
def _reduce(ctx):
    """A sum, mean, max, norm... over an axis is unchanged by permuting that
    axis; the kept axes pass through."""
    x = ctx.args[0]
    lay = ctx.layout(x)
    target = ctx.target
    if target in (torch.norm, "norm"):
        dim = ctx.arg(2, "dim")
    elif target is torch.linalg.vector_norm:
        dim = ctx.arg(2, "dim")
    else:
        dim = ctx.arg(1, "dim")
    dim = ctx.value(dim)
    dims = _reduced_dims(ctx, dim, len(lay))
    out_shape = ctx.shape()
    # keepdim from the result's rank: positional arguments differ between
    # overloads (``var(x, dim, unbiased, keepdim)``, ``var(x, dim, *, keepdim)``)
    keep = len(out_shape) == len(lay) and len(lay) > 0
    if keep:
        out = [ctx.new(1) if i in dims else s for i, s in enumerate(lay)]
    else:
        out = [s for i, s in enumerate(lay) if i not in dims]
    if len(out) != len(out_shape):
        raise ValueError("unexpected reduction shape")
    name = ctx.op_name
    for i, s in enumerate(lay):
        if i in dims or name not in LINEAR_REDUCTIONS | HOMOGENEOUS_REDUCTIONS:
            ctx.restrict(s, PERMUTATION, f"{name} over the axis" if i in dims else name)
        elif name in HOMOGENEOUS_REDUCTIONS:
            ctx.restrict(s, {"scale"}, name)
    return out


@rule(torch.max, torch.min, "max", "min")
def _max(ctx):
    x = ctx.args[0]
    if ctx.is_tensor(ctx.arg(1, "dim")) or ctx.is_tensor(ctx.kwargs.get("other")):
        return broadcast(ctx, ctx.tensor_args(), ctx.shape())
    dim = ctx.value(ctx.arg(1, "dim"))
    lay = ctx.layout(x)
    if dim is None:
        return []
    d = norm_dim(dim, len(lay))
    keep = ctx.value(ctx.arg(2, "keepdim", False))
    out = [ctx.new(1) if i == d else s for i, s in enumerate(lay)] if keep else \
        [s for i, s in enumerate(lay) if i != d]
    # the indices are positions along the reduced axis (see _ranking)
    ctx.set_positions(lay[d], 1)
    return [out, list(out)]


@rule(torch.argmax, torch.argmin, "argmax", "argmin", torch.topk, "topk", torch.sort, "sort",
      torch.argsort, "argsort")
def _ranking(ctx):
    """argmax / argmin / topk / sort / argsort along ``dim``: the indices they
    return are positions along that axis (renumbered when it is permuted,
    see :meth:`Context.set_positions`), the values do not depend on its order
    (ties between equal entries aside: permuting may break them otherwise).
    The other axes pass through; the ranked axis of the result (topk's k,
    sort's order) is a new, fixed one."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    name = ctx.op_name
    pos = 2 if name == "topk" else 1
    dim = ctx.value(ctx.arg(pos, "dim", -1))
    meta = ctx.meta()
    if dim is None:  # over the flattened tensor: positions mix every axis
        ctx.block_layout(lay, f"{name} over all axes")
        return ctx.fresh(blocked=f"{name} output")
    d = norm_dim(dim, len(lay))
    outs = [meta] if hasattr(meta, "shape") else list(meta)
    layouts = []
    for m in outs:
        if len(m.shape) == len(lay):
            layouts.append(lay[:d] + [ctx.new(m.shape[d], f"{name} order")] + lay[d + 1:])
        elif len(m.shape) == len(lay) - 1:  # keepdim=False
            layouts.append(lay[:d] + lay[d + 1:])
        else:
            raise ValueError(f"unexpected {name} result shape")
    index_of = {"argmax": 0, "argmin": 0, "argsort": 0, "topk": 1, "sort": 1}[name]
    if hasattr(meta, "shape"):
        ctx.set_positions(lay[d])
        return layouts[0]
    ctx.set_positions(lay[d], index_of)
    return layouts


ORDER_STATISTICS = {"median": 1, "nanmedian": 1, "kthvalue": 2, "mode": 1, "quantile": 2,
                    "nanquantile": 2}


@rule(torch.median, "median", torch.nanmedian, "nanmedian", torch.kthvalue, "kthvalue",
      torch.mode, "mode", torch.quantile, "quantile", torch.nanquantile, "nanquantile",
      kinds=ALL)
def _order_statistic(ctx):
    """median / kthvalue / mode / quantile along ``dim``: the value does not depend
    on the order of that axis (among equal entries any pick has the value), so
    permuting it leaves the result as it is; the indices they return are
    positions along it. Per kept channel they commute with positive scalings only
    (quantiles interpolate, medians pick)."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    name = ctx.op_name
    # kthvalue and mode default to the last axis; median and quantile to all entries
    dim = ctx.value(ctx.arg(ORDER_STATISTICS[name], "dim",
                            -1 if name in ("kthvalue", "mode") else None))
    meta = ctx.meta()
    outs = [meta] if hasattr(meta, "shape") else list(meta)
    if dim is None:  # over all entries: no axis's order matters, nothing passes
        ctx.restrict_layout(lay, PERMUTATION, f"{name} over all entries")
        if not hasattr(meta, "shape"):
            raise ValueError(f"{name} over all entries returns one value")
        return ctx.fresh(blocked=f"{name} over all entries") if meta.shape else []
    d = norm_dim(dim, len(lay))
    ctx.restrict(lay[d], PERMUTATION, f"{name} over the axis")
    for k, t in enumerate(lay):
        if k != d:
            ctx.restrict(t, {"scale"}, name)
    q = ctx.arg(1, "q") if name.endswith("quantile") else None
    levels = q is not None and ctx.is_tensor(q) and len(ctx.shape(q)) == 1  # q's axis in front
    layouts = []
    for m in outs:
        keep = len(m.shape) - levels == len(lay)
        kept = [ctx.new(1) if k == d else t for k, t in enumerate(lay)] if keep else \
            [t for k, t in enumerate(lay) if k != d]
        front = [ctx.new(m.shape[0], f"{name} levels", structural=True)] if levels else []
        if len(front) + len(kept) != len(m.shape):
            raise ValueError(f"unexpected {name} result shape")
        layouts.append(front + kept)
    if len(layouts) == 2:  # (values, indices)
        ctx.set_positions(lay[d], 1)
        return layouts
    return layouts[0]


@rule(torch.cumsum, "cumsum", torch.cumprod, "cumprod", torch.cummax, torch.logcumsumexp)
def _scan(ctx):
    """A running sum/product along ``dim`` fixes that axis; others pass."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    d = norm_dim(ctx.value(ctx.arg(1, "dim")), len(lay))
    ctx.block(lay[d], "running scan depends on order")
    return lay


# ---------------------------------------------------------------- spatial ops
POOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1,
                nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2,
                nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2,
                nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.Upsample: None,
                nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2, nn.FractionalMaxPool2d: 2}
POOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1,
              F.avg_pool2d: 2, F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1,
              F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
              F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1,
              F.lp_pool2d: 2, F.interpolate: None, F.upsample: None,
              F.upsample_bilinear: 2, F.upsample_nearest: None, torch.max_pool2d: 2,
              torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1, torch.max_pool1d: 1,
              F.max_pool2d_with_indices: 2}


@rule(*POOL_MODULES, *POOL_FUNCS, kinds=ALL)
def _spatial(ctx):
    """Pooling and resampling mix positions of the trailing spatial axes
    (fixed) and act on every channel alike (passed through)."""
    x = ctx.args[0]
    lay = ctx.layout(x)
    k = POOL_MODULES.get(type(ctx.module)) if ctx.module is not None else POOL_FUNCS[ctx.target]
    if k is None:
        k = max(len(lay) - 2, 1)
    out_meta = ctx.meta()
    single = out_meta if hasattr(out_meta, "shape") else out_meta[0]
    name = type(ctx.module).__name__.lower() if ctx.module is not None else ctx.op_name
    spatial = list(range(len(lay) - k, len(lay)))
    # an axis the windows do not span (kernel 1, stride 1, no padding: Funnel pools
    # (seq, hidden) with a (2, 1) kernel) keeps each position apart: it passes
    kept = [d for d, untouched in zip(spatial, _untouched_axes(ctx, k, name, single.shape))
            if untouched]
    for d in spatial:
        if d not in kept:
            ctx.block(lay[d], "spatial axis", structural=True)
    # averaging and interpolation are linear and act on every channel alike (any
    # kind passes the channels); max pooling is positively homogeneous
    kinds = {"scale"} if "max" in name else PERMUTATION if "lp" in name else ALL
    if kinds is not ALL:
        for d, s in enumerate(lay):
            if d not in spatial or d in kept:
                ctx.restrict(s, kinds, name)
    out = [s if d not in spatial or d in kept else
           ctx.new(single.shape[d], "spatial axis", structural=True) for d, s in enumerate(lay)]
    if hasattr(out_meta, "shape"):
        return out
    return [out, [ctx.new(n, "pool indices") for n in out_meta[1].shape]]


def _untouched_axes(ctx, k: int, name: str, out_shape) -> list[bool]:
    """For each of the last ``k`` axes, whether a (max or average, not adaptive)
    pooling window leaves it alone: kernel 1, stride 1, no padding."""
    no = [False] * k
    if "pool" not in name or "adaptive" in name or "lp" in name or "fractional" in name:
        return no
    if ctx.module is not None:
        m = ctx.module
        kernel, stride, padding = m.kernel_size, m.stride, m.padding
    else:
        kernel = ctx.value(ctx.arg(1, "kernel_size"))
        stride = ctx.value(ctx.arg(2, "stride", None))
        padding = ctx.value(ctx.arg(3, "padding", 0))

    def per_axis(v):
        if v is None or (isinstance(v, (list, tuple)) and not v):
            return None
        v = list(v) if isinstance(v, (list, tuple)) else [v] * k
        return v if len(v) == k and all(isinstance(i, int) for i in v) else False

    kernel, stride, padding = per_axis(kernel), per_axis(stride), per_axis(padding)
    if not kernel or stride is False or padding is False:
        return no
    stride = stride or kernel  # no stride: the kernel's
    padding = padding or [0] * k
    shape = ctx.shape(ctx.args[0])
    return [kernel[i] == 1 and stride[i] == 1 and padding[i] == 0
            and shape[len(shape) - k + i] == out_shape[len(out_shape) - k + i] for i in range(k)]


def _axes_arg(ctx, pos: int, name: str, ndim: int, default):
    dims = ctx.value(ctx.arg(pos, name, default))
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [norm_dim(d, ndim) for d in dims]


@rule(torch.roll, "roll", torch.flip, "flip", torch.diff, "diff", torch.tril, torch.triu, "tril",
      "triu", "tril_", "triu_", torch.rot90, "rot90")
def _positional(ctx):
    """Ops that move entries only along some axes (roll, flip, a triangle of
    the last two axes): those axes are fixed, the others pass through."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    nd = len(lay)
    name = ctx.op_name
    if name in ("roll",):
        dims = _axes_arg(ctx, 2, "dims", nd, None)
    elif name in ("flip",):
        dims = _axes_arg(ctx, 1, "dims", nd, None)
    elif name == "diff":
        dims = _axes_arg(ctx, 2, "dim", nd, -1)
    elif name == "rot90":
        dims = _axes_arg(ctx, 2, "dims", nd, [0, 1])
    else:  # tril / triu
        dims = [nd - 2, nd - 1]
    if dims is None:
        ctx.block_layout(lay, f"{name} over the flattened tensor")
        return ctx.fresh(blocked=name)
    out_shape = ctx.shape()
    out = list(lay)
    for d in dims:
        ctx.block(lay[d], f"{name} moves positions")
        if out_shape[d] != ctx.size[lay[d]]:
            out[d] = ctx.new(out_shape[d], name)
    if name == "rot90":
        out[dims[0]], out[dims[1]] = ctx.new(out_shape[dims[0]], name), ctx.new(out_shape[dims[1]], name)
    return out


@rule("unfold")
def _sliding_windows(ctx):
    """``x.unfold(dim, size, step)``: windows along ``dim`` (which is fixed: a
    window holds neighbouring positions), a new last axis of window offsets;
    every other axis is the input's."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    dim = norm_dim(ctx.value(ctx.arg(1, "dimension")), len(lay))
    out_shape = ctx.shape()
    ctx.block(lay[dim], "sliding windows", structural=True)
    lay[dim] = ctx.new(out_shape[dim], "sliding windows", structural=True)
    return lay + [ctx.new(out_shape[-1], "window offsets", structural=True)]


@rule(F.unfold, nn.Unfold)
def _im2col(ctx):
    """``F.unfold`` (im2col): (N, C, H, W) -> (N, C x kernel positions, L).
    The output's channel axis is a grid whose rows are the input's channels."""
    x = ctx.args[0]
    lay, shape, out_shape = ctx.layout(x), ctx.shape(x), ctx.shape()
    c, k = shape[-3], out_shape[-2] // shape[-3]
    out = [ctx.new(n) for n in out_shape]
    kids = ctx.refine_product(out[-2], [c, k])
    ctx.union(kids[0], lay[-3])
    ctx.block(kids[1], "kernel positions", structural=True)
    ctx.block(out[-1], "patch positions", structural=True)
    for s in lay[-2:]:
        ctx.block(s, "im2col", structural=True)
    if len(out_shape) == 3:
        ctx.union(out[0], lay[0])
    return out


@rule(F.fold, nn.Fold)
def _col2im(ctx):
    """``F.fold`` (col2im): (N, C x kernel positions, L) -> (N, C, H, W), the
    inverse grid of :func:`_im2col`."""
    x = ctx.args[0]
    lay, shape, out_shape = ctx.layout(x), ctx.shape(x), ctx.shape()
    c = out_shape[-3]
    kids = ctx.refine_product(lay[-2], [c, shape[-2] // c])
    ctx.block(kids[1], "kernel positions", structural=True)
    ctx.block(lay[-1], "patch positions", structural=True)
    out = [ctx.new(n) for n in out_shape]
    ctx.union(out[-3], kids[0])
    for s in out[-2:]:
        ctx.block(s, "col2im", structural=True)
    if len(shape) == 3:
        ctx.union(out[0], lay[0])
    return out


@rule(F.grid_sample, kinds=ALL)
def _grid_sample(ctx):
    """``grid_sample(input (N, C, *spatial), grid (N, *out, k))``: every channel is
    sampled at the same points, so the channels pass through (any linear map of
    them commutes: the sampling, and zero padding, are linear per channel); the
    spatial axes, and the grid, whose values are coordinates, are fixed."""
    x, grid = ctx.arg(0, "input"), ctx.arg(1, "grid")
    lay = list(ctx.layout(x))
    for s in lay[2:]:
        ctx.block(s, "sampled spatial axis", structural=True)
    if ctx.is_tensor(grid):
        lg = list(ctx.layout(grid))
        ctx.union(lay[0], lg[0])
        for s in lg[1:]:
            ctx.block(s, "grid_sample's coordinates", structural=True)
    out_shape = ctx.shape()
    return lay[:2] + [ctx.new(n, "sampled spatial axis", structural=True)
                      for n in out_shape[2:]]


def _roi_align_ops() -> list:
    try:
        import torchvision  # noqa: F401 - registers torch.ops.torchvision
        return [torchvision.ops.roi_align, torch.ops.torchvision.roi_align]
    except (ImportError, AttributeError, RuntimeError):
        return []


@rule(*_roi_align_ops(), kinds=ALL)
def _roi_align(ctx):
    """``roi_align(input (N, C, H, W), boxes, ...)`` -> (boxes, C, h, w): every
    channel is sampled at the same points (bilinear weights that depend on the
    boxes only), so the channels pass through under any linear map; the boxes'
    axis and the spatial axes are positions."""
    lay = list(ctx.layout(ctx.args[0]))
    for s in [lay[0]] + lay[2:]:
        ctx.block(s, "roi_align samples positions", structural=True)
    out_shape = ctx.shape()
    return [ctx.new(out_shape[0], "one row per box", structural=True), lay[1]] + \
        [ctx.new(n, "roi_align samples positions", structural=True) for n in out_shape[2:]]


_FFT_1D = {"fft", "ifft", "rfft", "irfft", "hfft", "ihfft"}
_FFT_2D = {"fft2", "ifft2", "rfft2", "irfft2", "hfft2", "ihfft2"}
_FFT_ND = {"fftn", "ifftn", "rfftn", "irfftn", "hfftn", "ihfftn"}


def _fft_ops() -> list:
    names = sorted(_FFT_1D | _FFT_2D | _FFT_ND)
    return [getattr(torch.fft, n) for n in names if hasattr(torch.fft, n)] + \
        [getattr(torch.ops.aten, "fft_" + n) for n in names if hasattr(torch.ops.aten, "fft_" + n)]


@rule(*_fft_ops(), kinds=ALL)
def _fft(ctx):
    """A discrete Fourier transform along some axes mixes the positions of each
    (those axes of input and result are fixed) and acts on every other axis
    entry by entry, linearly: those pass through under any linear map."""
    name = ctx.op_name.removeprefix("fft_")
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    size = ctx.arg(1, "n" if name in _FFT_1D else "s")
    default = -1 if name in _FFT_1D else (-2, -1) if name in _FFT_2D else None
    dim = ctx.value(ctx.arg(2, "dim", default))
    if dim is None:
        size = ctx.value(size)
        dims = range(len(lay) - len(size), len(lay)) if size is not None else range(len(lay))
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
    dims = {norm_dim(d, len(lay)) for d in dims}
    reason = f"{name} mixes positions"
    out = []
    for j, (s, n) in enumerate(zip(lay, ctx.shape())):
        if j in dims:
            ctx.block(s, reason)
            out.append(ctx.new(n, reason))
        else:
            out.append(s)
    return out


@rule(F.affine_grid)
def _fix_all(ctx):
    """Ops that move entries between positions of their axes in ways that do
    not commute with permutations: every axis they see is fixed."""
    name = ctx.op_name
    for t in ctx.tensor_args():
        ctx.block_layout(ctx.layout(t), f"{name} mixes positions")
    return ctx.fresh(blocked=f"{name} output")


@rule(F.pad, torch.constant_pad_nd, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
      nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
      nn.ReplicationPad2d, nn.CircularPad2d)
def _pad(ctx):
    """Constant padding prepends/appends constant segments; other modes copy
    edge entries, which fixes the padded axis."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    if ctx.module is not None:
        pad = ctx.module.padding
        pad = list(pad) if isinstance(pad, (tuple, list)) else [pad] * (2 * (len(lay) - 2))
        mode = "constant" if "Zero" in type(ctx.module).__name__ or "Constant" in type(ctx.module).__name__ else "other"
    else:
        pad = list(ctx.value(ctx.arg(1, "pad")))
        mode = ctx.value(ctx.arg(2, "mode", "constant"))
        if ctx.target is torch.constant_pad_nd:
            mode = "constant"
    out = list(lay)
    for i in range(len(pad) // 2):
        axis = len(lay) - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        if lo == 0 and hi == 0:
            continue
        if mode != "constant" or lo < 0 or hi < 0:
            ctx.block(lay[axis], "padding copies entries")
            out[axis] = ctx.new(ctx.shape()[axis], "padded axis")
            continue
        o = ctx.new(ctx.shape()[axis])
        pieces = ctx.refine_concat(o, [lo, ctx.size[lay[axis]], hi])
        ctx.union(pieces[1], lay[axis])
        out[axis] = o
    return out


@rule(nn.PixelShuffle, F.pixel_shuffle, nn.PixelUnshuffle, F.pixel_unshuffle)
def _pixel_shuffle(ctx):
    """``pixel_shuffle``: channel ``c * r^2 + i * r + j`` moves to position
    ``(i, j)`` of an r x r block of output pixel ``c``. The channels are a grid
    (C, r, r): the C factor permutes with the output channels, the two r
    factors are spatial offsets (fixed). ``pixel_unshuffle`` is the inverse."""
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    if ctx.module is not None:
        r = getattr(ctx.module, "upscale_factor", None) or ctx.module.downscale_factor
    else:
        r = ctx.value(ctx.arg(1, "upscale_factor" if ctx.op_name == "pixel_shuffle"
                              else "downscale_factor"))
    out_shape = ctx.shape()
    c = len(lay) - 3
    shuffle = ctx.op_name == "pixel_shuffle" or isinstance(ctx.module, nn.PixelShuffle)
    for s in lay[c + 1:]:
        ctx.block(s, "spatial axis", structural=True)
    out = lay[:c] + [ctx.new(out_shape[c])] + [ctx.new(n, "spatial axis", structural=True)
                                                for n in out_shape[c + 1:]]
    grid_axis, plain_axis = (lay[c], out[c]) if shuffle else (out[c], lay[c])
    kids = ctx.refine_product(grid_axis, [ctx.size[plain_axis], r, r])
    for k in kids[1:]:
        ctx.block(k, "pixel (un)shuffle offsets", structural=True)
    ctx.union(kids[0], plain_axis)
    return out


@rule(nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, nn.LocalResponseNorm, F.local_response_norm,
      nn.CrossMapLRN2d)
def _channel_mixing(ctx):
    """Ops that move entries between channels and other positions."""
    name = type(ctx.module).__name__ if ctx.module else ctx.op_name
    for t in ctx.tensor_args():
        ctx.block_layout(ctx.layout(t), f"{name} mixes channels")
    return ctx.fresh(blocked=f"{name} output")
