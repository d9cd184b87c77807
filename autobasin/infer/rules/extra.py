"""Rules found missing by the model-zoo sweep (``benchmarks/zoo.py``).

* Any leaf module that has no rule and no parameters or buffers of its own
  (timm's notrace blocks such as TinyVitBlock, vgg's ConvMlp, MobileVitBlock,
  efficientvit's LocalWindowAttention / LiteMLA, ...): its body is traced with
  tensor *shapes* fixed to those seen on the example inputs, so that Python
  control flow on shapes (``if H == self.window_size``, ``int(math.sqrt(N))``,
  ``if v.device.type != 'meta'``) no longer stops the trace, and inference
  continues inside. Control flow on tensor *values* still stops it; the module
  is then left to the engine's default (blocked, or passed through).

Every rule here only adds constraints the op really imposes, and blocks what
it cannot describe.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
from torch import nn

from ..engine import (MAX_INLINE_DEPTH, TensorTableView, _get_attr, _inline_call,
                      is_tensor_meta, recorded_body)
from ..registry import rule
from ...guard import eval_mode
from ...trace import AutoLeafTracer


# ------------------------------------------- shape-specialised inlining
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "is_meta", "is_sparse", "layout",
               "requires_grad", "is_quantized", "is_nested", "is_mkldnn"}
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point",
                 "is_complex", "is_contiguous", "element_size", "get_device"}
_META_FUNCTIONS = {torch.numel, torch.is_floating_point, torch.is_complex,
                   torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel}
_MISSING = object()


class _ValueProxy(fx.Proxy):
    """A proxy that knows the value its node takes on the example inputs and
    answers questions about shape, dtype and device with plain Python values."""

    def __getattr__(self, k):
        if k in _META_ATTRS:
            v = self.tracer.value_of(self)
            if isinstance(v, torch.Tensor):
                return getattr(v, k)
        return _ValueAttribute(self, k)

    def __len__(self):
        v = self.tracer.value_of(self)
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                raise TypeError("len() of a 0-d tensor")
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
        return super().__len__()

    def __iter__(self):
        v = self.tracer.value_of(self)
        if isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0):
            return iter([self[i] for i in range(len(v))])
        return super().__iter__()

    def __setitem__(self, idx, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, idx, value), {})


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


class ConcreteTracer(AutoLeafTracer):
    """AutoLeafTracer that computes every node's value on example inputs while
    tracing. Shape, dtype and device queries return those values' Python
    values, so control flow on them is specialised to the example; control
    flow on tensor values still fails the trace."""

    def __init__(self, inputs, **kwargs):
        super().__init__(**kwargs)
        self.inputs = list(inputs)
        self.values: dict[fx.Node, object] = {}
        self._evaluating = False
        self._placeholders = 0

    def proxy(self, node):
        return _ValueProxy(node, self)

    def value_of(self, a):
        if isinstance(a, fx.proxy.Attribute):
            return getattr(self.value_of(a.root), a.attr)
        if isinstance(a, fx.Proxy):
            v = self.values.get(a.node, _MISSING)
            if v is _MISSING:
                raise RuntimeError(f"no value for {a.node}")
            return v
        return a

    def _values(self, obj):
        return fx.node.map_aggregate(obj, self.value_of)

    def _evaluate(self, fn):
        was = self._evaluating
        self._evaluating = True
        try:
            with torch.no_grad():
                return fn()
        finally:
            self._evaluating = was

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        if kind == "call_method" and target in _META_METHODS or \
                kind == "call_function" and target in _META_FUNCTIONS:
            a, kw = self._values(tuple(args)), self._values(dict(kwargs))
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            return target(*a, **kw)
        if kind == "call_function" and target is getattr and len(args) == 2 and args[1] in _META_ATTRS:
            v = self.value_of(args[0])
            if isinstance(v, torch.Tensor):
                return getattr(v, args[1])
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            value = self.inputs[self._placeholders]
            self._placeholders += 1
        elif kind == "get_attr":
            value = _get_attr(self.root, target)
        elif kind in ("call_function", "call_method", "call_module"):
            a, kw = self._values(tuple(args)), self._values(dict(kwargs))
            if kind == "call_function":
                value = self._evaluate(lambda: target(*a, **kw))
            elif kind == "call_method":
                value = self._evaluate(lambda: getattr(a[0], target)(*a[1:], **kw))
            else:
                mod = self.root.get_submodule(target)
                value = self._evaluate(lambda: mod(*a, **kw))
        else:
            return p
        self.values[p.node] = value
        return p

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _paired_layouts(ctx, node_args, real_args) -> list:
    """Layouts of the tensor arguments, in the order ``_inline_call`` makes
    them inputs (walks the node's arguments and the captured values together)."""
    out = []

    def walk(n, v):
        if isinstance(v, torch.Tensor):
            if not isinstance(n, fx.Node):
                raise ValueError("a tensor argument without a node")
            out.append(ctx.layout(n))
        elif isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            if not isinstance(n, (list, tuple)) or len(n) != len(v):
                raise ValueError("argument structure differs from the captured values")
            for a, b in zip(n, v):
                walk(a, b)
        elif isinstance(v, dict):
            if not isinstance(n, dict):
                raise ValueError("argument structure differs from the captured values")
            for k in v:
                walk(n[k], v[k])
    walk((tuple(ctx.node.args), dict(ctx.node.kwargs)), ctx.engine.captured[ctx.node])
    return out


class _QualifiedView(TensorTableView):
    """The tensor table seen from inside an inlined module, naming tensors by
    their full qualified name at any depth. (``TensorTableView.view`` starts
    over from the inner graph's targets, so two instances of a module nested
    in inlined calls would share names such as ``m.attn.weight``; the table
    caches symbols by name, so they would share symbols.)"""

    _calls = 0

    def view(self, gm, prefix, strip=""):
        if prefix:
            rel = prefix[len(self.strip):] if self.strip and prefix.startswith(self.strip) else prefix
            return _QualifiedView(self.table, gm, self.prefix + rel, strip)
        # an inlined function: its constants get names of their own
        _QualifiedView._calls += 1
        return _QualifiedView(self.table, gm, f"{self.prefix}<call{_QualifiedView._calls}>.", strip)


def _view(engine, node, gm) -> TensorTableView:
    outer = engine.tensors
    target = node.target
    if isinstance(outer, TensorTableView):
        strip = outer.strip
        rel = target[len(strip):] if strip and target.startswith(strip) else target
        prefix = outer.prefix + rel + "."
        table = outer.table
    else:
        prefix = f"{engine.prefix}{target}."
        table = outer
    return _QualifiedView(table, gm, prefix, "m.")


def _trace_concrete(node, module, args, kwargs):
    """Trace the body of a module or function call with the example shapes
    fixed; return it and its recorded values on the example arguments."""
    if module is not None:
        call = _inline_call(module, args, kwargs, True)
        tracer = ConcreteTracer(call.tensors, inline={"m"})
    else:
        call = _inline_call(node.target, args, kwargs, False)
        tracer = ConcreteTracer(call.tensors, inline=set(), skip_autowrap=(node.target,))
    return recorded_body(tracer, tracer.trace(call), call)


def inline_concrete(ctx):
    """Infer through the body of this call (a leaf module, or a function that
    fx leaves whole, such as one registered with ``torch.fx.wrap``), traced
    with the example shapes fixed. Returns the output layout, or None when the
    body cannot be traced that way (nothing is constrained then)."""
    engine, node = ctx.engine, ctx.node
    is_module = node.op == "call_module"
    if engine.depth >= MAX_INLINE_DEPTH or node not in engine.captured or not (
            is_module or node.op == "call_function" and inspect.isfunction(node.target)):
        return None
    from ..engine import GraphInference
    args, kwargs = engine.captured[node]
    module = ctx.module if is_module else None
    try:
        with eval_mode(*([module] if is_module else [])):
            gm, rec = _trace_concrete(node, module, args, kwargs)
        in_layouts = _paired_layouts(ctx, args, kwargs)
    except Exception:  # noqa: BLE001 - not traceable even with fixed shapes
        return None
    view = _view(engine, node, gm) if is_module else engine.tensors.view(gm, engine.prefix)
    sub = GraphInference(gm, engine.sym, view, rec.meta,
                         rec.captured, "", engine.depth + 1, engine.log, engine.distributions,
                         rec.passthrough)
    try:
        out = sub.run(in_layouts, block_io=False)
        return engine._check_layout(node, out)
    except Exception as e:  # noqa: BLE001 - constraints may be half applied: fix everything
        if not is_module:
            raise  # the engine blocks every tensor argument, parameters included
        engine.block_module_tensors(module, f"inference inside failed: {type(e).__name__}: {e}")
        raise


@rule(nn.Module, inherit=True, params=())
def _any_module(ctx):
    """A leaf module with no rule and no tensors of its own: infer through its
    body with the example shapes fixed; otherwise the engine's default."""
    out = inline_concrete(ctx)
    if out is not None:
        return out
    # the engine's default for an opaque call (it asks this rule only after
    # its own attempts): block what goes in, nothing is known of what comes out
    reason = f"no rule for module {type(ctx.module).__name__} ({ctx.node.target})"
    ctx.engine.log.append((ctx.node.name, reason))
    for a in ctx.tensor_args():
        ctx.block_layout(ctx.layout(a), reason)
    return ctx.fresh(blocked=reason)

