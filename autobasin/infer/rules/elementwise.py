"""Elementwise ops: activations, arithmetic with broadcasting, casts, dropout.

An elementwise op commutes with any permutation of any axis, so the output
axes are the input axes; with broadcasting, axes of equal size are one axis.
Softmax-like ops along one axis also commute with permutations of it.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ALL, rule
from .common import admit_product, admit_sum, broadcast, first_tensor, norm_dim, op_name_of

# Ops whose every tensor argument broadcasts against the others.
BROADCAST_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.xor, operator.neg, operator.pos, operator.abs,
    operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.fmax, torch.fmin,
    torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.eq, torch.ne, torch.lt, torch.le,
    torch.gt, torch.ge, torch.logical_and, torch.logical_or, torch.logical_not, torch.logical_xor,
    torch.masked_fill, torch.clamp, torch.clip, torch.remainder, torch.fmod, torch.atan2,
    torch.hypot, torch.copysign, torch.rsub, torch.float_power, torch.xlogy, torch.polar, torch.complex,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.exp2, torch.expm1, torch.log,
    torch.log2, torch.log10, torch.log1p, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.erf, torch.erfc, torch.erfinv, torch.sin, torch.cos, torch.tan, torch.asin, torch.acos,
    torch.atan, torch.sinh, torch.cosh, torch.asinh, torch.acosh, torch.atanh, torch.sign,
    torch.sgn, torch.square, torch.reciprocal, torch.floor, torch.ceil, torch.round, torch.trunc,
    torch.frac, torch.nan_to_num, torch.isnan, torch.isinf, torch.isfinite, torch.sigmoid_,
    torch.relu_, torch.special.expit, torch.special.erf, torch.selu, torch.celu,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.clamp_min, torch.clamp_max,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid,
    F.tanh, F.elu, F.elu_, F.selu, F.celu, F.leaky_relu, F.leaky_relu_, F.softplus, F.softsign,
    F.tanhshrink, F.hardtanh, F.hardtanh_, F.logsigmoid, F.hardshrink, F.softshrink,
    F.threshold, F.threshold_, F.rrelu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, torch.nn.functional.softmax,
    torch.nn.functional.log_softmax, torch.softmax, torch.log_softmax, torch.special.softmax,
    F.softmin, operator.not_,
]
BROADCAST_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "pow", "pow_",
    "maximum", "minimum", "where", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv",
    "addcdiv_", "masked_fill", "masked_fill_", "clamp", "clamp_", "clip", "clip_", "eq", "ne",
    "lt", "le", "gt", "ge", "remainder", "fmod", "rsub", "__radd__", "__rmul__", "__rsub__",
    "__rtruediv__", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_",
    "log", "log_", "log1p", "sqrt", "sqrt_", "rsqrt", "abs", "abs_", "neg", "neg_", "erf",
    "sin", "cos", "sign", "square", "reciprocal", "floor", "ceil", "round", "softmax",
    "log_softmax", "nan_to_num", "logical_not", "isnan", "clamp_min", "clamp_max", "clamp_min_",
    "clamp_max_", "hardtanh", "hardtanh_", "fill_", "zero_", "exp2", "tan", "atan",
    "float_power", "logical_and", "logical_or", "bitwise_not", "copy_",
]
# Ops that keep the layout of their first tensor only (extra tensors are not
# combined elementwise: ``type_as(other)`` reads only other's dtype).
UNARY_METHODS = ["contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "int",
                 "long", "bool", "to", "type", "type_as", "cpu", "cuda", "requires_grad_",
                 "detach_", "conj", "conj_physical", "resolve_conj"]
# entry by entry on complex values too (a spectrum's conjugate: autocorrelation by FFT)
UNARY_FUNCS = [torch.clone, torch.detach, torch.Tensor.contiguous, torch.Tensor.float,
               torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.detach, torch.conj,
               torch.conj_physical, torch.resolve_conj, torch.real, torch.imag]

ELEMENTWISE_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Hardtanh, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d,
]


# Kinds of symmetry beyond permutations that elementwise ops admit (everything
# else admits permutations only): sums and linear maps any kind; positively
# homogeneous ops (ReLU: f(s x) = s f(x) for s > 0) positive scalings; odd ones
# (f(-x) = -f(x)) sign flips.
SUMS = {"add", "sub", "iadd", "isub", "add_", "sub_", "subtract", "__radd__", "rsub", "__rsub__"}
PRODUCTS = {"mul", "multiply", "imul", "mul_", "__rmul__"}
QUOTIENTS = {"div", "divide", "true_divide", "truediv", "itruediv", "div_"}
LINEAR = {"neg", "neg_", "pos", "dropout", "feature_dropout", "alpha_dropout", "dropout1d",
          "dropout2d", "dropout3d", "feature_alpha_dropout", "Identity", "Dropout", "Dropout1d",
          "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}
HOMOGENEOUS = {"relu", "relu_", "ReLU", "leaky_relu", "leaky_relu_", "LeakyReLU"}
ODD = {"tanh", "tanh_", "Tanh", "sin", "sinh", "asinh", "atan", "tan", "erf", "softsign",
       "Softsign", "tanhshrink", "Tanhshrink", "hardshrink", "Hardshrink", "softshrink",
       "Softshrink", "sign", "sgn"}


def _elementwise_kinds(ctx, tensors, out) -> None:
    name = type(ctx.module).__name__ if ctx.module is not None else ctx.op_name
    operands = [(ctx.layout(t), ctx.shape(t)) for t in tensors]
    shape = ctx.meta().shape
    if name in SUMS:
        numbers = [a for a in ctx.args[:2] if not ctx.is_tensor(a)]
        constant = any(ctx.value(a) != 0 for a in numbers)
        admit_sum(ctx, operands, out, shape, constant)
    elif name in PRODUCTS:
        admit_product(ctx, operands, out, shape)
    elif name in QUOTIENTS:
        den = ctx.args[1] if len(ctx.args) > 1 else None
        if ctx.is_tensor(den):  # a value divided by entries: only permutations
            ctx.restrict_layout(ctx.layout(den), {"permutation"}, "entries divided by")
        admit_product(ctx, operands, out, shape)
    elif name in LINEAR or (name in ("Hardtanh", "hardtanh", "hardtanh_") and _symmetric(ctx)):
        if name.startswith("hardtanh") or name == "Hardtanh":
            ctx.restrict_layout(out, {"sign"}, "hardtanh (odd)")
    elif name in HOMOGENEOUS or _clamps_below_at_zero(ctx, name):
        ctx.restrict_layout(out, {"scale"}, f"{name} (positively homogeneous)")
    elif name in ODD:
        ctx.restrict_layout(out, {"sign"}, f"{name} (odd)")
    else:
        ctx.restrict_layout(out, {"permutation"}, name)


def _sum_of_squares(ctx, x, out):
    """``x ** 2`` whose every use sums it over some axes (an RMS or L2 norm):
    the sum of squares along an axis is unchanged by any orthogonal map of it,
    so those axes of ``x`` admit orthogonal maps, and the squares get new axes
    there (the reductions consume them). None when the squares are used
    otherwise."""
    nd = len(out)
    dims: set[int] = set()
    for u in ctx.node.users:
        if u.op not in ("call_method", "call_function") or \
                op_name_of(u.target) not in ("mean", "sum") or u.args[0] is not ctx.node:
            return None
        d = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        d = ctx.value(d)
        if d is None:
            return None
        dims |= {norm_dim(k, nd) for k in ([d] if isinstance(d, int) else d)}
    if not dims:
        return None
    lay = list(ctx.layout(x))
    new = list(out)
    for j in dims:
        ctx.restrict(lay[j], {"sign", "orthogonal"}, "a sum of squares along the axis")
        new[j] = ctx.new(ctx.size[out[j]])
    for j, s in enumerate(new):
        if j not in dims:
            ctx.restrict(s, {"permutation"}, "squared entries")
    return new


def _clamps_below_at_zero(ctx, name: str) -> bool:
    """``clamp(x, min=0)`` / ``clamp_min(x, 0)`` with no upper bound: a ReLU."""
    if name not in ("clamp", "clamp_", "clip", "clamp_min", "clamp_min_"):
        return False
    lo = ctx.value(ctx.arg(1, "min"))
    hi = None if name.startswith("clamp_min") else ctx.value(ctx.arg(2, "max"))
    return isinstance(lo, (int, float)) and not isinstance(lo, bool) and lo == 0 and hi is None


def _symmetric(ctx) -> bool:
    m = ctx.module
    if m is not None:
        return m.min_val == -m.max_val
    lo, hi = ctx.value(ctx.arg(1, "min_val", -1.0)), ctx.value(ctx.arg(2, "max_val", 1.0))
    return lo == -hi


@rule(*BROADCAST_FUNCS, *BROADCAST_METHODS, *ELEMENTWISE_MODULES, kinds=ALL)
def elementwise_rule(ctx):
    if ctx.node.op == "call_module":
        tensors = [a for a in ctx.args if ctx.is_tensor(a)]
    else:
        tensors = ctx.tensor_args()
    meta = ctx.meta()
    if not hasattr(meta, "shape"):
        ctx.block_layout([ctx.layout(t) for t in tensors], "non-tensor result")
        return None
    out = broadcast(ctx, tensors, meta.shape)
    name = ctx.op_name if ctx.module is None else ""
    exponent = ctx.value(ctx.args[1]) if name in ("pow", "pow_") and len(ctx.args) > 1 else \
        2 if name == "square" else None
    if exponent == 2 and len(tensors) == 1:
        squares = _sum_of_squares(ctx, tensors[0], out)
        if squares is not None:
            return squares
    _elementwise_kinds(ctx, tensors, out)
    return out


@rule(*UNARY_METHODS, *UNARY_FUNCS, kinds=ALL)
def unary_rule(ctx):
    x = first_tensor(ctx)
    lay = list(ctx.layout(x))
    dtype = getattr(ctx.meta(), "dtype", None)
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        # a cast to integers or booleans rounds entry by entry: permutations only
        ctx.restrict_layout(lay, {"permutation"}, f"cast to {dtype}")
    return lay


@rule(nn.PReLU, F.prelu, torch.prelu)
def _prelu(ctx):
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    w = ctx.param("weight") if ctx.node.op == "call_module" else ctx.layout(ctx.arg(1, "weight"))
    if w and ctx.size[w[0]] > 1:
        ctx.union(lay[1 if len(lay) > 1 else 0], w[0])
    return lay


@rule(nn.GLU, F.glu)
def _glu(ctx):
    x = ctx.args[0]
    lay = list(ctx.layout(x))
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", -1)
    dim = dim % len(lay)
    half = ctx.shape(x)[dim] // 2
    a, b = ctx.cut(lay, dim, [half, half])
    ctx.union(a[dim], b[dim])
    return a


@rule(torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, "new_zeros",
      "new_ones", "new_full", "new_empty")
def constant_like(ctx):
    # A constant tensor is unchanged by any permutation of any of its axes.
    return ctx.fresh()


@rule(torch.zeros, torch.ones, torch.full, torch.empty)
def _constant(ctx):
    return ctx.fresh()
