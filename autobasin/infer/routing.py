"""Routing among more classes than experts, with the extra slots muted.

A router may choose among more classes than there are experts. LongCat-Flash's
zero-computation experts and ZAYA's skip expert are classes numbered after the
real experts: the chosen class is compared with the number of real experts,
the slots that chose an extra class are sent to some real expert anyway (which
one does not matter) and their routing weight is set to exactly zero, so what
that expert computes for them is multiplied by zero before it is summed.

Permuting the real experts together with their router rows, and the extra
classes among themselves, leaves such a model's function as it is. Seeing that
needs four facts beyond the positions :meth:`Context.set_positions` tracks:

- a **mask**: positions compared with a number ``c`` cut their axis at ``c``
  (a concat: the classes below ``c`` and those from ``c`` on only permute among
  themselves); under every permutation that keeps the cut, the mask stays;
- **taint**: numbers computed from positions (LongCat's ``(idx - E) * E // Z``)
  change under permutations; they may only fill slots that end up muted;
- **garbage**: positions of the first segment where a mask is false and anything
  where it is true (``where(mask, junk, idx)``, ``idx.masked_fill(mask, 0)``);
  whatever is computed row by row from such a tensor is garbage in those rows;
- **zeros**: exactly zero in the slots where a mask is true
  (``weights.masked_fill(mask, 0)``).

Garbage multiplied by zeros in the same slots is clean (``0 * x == 0`` for every
finite ``x``). Garbage or taint that reaches anything else (a sum over the
slots, an op whose rows are not known to stay apart, the graph output) fixes
the axis whose positions made it, as any other use of positions as numbers does.

A tensor's *slots* are its leading axes whose product is the number of entries
of the positions the mask was computed from, in the same row-major order
(reshapes that keep that prefix keep the slots).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch.fx as fx

from ..trace import op_name_of
from .context import is_tensor_meta

# comparisons of positions with a number: (op, which side of the cut is true)
_COMPARE = {"ge", "gt", "lt", "le", "eq", "ne", "greater_equal", "greater", "less", "less_equal",
            "not_equal"}
_NOT = {"bitwise_not", "logical_not", "invert", "__invert__"}
# arithmetic whose result is tainted when an operand is (numbers, not positions)
_ARITHMETIC = {"add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "floordiv",
               "truediv", "remainder", "mod", "fmod", "neg", "negative", "multiply", "subtract",
               "divide"}
# ops that reshape or copy their first argument (row-major order kept)
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
             "clone", "contiguous", "to", "_to_copy", "alias", "detach", "view_as", "reshape_as",
             "type_as", "float", "half", "bfloat16", "double", "long", "int"}
# ops computing each entry from the entries at the same index of their operands
_ENTRYWISE = {"add", "sub", "rsub", "mul", "div", "true_divide", "multiply", "subtract", "divide",
              "neg", "relu", "gelu", "silu", "sigmoid", "tanh", "exp", "erf", "softplus", "pow",
              "square", "sqrt", "rsqrt", "abs", "mish", "hardswish", "leaky_relu", "elu",
              "truediv", "clamp", "clamp_min", "clamp_max", "dropout"}
_SPLITS = {"chunk", "split", "split_with_sizes", "unbind", "tensor_split"}
_REDUCE = {"sum", "mean", "amax", "amin"}


@dataclass(frozen=True)
class Mask:
    source: fx.Node  # the positions compared
    true: tuple[tuple[int, int], ...]  # the ranges of positions where the mask is true
    n: int  # the axis size

    def negated(self) -> "Mask":
        cuts = sorted({0, self.n, *(c for r in self.true for c in r)})
        ranges = [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
        false = tuple(r for r in ranges if not any(lo <= r[0] and r[1] <= hi for lo, hi in self.true))
        return Mask(self.source, _merge(false), self.n)

    @property
    def key(self) -> tuple:
        return (self.source, self.true)


@dataclass(frozen=True)
class Slots:
    key: tuple  # the mask's key
    k: int  # leading axes that are the slots
    sym: int = -1  # the axis to fix if garbage escapes (-1: zeros)


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] >= a:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _prefix(shape, n: int) -> int | None:
    """How many leading axes of ``shape`` multiply to ``n`` (None: none do)."""
    acc = 1
    for i, d in enumerate(shape):
        if acc == n:
            return i
        acc *= d
    return len(shape) if acc == n else None


class Routing:
    """The masks, taint, garbage and zeros of one graph walk (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self.masks: dict[fx.Node, Mask] = {}
        self.taint: dict[fx.Node, int] = {}
        self.garbage: dict[fx.Node, Slots] = {}
        self.zeros: dict[fx.Node, Slots] = {}

    # -------------------------------------------------------------- helpers
    def _shape(self, node):
        m = self.engine.meta.get(node) if isinstance(node, fx.Node) else None
        return tuple(m.shape) if is_tensor_meta(m) else None

    def _slots_of(self, mask_key) -> int:
        return math.prod(self._shape(mask_key[0]) or (0,))

    def _plain_positions(self, arg) -> int | None:
        if not isinstance(arg, fx.Node) or arg in self.garbage:
            return None
        s = self.engine.positions.get(arg)
        return s if isinstance(s, int) else None

    def tainted(self, node: fx.Node, s: int, ctx) -> bool:
        """Called where ``node`` uses positions along ``s`` as numbers: arithmetic
        taints its result instead of fixing ``s`` at once."""
        if ctx.op_name in _ARITHMETIC and is_tensor_meta(self.engine.meta.get(node)):
            self.taint[node] = s
            return True
        return False

    def _block(self, s: int, reason: str) -> None:
        self.engine.sym.block(s, reason)

    # ------------------------------------------------------------------ walk
    def follow(self, node: fx.Node, ctx) -> None:
        """After ``node``'s rule: record what its value is (a mask, taint,
        garbage, zeros) and fix the axes whose garbage or taint it misuses."""
        name = ctx.op_name
        args = [a for a in node.args]
        first = args[0] if args else None
        handled: set[fx.Node] = set()  # inputs this node is allowed to take as they are

        # a mask: positions compared with a number
        if name in _COMPARE and len(args) == 2 and not node.kwargs:
            s = self._plain_positions(first)
            c = args[1]
            if s is not None and isinstance(c, int) and not isinstance(c, bool):
                mask = self._compare(s, node, first, name, c)
                if mask is not None:
                    self.masks[node] = mask
                    ctx.consume(first)
                    return
        if name in _NOT and isinstance(first, fx.Node) and first in self.masks:
            self.masks[node] = self.masks[first].negated()
            return

        # positions kept where a mask is false, anything where it is true
        picked = self._masked_positions(node, ctx, name, args)
        if picked is not None:
            handled |= picked
        # exactly zero where a mask is true
        elif name in ("masked_fill", "masked_fill_") and len(args) == 3 and args[1] in self.masks \
                and isinstance(args[2], (int, float)) and args[2] == 0 \
                and self._shape(first) == self._shape(args[1]):
            self.zeros[node] = Slots(self.masks[args[1]].key, len(self._shape(first)))

        # taint: spreads through arithmetic and copies, fixes its axis anywhere else
        for a in node.all_input_nodes:
            s = self.taint.get(a)
            if s is None or a in handled:
                continue
            if (name in _ARITHMETIC or name in _RESHAPES) and is_tensor_meta(self.engine.meta.get(node)):
                self.taint[node] = s
            else:
                self._block(s, f"{node.name}: numbers computed from positions along the "
                               f"axis reach {name}")

        # garbage rows: follow them, clear them, or fix their axis
        garbage = [a for a in node.all_input_nodes if a in self.garbage and a not in handled]
        if garbage:
            out = self._propagate(node, ctx, name, args, garbage)
            if out is False:
                for a in garbage:
                    self._block(self.garbage[a].sym, f"{node.name}: {name} mixes slots whose "
                                                     f"positions were masked out")
            elif out is not None:
                self.garbage[node] = out
        zeros = [a for a in node.all_input_nodes if a in self.zeros]
        if zeros and name in _RESHAPES and first is zeros[0]:
            z = self._reslot(self.zeros[first], node)
            if z is not None:
                self.zeros[node] = z

    def finish(self, out_nodes) -> None:
        """The graph hands these values out: taint and garbage in them fix their axes."""
        for a in out_nodes:
            if a in self.taint:
                self._block(self.taint[a], f"{a.name}: numbers computed from positions are returned")
            if a in self.garbage:
                self._block(self.garbage[a].sym, f"{a.name}: rows of masked-out positions are returned")

    # --------------------------------------------------------------- pieces
    def _compare(self, s: int, node: fx.Node, source: fx.Node, name: str, c: int) -> Mask | None:
        n = self.engine.sym.size[s]
        name = {"greater_equal": "ge", "greater": "gt", "less": "lt", "less_equal": "le",
                "not_equal": "ne"}.get(name, name)
        if name in ("ge", "lt"):
            ranges = ((max(c, 0), n),)
        elif name in ("gt", "le"):
            ranges = ((max(c + 1, 0), n),)
        else:  # eq, ne
            ranges = ((c, c + 1),) if 0 <= c < n else ()
        ranges = tuple((min(a, n), b) for a, b in ranges if min(a, n) < b)
        mask = Mask(source, _merge(ranges), n)
        if name in ("lt", "le", "ne"):
            mask = mask.negated()
        cuts = sorted({0, n, *(x for r in mask.true for x in r)})
        if len(cuts) > 2:
            sym = self.engine.sym
            sym.refine_concat(s, [b - a for a, b in zip(cuts, cuts[1:])])
            sym.refined(s).why = sym.refined(s).why or \
                f"{node.name}: {name} compares positions along the axis with the number {c}"
        return mask

    def _masked_positions(self, node, ctx, name, args) -> set | None:
        """``where(mask, junk, idx)``, ``where(~mask, idx, junk)`` and
        ``idx.masked_fill(mask, v)``: positions of the segment the mask leaves
        (when it is one segment that starts at 0, so that the positions index
        it as they are), garbage where the mask is true."""
        if name == "where" and len(args) == 3:
            cond, a, b = args
            if cond not in self.masks:
                return None
            mask = self.masks[cond]
            if self._plain_positions(b) is not None and b is mask.source:
                idx, junk, garbage_where = b, a, mask
            elif self._plain_positions(a) is not None and a is mask.source:
                idx, junk, garbage_where = a, b, mask.negated()
            else:
                return None
        elif name in ("masked_fill", "masked_fill_") and len(args) == 3:
            idx, cond, junk = args
            if cond not in self.masks or self._plain_positions(idx) is None \
                    or idx is not self.masks[cond].source:
                return None
            garbage_where = self.masks[cond]
        else:
            return None
        kept = garbage_where.negated().true
        if len(kept) != 1 or kept[0][0] != 0 or self._shape(node) != self._shape(idx):
            return None
        s = self.engine.positions[idx]
        n = self.engine.sym.size[s]
        hi = kept[0][1]
        part = self.engine.sym.refine_concat(s, [hi, n - hi])[0] if hi < n else s
        self.engine.positions[node] = part
        self.garbage[node] = Slots(garbage_where.key, len(self._shape(node)), s)
        ctx.consume(idx)
        return {idx, junk} if isinstance(junk, fx.Node) else {idx}

    def _reslot(self, slots: Slots, node) -> Slots | None:
        shape = self._shape(node)
        k = None if shape is None else _prefix(shape, self._slots_of(slots.key))
        return None if k is None else Slots(slots.key, k, slots.sym)

    def _propagate(self, node, ctx, name, args, garbage) -> Slots | None | bool:
        """The garbage ``node`` computes from its garbage inputs (None: its
        result is clean), or False where it would mix garbage rows with others."""
        g = self.garbage[garbage[0]]
        if any(self.garbage[a].key != g.key for a in garbage):
            return False
        out_shape = self._shape(node)
        first = args[0] if args else None
        if node.target is operator.getitem and isinstance(args[1], int) and first in self.garbage:
            return g if out_shape is not None and len(out_shape) >= g.k else False
        if name in _SPLITS and first in garbage and len(garbage) == 1:
            dim = args[2] if len(args) > 2 and isinstance(args[2], int) else node.kwargs.get("dim", 0)
            dim = dim % len(self._shape(first))
            return g if dim >= g.k else False
        if out_shape is None:
            return False
        if name in _RESHAPES and first in garbage and len(garbage) == 1:
            return self._reslot(g, node) or False
        if name in _ENTRYWISE:
            n = self._slots_of(g.key)
            for a in garbage:
                if self._shape(a)[:self.garbage[a].k] != out_shape[:g.k] or \
                        math.prod(out_shape[:g.k]) != n or self.garbage[a].k != g.k:
                    return False
            if name in ("mul", "multiply") and len(garbage) == 1:
                other = [a for a in node.all_input_nodes if a is not garbage[0]]
                if len(other) == 1 and other[0] in self.zeros:
                    z = self.zeros[other[0]]
                    if z.key == g.key and z.k == g.k and self._shape(other[0])[:z.k] == out_shape[:g.k]:
                        return None  # garbage times exactly zero: clean
            return g
        if name == "bmm" and g.k == 1 and len(out_shape) == 3:
            return g
        if name == "linear" and first in garbage and len(garbage) == 1 and g.k < len(out_shape):
            return g
        if name in ("index", "getitem") and len(args) == 2 and first not in garbage \
                and len(garbage) == 1:
            idx = args[1]
            if isinstance(idx, (list, tuple)):  # x[idx] / x[idx, :, ...]: rows picked
                if not idx or any(i is not None and i != slice(None) for i in idx[1:]):
                    return False
                idx = idx[0]
            return g if idx is garbage[0] else False  # rows picked by garbage positions
        if name in _REDUCE and first in garbage and len(garbage) == 1:
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            if dims is None:
                return False
            dims = [dims] if isinstance(dims, int) else list(dims)
            nd = len(self._shape(first))
            if all(d % nd >= g.k for d in dims) and len(out_shape) >= g.k:
                return g
        return False
