"""Walk an fx graph, apply rules, and read the PermutationSpec off the result.

One pass in topological order. Each node's output gets a *layout*: a list of
axis symbols for a tensor (see :mod:`autobasin.infer.symbols`), a list of
layouts for a tuple or list, None for anything else. Parameters and buffers
get symbols on first use. Graph inputs and outputs are blocked; an op without
a rule blocks every axis it touches, unless its body can be traced and
inferred (timm's notrace functions and leaf modules usually can, given the
concrete non-tensor arguments seen on the example inputs).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..guard import eval_mode
from ..trace import OPAQUE_VALUE, get_attr
from .context import SHAPE_QUERIES, Context, is_tensor_meta, layout_symbols, map_meta
from .inline import MAX_INLINE_DEPTH, paired_layouts, trace_body
from .registry import ALL, FUNCTION_RULES, METHOD_RULES, PERMUTATION, module_rule
from .rope import Rope
from .routing import Routing
from .symbols import Symbols

# Ops that move, copy or cast the values of their first argument without computing on them:
# positions along an axis (see Context.set_positions) stay positions through them.
_MOVES_VALUES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "clone", "contiguous", "to", "_to_copy", "alias", "detach", "expand", "permute",
                 "transpose", "t", "view_as", "reshape_as", "type_as", "long", "int"}

_CLAMPS = {"clamp": ("min", "max"), "clip": ("min", "max"), "clamp_min": ("min",), "clamp_max": ("max",)}


def _clamps_to_axis(node: fx.Node, ctx: "Context", n: int) -> bool:
    """Whether ``node`` clamps its first argument, positions along an axis of
    size ``n``, to bounds no valid position crosses: a lower bound of exactly 0
    and an upper one of exactly ``n - 1``, given as plain numbers (a tensor
    bound, or any other value, is not known to keep them)."""
    names = _CLAMPS.get(ctx.op_name)
    if names is None:
        return False
    given = {}
    for i, name in enumerate(names):
        if len(node.args) > 1 + i:
            given[name] = node.args[1 + i]
        elif name in node.kwargs:
            given[name] = node.kwargs[name]
    if set(node.kwargs) - set(names) or len(node.args) > 1 + len(names):
        return False
    bounds = {k: v for k, v in given.items() if v is not None}
    if not bounds:
        return False
    for name, b in bounds.items():
        v = ctx.value(b) if isinstance(b, fx.Node) else b
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if v != (0 if name == "min" else n - 1):
            return False
    return True



def is_user_opaque(opaque, name: str, module) -> bool:
    """Whether the user marked module ``name`` opaque, by name or by type."""
    return name in opaque or any(isinstance(o, type) and isinstance(module, o) for o in opaque)


class GraphInference:
    """Inference over one GraphModule (the model, or the inside of an opaque call)."""

    def __init__(self, gm: fx.GraphModule, sym: Symbols, tensors: "TensorTable",
                 meta: dict, captured: dict, name_prefix: str = "", depth: int = 0,
                 log: list | None = None, distributions: list | None = None,
                 passthrough: dict | None = None):
        self.gm = gm
        self.sym = sym
        self.tensors = tensors
        self.meta = meta
        self.captured = captured
        self.prefix = name_prefix
        self.depth = depth
        self.layouts: dict[fx.Node, Any] = {}
        self.log = log if log is not None else []
        self.distributions = distributions if distributions is not None else []
        self.passthrough = passthrough or {}
        self.cut_cache: dict[tuple[int, tuple[int, ...]], list] = {}
        # integer tensors whose values are positions along an axis (the indices
        # of topk or argmax): node -> symbol, or {tuple index: symbol}
        self.positions: dict[fx.Node, Any] = {}
        # masks, taint, garbage and zeros of routing with muted slots (see routing.py)
        self.routing = Routing(self)
        # rotary position embeddings confirmed on the example run (rope.py)
        self.rope = Rope(self)

    def user_opaque(self, target: str, module) -> bool:
        return is_user_opaque(self.tensors.opaque, self.prefix + target, module)

    def tensor_symbols(self, target: str) -> list[int]:
        return self.tensors.symbols(self.prefix + target, self.gm, target)

    # ------------------------------------------------------------------ walk
    def run(self, input_layouts: list | None = None, block_io: bool = True,
            block_outputs: bool = True):
        """Walk the graph; return the output's layout. ``block_io`` blocks the
        inputs' and outputs' axes (structural), ``block_outputs=False`` leaves
        the outputs to the caller (who may block only some of them)."""
        self.routing.prepare(self.gm.graph)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for i, node in enumerate(placeholders):
            m = self.meta.get(node)
            if input_layouts is not None and i < len(input_layouts) and input_layouts[i] is not None:
                self.layouts[node] = input_layouts[i]
            else:
                self.layouts[node] = map_meta(m, lambda t: [self.sym.new(n, "graph input", True)
                                                            for n in t.shape])
        out_layout = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out_layout = self._collect(node.args[0])
                for a in node.all_input_nodes:  # positions handed out are read as numbers
                    for s in self._held_positions(a):
                        self.sym.block(s, f"{a.name}: positions along the axis are returned")
                self.routing.finish(node.all_input_nodes)
                if block_io and block_outputs:
                    for s in layout_symbols(out_layout):
                        self.sym.block(s, "graph output", structural=True)
                continue
            self.layouts[node] = self.visit(node)
        return out_layout

    def _collect(self, arg):
        if isinstance(arg, fx.Node):
            return self.layouts.get(arg)
        if isinstance(arg, (list, tuple)):
            return [self._collect(a) for a in arg]
        if isinstance(arg, dict):
            return {k: self._collect(v) for k, v in arg.items()}
        return None

    def visit(self, node: fx.Node):
        ctx = Context(self, node)
        if node.op == "get_attr":
            meta = self.meta.get(node)
            # a tensor the graph reads but never uses (export lifts every
            # parameter, used or not) gets no symbols: its axes stay fixed as
            # "not used by forward on the example inputs"
            if is_tensor_meta(meta) and node.users:
                return list(self.tensor_symbols(node.target))
            return None
        fn, what = self.find_rule(node, ctx)
        if node in self.routing.claims:  # part of a grouped product (routing.py)
            fn, what = self.routing.claim(node, fn), f"{what} in a grouped product"
        elif node in self.rope.claims:  # part of a rotary position embedding (rope.py)
            fn, what = self.rope.claim(node, fn), f"{what} in a rotary position embedding"
        try:
            if fn is not None:
                out = self._check_layout(node, fn(ctx))
                self._admit(node, ctx, fn, out, what)
            else:
                out = self.opaque(node, ctx, what)
            self.routing.follow(node, ctx)
            self._follow_positions(node, ctx)
            return out
        except Exception as e:  # noqa: BLE001 - a failing rule fails closed
            reason = f"rule for {what} failed: {type(e).__name__}: {e}"
            self.log.append((node.name, reason))
            for a in node.all_input_nodes:  # positions it may have used as numbers
                for sym in self._held_positions(a):
                    self.sym.block(sym, reason)
            self.routing.finish(node.all_input_nodes)
            # every input, containers too (a ModelOutput, a dict, a tuple of
            # tensors): whatever the rule would have related stays fixed
            ctx.block_layout([self.layouts.get(a) for a in node.all_input_nodes], reason)
            if node.op == "call_module":
                # the rule may have related some of the module's tensors before
                # it failed: none of them may move
                self.block_module_tensors(ctx.module, reason)
            return ctx.fresh(blocked=reason)

    def _admit(self, node: fx.Node, ctx: Context, fn, out, what: str) -> None:
        """Every axis the op touches admits only the kinds of symmetry its rule
        declares (permutations unless it says more, see ``registry.rule``)."""
        kinds = getattr(fn, "kinds", PERMUTATION)
        if kinds >= ALL:
            return
        touched = [self.layouts.get(a) for a in node.all_input_nodes] + [out]
        if node.op == "call_module":
            table = getattr(self.tensors, "table", self.tensors)
            for t in ctx.module.state_dict(keep_vars=True).values():
                for name in table.by_id.get(id(t), []):
                    touched.append(table.syms.get(name))
        reason = f"{node.name}: {what} admits only {', '.join(sorted(kinds))}"
        for s in layout_symbols(touched):
            self.sym.restrict(s, kinds, reason)

    def _held_positions(self, node: fx.Node) -> list[int]:
        """The axes whose positions ``node``'s value holds (one per tuple element)."""
        held = self.positions.get(node)
        if isinstance(held, dict):
            return list(held.values())
        return [] if held is None else [held]

    def _follow_positions(self, node: fx.Node, ctx: "Context") -> None:
        """Values that are positions along an axis (see :meth:`Context.set_positions`)
        may be moved around (reshaped, copied, taken out of a tuple) and used to
        index that axis (which a rule declares with :meth:`Context.consume`);
        any other use reads them as numbers, and fixes the axis. Positions
        joined with positions (``cat`` of the top-1 and top-2 picks) stay
        positions, of one axis."""
        if ctx.op_name in ("cat", "concat", "concatenate", "stack") and node.all_input_nodes and \
                all(isinstance(self.positions.get(a), int) for a in node.all_input_nodes):
            held = [self.positions[a] for a in node.all_input_nodes]
            for s in held[1:]:
                self.sym.union(held[0], s)
            self.positions[node] = held[0]
            return
        for a in node.all_input_nodes:
            s = self.positions.get(a)
            if s is None or a in ctx.consumed:
                continue
            if isinstance(s, dict):  # a tuple: only taking an element out is safe
                i = tuple_element(node)
                if i is not None and node.args[0] is a:
                    if i in s:
                        self.positions[node] = s[i]
                    continue
                for sym in s.values():
                    self.sym.block(sym, f"{node.name}: positions along the axis are used as numbers")
                continue
            if ctx.op_name in _MOVES_VALUES and node.all_input_nodes[0] is a \
                    and is_tensor_meta(self.meta.get(node)):
                self.positions[node] = s
                continue
            if node.all_input_nodes[0] is a and node.args and node.args[0] is a \
                    and is_tensor_meta(self.meta.get(node)) and _clamps_to_axis(node, ctx, self.sym.size[s]):
                self.positions[node] = s  # a clamp to [0, n-1] leaves every position as it is
                continue
            if self.routing.tainted(node, s, ctx):
                continue  # numbers that may still only fill muted slots (routing.py)
            self.sym.block(s, f"{node.name}: {ctx.op_name} uses positions along the axis as numbers")

    def block_module_tensors(self, module: nn.Module, reason: str) -> None:
        """Block every axis of every parameter and buffer of ``module``."""
        table = getattr(self.tensors, "table", self.tensors)
        for t in module.state_dict(keep_vars=True).values():
            for name in table.by_id.get(id(t), []):
                table.unreached.setdefault(name, reason)  # in case no symbol exists yet
                for s in table.syms.get(name, []):
                    self.sym.block(s, reason)

    def _check_layout(self, node, layout):
        meta = self.meta.get(node)
        if not _has_tensor(meta):
            return None

        def check(m, l):
            if is_tensor_meta(m):
                if l is None or len(l) != len(m.shape) or any(
                        self.sym.size[s] != n for s, n in zip(l, m.shape)):
                    raise ValueError(f"layout {l} does not fit shape {m.shape}")
                return l
            if isinstance(m, (list, tuple)):
                if l is None or len(l) != len(m):
                    raise ValueError("layout does not fit the output's structure")
                return [check(a, b) for a, b in zip(m, l)]
            if isinstance(m, dict):
                if isinstance(l, (list, tuple)) and len(l) == len(m):
                    l = dict(zip(m, l))  # a container traced as its values, in order
                if not isinstance(l, dict) or set(l) != set(m):
                    raise ValueError("layout does not fit the output's structure")
                return {k: check(v, l[k]) for k, v in m.items()}
            if m is OPAQUE_VALUE:
                raise ValueError("the result is an object holding tensors that inference "
                                 "cannot look into")
            return None
        return check(meta, layout)

    def find_rule(self, node: fx.Node, ctx: Context) -> tuple[Callable | None, str]:
        if node.op == "call_module":
            what = f"module {type(ctx.module).__name__} ({node.target})"
            if self.user_opaque(node.target, ctx.module):
                return None, what + " marked opaque"
            exact = module_rule(ctx.module, exact_only=True)
            if exact is not None:
                return exact, what
            # A subclass may change forward: look inside it first (see opaque),
            # and only then fall back to the rule of the class it extends.
            return None, what
        if node.op == "call_method":
            fn = METHOD_RULES.get(node.target)
            if fn is None and node.target in SHAPE_QUERIES:
                fn = _no_constraint
            return fn, f"method .{node.target}()"
        target = ctx.target
        fn = METHOD_RULES.get(target) if isinstance(target, str) else FUNCTION_RULES.get(target)
        if fn is None and hasattr(target, "overloadpacket"):
            fn = FUNCTION_RULES.get(target.overloadpacket)  # an ATen op, any overload
            if fn is None and target.overloadpacket.__name__ in SHAPE_QUERIES:
                fn = _no_constraint
        if fn is None and target is getattr and len(node.args) > 1 and node.args[1] in SHAPE_QUERIES:
            fn = _no_constraint
        if fn is None and isinstance(target, type) and dataclasses.is_dataclass(target):
            fn = _dataclass_construction
        if hasattr(node.target, "overloadpacket"):
            return fn, f"ATen op {node.target}"
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
        return fn, f"function {getattr(target, '__module__', '') or ''}.{name}"

    # ------------------------------------------------------- opaque calls
    def opaque(self, node: fx.Node, ctx: Context, what: str):
        # every input that carries tensors, in containers too
        tensors = [a for a in node.all_input_nodes if layout_symbols(self.layouts.get(a))]
        out_meta = self.meta.get(node)
        if not tensors:
            # No tensor comes in: a factory (arange, randn, ...) or plain Python.
            if map_meta(out_meta, lambda m: 1) is None:
                return None
            return ctx.fresh(blocked=f"{what} creates a tensor")
        if not _has_tensor(out_meta) and node.op != "call_module":
            reason = f"{what} reads tensor values"
        else:
            if node in self.passthrough:
                return list(self.layouts[node.all_input_nodes[self.passthrough[node]]])
            # the fallback order: the body as it is, then with the example shapes
            # fixed (shape-dependent control flow; for modules only when they own
            # no tensors, which the body would otherwise use unseen by a rule),
            # then the rule of a base class, else block
            inner = self.inline(node, ctx)
            if inner is None and (node.op == "call_function" or node.op == "call_module"
                                  and not _owns_tensors(ctx.module)):
                inner = self.inline(node, ctx, shapes_fixed=True)
            if inner is not None:
                return inner
            inherited = module_rule(ctx.module) if node.op == "call_module" and not \
                self.user_opaque(node.target, ctx.module) else None
            if inherited is not None:
                return self._check_layout(node, inherited(ctx))
            reason = f"no rule for {what}"
        self.log.append((node.name, reason))
        for a in tensors:
            ctx.block_layout(self.layouts.get(a), reason)
        if node.op == "call_module":  # its own tensors are used where no rule sees them
            self.block_module_tensors(ctx.module, reason)
        return ctx.fresh(blocked=reason)

    def inline(self, node: fx.Node, ctx: Context, shapes_fixed: bool = False):
        """Infer through the body of an opaque call (see :mod:`.inline`),
        traced with its non-tensor arguments fixed, and with ``shapes_fixed``
        its shapes too. None when the body cannot be traced that way."""
        is_module = node.op == "call_module"
        if self.depth >= MAX_INLINE_DEPTH or node not in self.captured or not (
                is_module or node.op == "call_function" and inspect.isfunction(node.target)):
            return None
        if is_module and self.user_opaque(node.target, ctx.module):
            return None
        args, kwargs = self.captured[node]
        try:
            with eval_mode(*([ctx.module] if is_module else [])):
                body = trace_body(node, ctx.module if is_module else node.target, is_module,
                                  args, kwargs, shapes_fixed)
            if body is None:
                return None
            in_layouts = paired_layouts(self.layouts.get, node, self.captured[node])
        except Exception:  # noqa: BLE001 - not traceable this way: the caller goes on
            return None
        gm, rec = body
        view = self.tensors.view(gm, f"{self.prefix}{node.target}." if is_module else "",
                                 "m." if is_module else "")
        sub = GraphInference(gm, self.sym, view, rec.meta, rec.captured, "", self.depth + 1,
                             self.log, self.distributions, rec.passthrough)
        # a failure inside propagates: visit() then fixes what the call touches
        return self._check_layout(node, sub.run(in_layouts, block_io=False))

    # ------------------------------------------------------------------ cuts
    def cut(self, layout: list[int], axis: int, lengths: list[int]) -> list[list[int]]:
        """Cut a tensor along ``axis``. Where the axis is the outer factor of a
        product whose other factors are the tensor's other axes (a fused qkv
        reshaped to (3, heads, head_dim) and unbound), each piece gets its own
        copy of those factors, so q, k and v can carry different head-dim
        permutations; :meth:`finish` undoes this if the shared factors were
        constrained elsewhere."""
        x = layout[axis]
        pieces = self._distribute(layout, axis, lengths)
        if pieces is not None:
            return pieces
        kids = self.sym.refine_concat(x, lengths)
        return [layout[:axis] + [k] + layout[axis + 1:] for k in kids]

    def _distribute(self, layout, axis, lengths):
        sym = self.sym
        x = layout[axis]
        if any(n != 1 for n in lengths) or sym.trivial(x):
            return None
        key = (sym.find(x), tuple(sym.find(s) for s in layout))
        if key in self.cut_cache:
            return self.cut_cache[key]
        parent = self.tensors.product_parent(sym, x)
        if parent is None:
            return None
        p, factors = parent
        others = factors[1:]
        positions = []
        for f in others:
            hits = [i for i, s in enumerate(layout) if i != axis and sym.find(s) == sym.find(f)]
            if len(hits) != 1:
                return None
            positions.append(hits[0])
        if not all(self._pristine(s) for s in [x, *others]):
            return None
        copies = [[sym.new(sym.size[f]) for f in others] for _ in lengths]
        piece_syms = []
        for cp in copies:
            if len(cp) == 1:
                piece_syms.append(cp[0])
                continue
            piece = sym.new(math.prod(sym.size[f] for f in others))
            sym.set_refinement(piece, "product", cp)
            piece_syms.append(piece)
        sym.set_refinement(p, "concat", piece_syms)
        self.distributions.append((x, others, copies))
        out = []
        for cp in copies:
            lay = list(layout)
            for pos, c in zip(positions, cp):
                lay[pos] = c
            lay[axis] = sym.new(1)
            out.append(lay)
        self.cut_cache[key] = out
        return out

    def _pristine(self, s: int) -> bool:
        return self.sym.pristine(s)


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or \
        any(True for _ in module.buffers(recurse=False))


def _has_tensor(meta) -> bool:
    if is_tensor_meta(meta) or meta is OPAQUE_VALUE:
        return True
    if isinstance(meta, (list, tuple)):
        return any(_has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(m) for m in meta.values())
    return False


# torch.return_types (topk, sort, max, ...): named tuples of (values, indices)
_RETURN_FIELDS = {"values": 0, "indices": 1}


def tuple_element(node: fx.Node) -> int | None:
    """Which element of a tuple ``node`` takes out: ``t[i]``, or ``t.values`` /
    ``t.indices`` of a torch.return_types result; None otherwise."""
    if node.op != "call_function" or len(node.args) < 2:
        return None
    if node.target is operator.getitem and isinstance(node.args[1], int):
        return node.args[1]
    if node.target is getattr and node.args[1] in _RETURN_FIELDS:
        return _RETURN_FIELDS[node.args[1]]
    return None


def _dataclass_construction(ctx: Context):
    """``Output(hidden=h, ...)`` (a dataclass, a Hugging Face ModelOutput): a
    container whose fields carry their values' layouts."""
    names = [f.name for f in dataclasses.fields(ctx.target)]
    values = dict(zip(names, ctx.args))
    values.update(ctx.kwargs)
    return {k: ctx.layout(values[k]) if k in values else None for k in names}


def _no_constraint(ctx: Context):
    return ctx.fresh(blocked="shape query") if _has_tensor(ctx.meta()) else None


class TensorTable:
    """Symbols of the model's parameters and buffers, by state_dict name.

    Tied tensors (one Parameter under two names) share symbols. A tensor that
    is not in the state_dict (a non-persistent buffer, a constant) or is not
    floating point can never be permuted through a state_dict: its axes are
    blocked, except (outside the state_dict) an axis along which it is constant.
    """

    def __init__(self, model: nn.Module, sym: Symbols, opaque=()):
        self.sym = sym
        self.opaque = tuple(opaque)
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.by_id: dict[int, list[str]] = {}
        for name, t in self.state.items():
            self.by_id.setdefault(id(t), []).append(name)
        self.syms: dict[str, list[int]] = {}
        self.parents: dict[int, tuple[int, list[int]]] = {}
        # tensors blocked whole by a failed call before any op used them
        self.unreached: dict[str, str] = {}
        self.calls = 0  # inlined function bodies so far (see view)
        self._members: dict[int, int] | None = None

    def view(self, gm, prefix: str, strip: str = "") -> "TensorTableView":
        """The table seen from inside the body ``gm`` of a call to module
        ``prefix`` (with a trailing dot), or of a function when ``prefix`` is
        empty: a function's constants get names of their own (``<call3>.``),
        numbered per inference, so two inlined functions never share them."""
        return self.make_view(gm, prefix, strip)

    def make_view(self, gm, prefix: str, strip: str, outer: str = "") -> "TensorTableView":
        if not prefix:
            self.calls += 1
            prefix = f"<call{self.calls}>."
        return TensorTableView(self, gm, outer + prefix, strip)

    def symbols(self, name: str, gm: fx.GraphModule, target: str) -> list[int]:
        if name in self.syms:
            return self.syms[name]
        try:
            t = get_attr(gm, target)
        except AttributeError:
            t = None
        names = self.by_id.get(id(t), []) if t is not None else []
        canon = names[0] if names else name
        if canon in self.syms:
            self.syms[name] = self.syms[canon]
            return self.syms[canon]
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else ()
        reason = None
        if not names:
            reason = f"{name} is not in the state_dict"
        elif not t.is_floating_point():
            reason = f"{canon} is not floating point"
        # a tensor outside the state_dict that is the same along an axis (a zero
        # k_bias buffer) leaves that axis free: permuting it changes nothing
        syms = [self.sym.new(n, None if reason is None or not names and _constant_along(t, axis)
                             else reason)
                for axis, n in enumerate(shape)]
        for n in set(names) | {name}:
            self.syms[n] = syms
        return syms

    def product_parent(self, sym: Symbols, x: int):
        """(symbol, factors) of a product refinement whose first factor is ``x``."""
        rx = sym.find(x)
        for r, ref in sym.refinement.items():
            if ref.kind == "product" and sym.find(ref.children[0]) == rx and sym.find(r) == r:
                return r, ref.children
        return None


def _constant_along(t, axis: int) -> bool:
    """Whether every slice of ``t`` along ``axis`` is the same, so that
    permuting the axis leaves ``t`` as it is. False on ``meta`` (unknown)."""
    if not isinstance(t, torch.Tensor) or t.is_meta or t.shape[axis] <= 1:
        return False
    with torch.no_grad():
        return bool((t == t.narrow(axis, 0, 1)).all())


class TensorTableView:
    """The table seen from inside an inlined call: the body's targets are
    relative to the called module (``strip`` is the prefix the body's root
    gives them, ``m.``), and ``prefix`` is that module's qualified name, so a
    tensor is named by its state_dict name at any depth of inlining."""

    def __init__(self, table: TensorTable, gm, prefix: str, strip: str):
        self.table, self.gm, self.prefix, self.strip = table, gm, prefix, strip

    def symbols(self, name: str, gm, target: str) -> list[int]:
        return self.table.symbols(self.prefix + self._relative(target), gm, target)

    def _relative(self, target: str) -> str:
        return target[len(self.strip):] if self.strip and target.startswith(self.strip) else target

    def view(self, gm, prefix: str, strip: str = "") -> "TensorTableView":
        rel = self._relative(prefix) if prefix else ""
        return self.table.make_view(gm, rel, strip, self.prefix)

    def __getattr__(self, item):
        return getattr(self.table, item)


# containers and shape queries move no values: every kind passes
_dataclass_construction.kinds = ALL
_no_constraint.kinds = ALL
