"""What a rule sees and may do: the complete rule API.

A rule (see :mod:`autobasin.infer.registry`) is called with a :class:`Context`
for one graph node. It reads the layouts (axis symbols) of the node's
arguments, relates them (``union``), fixes what the op mixes (``block``),
structures axes (``refine_product`` / ``refine_concat`` / ``cut``), and
returns the output's layout. Rule files import this module and the registry
only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..trace import TensorMeta, get_attr, op_name_of
from .registry import ALIASES
from .symbols import Symbols

if TYPE_CHECKING:
    from .engine import GraphInference


def is_tensor_meta(m) -> bool:
    return isinstance(m, TensorMeta)


def map_meta(meta, fn):
    """``fn`` of every tensor description in ``meta``, in the same containers
    (lists for tuples and lists, dicts for dicts and dataclasses)."""
    if is_tensor_meta(meta):
        return fn(meta)
    if isinstance(meta, (list, tuple)):
        return [map_meta(m, fn) for m in meta]
    if isinstance(meta, dict):
        return {k: map_meta(m, fn) for k, m in meta.items()}
    return None


# ops whose result holds their first argument's values, in place along every
# axis (casts and copies): what is true of the input's values is true of it
VALUE_COPIES = frozenset({"to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as",
                          "_to_dim_order_copy", "lift_fresh_copy"})


# Reading a tensor's shape or type says nothing about the order of its entries.
SHAPE_QUERIES = frozenset({
    "size", "dim", "numel", "shape", "dtype", "device", "is_contiguous", "ndim", "ndimension",
    "get_device", "is_floating_point", "element_size", "nelement", "is_cuda", "layout",
    "requires_grad", "data_ptr", "stride", "storage_offset",
    # the ATen ops torch.export records for a size it cannot know in advance
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})


def layout_symbols(layout) -> list[int]:
    """Every symbol in a (possibly nested) layout."""
    if layout is None:
        return []
    if isinstance(layout, int):
        return [layout]
    if isinstance(layout, dict):
        return [s for x in layout.values() for s in layout_symbols(x)]
    return [s for x in layout for s in layout_symbols(x)]


class Context:
    """What a rule sees: the node, its arguments' layouts and example values."""

    def __init__(self, engine: "GraphInference", node: fx.Node):
        self.engine = engine
        self.node = node
        self.sym: Symbols = engine.sym
        self.args = node.args
        self.kwargs = node.kwargs
        self.module = engine.gm.get_submodule(node.target) if node.op == "call_module" else None
        self.consumed: set[fx.Node] = set()
        # an ATen op registered as an alias of a torch function is seen as that function
        self.target = ALIASES.get(getattr(node.target, "overloadpacket", None), node.target)

    @property
    def op_name(self) -> str:
        """The op's plain name: ``"transpose"`` for ``Tensor.transpose``,
        ``torch.transpose`` and ``aten.transpose.int`` alike."""
        return op_name_of(self.target)

    # -------------------------------------------------------------- reading
    def layout(self, arg):
        if isinstance(arg, fx.Node):
            return self.engine.layouts.get(arg)
        return None

    def meta(self, arg=None):
        if arg is None:
            arg = self.node
        if isinstance(arg, fx.Node):
            return self.engine.meta.get(arg)
        if isinstance(arg, (list, tuple)):
            return [self.meta(a) for a in arg]
        return arg

    def shape(self, arg=None) -> tuple[int, ...]:
        m = self.meta(arg)
        if not is_tensor_meta(m):
            raise TypeError(f"{arg} is not a tensor")
        return m.shape

    def value(self, arg):
        """A non-tensor argument's concrete value (ints computed in the graph too)."""
        if isinstance(arg, fx.Node):
            m = self.engine.meta.get(arg)
            return None if is_tensor_meta(m) else m
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, slice):
            return slice(self.value(arg.start), self.value(arg.stop), self.value(arg.step))
        return arg

    def constant(self, arg):
        """The tensor ``arg`` holds if it is a literal of the code (``x[..., [-2]]``:
        a constant torch.export lifts into the graph, or fx's ``_tensor_constant``),
        through copies; None for anything else (inputs, parameters, buffers,
        computed values)."""
        for _ in range(4):
            if not isinstance(arg, fx.Node):
                return None
            if arg.op == "get_attr":
                leaf = arg.target.rpartition(".")[2]
                if "lifted_tensor" not in leaf and not leaf.startswith("_tensor_constant"):
                    return None
                try:
                    obj = get_attr(self.engine.gm, arg.target)
                except AttributeError:
                    return None
                return obj if isinstance(obj, torch.Tensor) and \
                    not isinstance(obj, torch.nn.Parameter) else None
            if arg.op != "call_function" or op_name_of(arg.target) not in VALUE_COPIES:
                return None
            arg = arg.args[0]
        return None

    def arg(self, index: int, name: str, default=None):
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)

    def is_tensor(self, arg) -> bool:
        return isinstance(arg, fx.Node) and is_tensor_meta(self.engine.meta.get(arg))

    def tensor_args(self) -> list[fx.Node]:
        out = []
        for a in list(self.args) + list(self.kwargs.values()):
            for n in (a if isinstance(a, (list, tuple)) else [a]):
                if self.is_tensor(n):
                    out.append(n)
        return out

    def param(self, name: str) -> list[int]:
        """Symbols of parameter/buffer ``name`` of this call_module's module."""
        return self.engine.tensor_symbols(f"{self.node.target}.{name}" if self.node.target else name)

    def has_param(self, name: str) -> bool:
        return self.module is not None and getattr(self.module, name, None) is not None

    # -------------------------------------------------------------- symbols
    @property
    def size(self) -> list[int]:
        """``ctx.size[s]``: the length of the axis symbol ``s``."""
        return self.sym.size

    def refine_product(self, s: int, sizes: list[int]) -> list[int]:
        """Symbols of ``s`` viewed as a row-major grid of ``sizes`` (channels as
        heads x head-dim); see :meth:`Symbols.refine_product`."""
        return self.sym.refine_product(s, sizes)

    def refine_concat(self, s: int, lengths: list[int]) -> list[int]:
        """Symbols of ``s`` viewed as consecutive segments of ``lengths``."""
        return self.sym.refine_concat(s, lengths)

    def refined(self, s: int):
        """How ``s`` is structured (a product or a concat of children), or None."""
        return self.sym.refined(s)

    def distribute(self, layout: list[int], axis: int, lengths: list[int]):
        """Pieces of a fused axis cut into size-1 pieces that may each carry their
        own copy of the other factors (q, k, v of a fused qkv), or None; see
        :meth:`GraphInference.cut`."""
        return self.engine._distribute(layout, axis, lengths)

    def log(self, reason: str) -> None:
        """Record that this op was not seen through, and why (``spec.blocked``)."""
        self.engine.log.append((self.node.name, reason))

    # -------------------------------------------------------------- writing
    def new(self, size: int, blocked: str | None = None, structural: bool = False) -> int:
        """A new symbol of ``size``, blocked for ``blocked`` if given (see
        :meth:`block` for ``structural``)."""
        return self.sym.new(size, f"{self.node.name}: {blocked}" if blocked else None, structural)

    def fresh(self, meta=None, blocked: str | None = None):
        meta = self.meta() if meta is None else meta
        return map_meta(meta, lambda m: [self.new(n, blocked) for n in m.shape])

    def union(self, a: int, b: int, dual: bool = False) -> None:
        """``a`` and ``b`` carry one symmetry. ``dual=True`` where the op contracts
        them (``sum_k a_k b_k``: a linear layer's input against its weight's
        input axis, q against k): a general map M on ``a`` needs ``M^-T`` on ``b``."""
        self.sym.union(a, b, dual)

    def restrict(self, s: int, kinds, why: str = "") -> None:
        """Only ``kinds`` of symmetry (with permutations) may act on ``s``."""
        self.sym.restrict(s, kinds, f"{self.node.name}: {why or self.op_name}")

    def restrict_layout(self, layout, kinds, why: str = "") -> None:
        for s in layout_symbols(layout):
            self.restrict(s, kinds, why)

    def block(self, s: int, reason: str, structural: bool = False) -> None:
        """Fix axis ``s``. ``structural``: the axis has no permutation symmetry
        in any model (spatial, kernel, vocabulary, gate axes), so it is not a
        hidden axis that coverage counts; otherwise ``reason`` is reported for
        every parameter axis this leaves unpermuted."""
        self.sym.block(s, f"{self.node.name}: {reason}", structural)

    def block_layout(self, layout, reason: str) -> None:
        for s in layout_symbols(layout):
            self.block(s, reason)

    def cut(self, layout: list[int], axis: int, lengths: list[int]) -> list[list[int]]:
        """Layouts of the pieces of a tensor cut along ``axis`` into ``lengths``."""
        return self.engine.cut(layout, axis, lengths)

    # ------------------------------------------------------------ positions
    def set_positions(self, s: int, index: int | None = None) -> None:
        """This op's result (element ``index`` of a tuple result) holds
        positions along axis ``s`` (the indices of topk, argmax, sort): when
        ``s`` is permuted they are renumbered, so whatever is indexed with them
        must be permuted along with ``s``. Uses that read them as numbers fix
        ``s`` (the engine does that)."""
        if index is None:
            self.engine.positions[self.node] = s
        else:
            self.engine.positions.setdefault(self.node, {})[index] = s

    def positions(self, arg) -> int | None:
        """The axis whose positions tensor ``arg`` holds, if it does."""
        s = self.engine.positions.get(arg) if isinstance(arg, fx.Node) else None
        return s if isinstance(s, int) else None

    def consume(self, arg) -> None:
        """This op indexes with the positions ``arg`` holds (having related
        the indexed axis to them): that use keeps the axis free."""
        self.consumed.add(arg)
