"""Looking inside an opaque call: a leaf module or a function fx kept whole.

The engine (:meth:`~autobasin.infer.engine.GraphInference.opaque`) owns the
order in which it tries to see through such a call; this module traces the
call's body so that it can:

1. plainly, with the non-tensor arguments fixed to the values seen on the
   example inputs (timm's notrace functions, most leaf modules);
2. with the example *shapes* fixed too (:class:`~autobasin.trace.ConcreteTracer`),
   so that Python control flow on shapes (``if H == self.window_size``,
   ``int(math.sqrt(N))``) no longer stops the trace: torchvision's
   ``shifted_window_attention``, timm's TinyVitBlock or LocalWindowAttention.

Control flow on tensor *values* stops both; the engine then falls back to a
rule for a base class, or blocks.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from ..trace import AutoLeafTracer, ConcreteTracer, ExampleRecorder, prune_unused

MAX_INLINE_DEPTH = 4


def trace_body(node: fx.Node, target, is_module: bool, args: tuple, kwargs: dict,
               shapes_fixed: bool):
    """The traced body of a call to ``target`` (a module, or a function) with
    these example arguments, and a recorder that has run it on them; None
    when it cannot be traced that way."""
    call = inline_call(target, args, kwargs, is_module)
    inline_names = {"m"} if is_module else set()
    skip = () if is_module else (node.target,)
    if shapes_fixed:
        tracer = ConcreteTracer(call.tensors, inline=inline_names, skip_autowrap=skip)
    else:
        tracer = AutoLeafTracer(inline=inline_names, skip_autowrap=skip)
    graph = tracer.trace(call)
    if tracer.failed and not shapes_fixed:
        return None
    return recorded_body(tracer, graph, call)


def recorded_body(tracer, graph: fx.Graph, call: "_InlineCall"):
    """The traced body of an inlined call as a pruned GraphModule, and a
    recorder that has run it on the call's example tensors."""
    gm = fx.GraphModule(tracer.root, graph)
    prune_unused(gm)
    capture = {n for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
    rec = ExampleRecorder(gm, capture)
    with torch.no_grad():
        rec.run(*call.tensors)
    return gm, rec


class _InlineCall(nn.Module):
    """Calls one module or function with the non-tensor arguments fixed to the
    values seen on the example inputs; the tensor arguments become inputs.
    fx cannot trace ``*args``, so ``forward`` gets one named parameter per
    tensor (see :func:`inline_call`)."""

    def __init__(self, target, args, kwargs, is_module: bool):
        super().__init__()
        if is_module:
            self.m = target
        else:
            self.fn = target
        self.template, self.tensors = _split_tensors((args, kwargs))

    def call(self, *tensors):
        args, kwargs = _fill(self.template, list(tensors))
        fn = self.m if hasattr(self, "m") else self.fn
        return fn(*args, **kwargs)


def inline_call(target, args, kwargs, is_module: bool) -> _InlineCall:
    obj = _InlineCall(target, args, kwargs, is_module)
    names = ", ".join(f"t{i}" for i in range(len(obj.tensors)))
    scope: dict = {}
    exec(f"def forward(self, {names}):\n    return self.call({names})\n", scope)  # noqa: S102
    obj.__class__ = type("InlineCall", (_InlineCall,), {"forward": scope["forward"]})
    return obj


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _split_tensors(obj):
    """``obj`` flattened by torch's pytree (named tuples kept whole, as
    :func:`paired_layouts` pairs them), and its tensors in that order."""
    leaves, spec = pytree.tree_flatten(obj, is_leaf=_is_namedtuple)
    return (leaves, spec), [x for x in leaves if isinstance(x, torch.Tensor)]


def _fill(template, tensors):
    """``template`` from :func:`_split_tensors` with its tensors replaced, in order."""
    leaves, spec = template
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves],
                                 spec)


def paired_layouts(layout, node: fx.Node, captured: tuple) -> list:
    """Layouts of ``node``'s tensor arguments (``layout(arg)`` each), in the
    order :func:`inline_call` makes them inputs: walks the node's arguments and
    the values ``captured`` for them on the example inputs together."""
    out = []

    def walk(n, v):
        if isinstance(v, torch.Tensor):
            if not isinstance(n, fx.Node):
                raise ValueError("a tensor argument without a node")
            out.append(layout(n))
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
    walk((tuple(node.args), dict(node.kwargs)), captured)
    return out
