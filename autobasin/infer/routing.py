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

The same row tracking serves **dispatch by sorting** (JetMoE's experts, the
ScatterMoE / MegaBlocks layout): the router's picks are flattened and sorted,
the rows are gathered in that order (``x[order // k]``), split by the number of
picks of each expert (``counts.tolist()``: the picks' histogram), each piece
multiplied by its expert's weight (``linear(piece_e, W[e])``), the pieces
concatenated and the rows put back (``zeros.index_add(0, order // k, y)``).
Renumbering the experts only reorders the sorted rows (by some permutation of
them), so every tensor in sorted order is *shuffled*: a row tag like garbage,
cleared where ``index_add`` puts the rows back by the same order. The split,
the per-expert products and the concatenation together are one grouped
product whose weight's expert axis is the picks' axis; that is recognised
before the walk (:meth:`Routing.prepare`) only where the sizes are the items
of the histogram of the very positions that were sorted, in expert order, and
each piece meets the weight of its own expert; anything else keeps the rules
that fix the experts.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch.fx as fx

from ..trace import op_name_of
from .context import VALUE_COPIES, is_tensor_meta, layout_symbols
from .registry import PERMUTATION

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


@dataclass
class _Grouped:
    """A grouped product found by :meth:`Routing.prepare`."""
    split: fx.Node
    counts: fx.Node
    cat: fx.Node
    ok: bool | None = None  # decided when the walk reaches the split
    sym: int = -1


_COPIES = VALUE_COPIES | {"long", "int"}  # fx records x.long() as a method of its own
_FLATTENS = {"flatten", "view", "reshape", "_unsafe_view"}


def _through_copies(node, flat: bool = False):
    """``node`` without the casts and copies (and, with ``flat``, reshapes) before it."""
    while isinstance(node, fx.Node) and node.op == "call_function" and \
            (op_name_of(node.target) in _COPIES or (flat and op_name_of(node.target) in _FLATTENS)):
        node = node.args[0]
    return node


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
        # dispatch by sorting: sort node -> the positions' axis; order-derived
        # index tensors -> their sort node; claimed nodes -> their handler
        self.sorts: dict[fx.Node, int] = {}
        self.order: dict[fx.Node, fx.Node] = {}
        self.claims: dict[fx.Node, object] = {}

    # -------------------------------------------------------------- helpers
    def _shape(self, node):
        m = self.engine.meta.get(node) if isinstance(node, fx.Node) else None
        return tuple(m.shape) if is_tensor_meta(m) else None

    def _slots_of(self, mask_key) -> int:
        src = mask_key[0]
        if src in self.sorts:  # rows in the order of a sort: as many as it sorted
            src = src.args[0]
        return math.prod(self._shape(src) or (0,))

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
        args = list(node.args)
        first = args[0] if args else None
        handled: set[fx.Node] = set()  # inputs this node is allowed to take as they are

        if self._sorted_dispatch(node, ctx, name, args, first):
            return
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

    # ------------------------------------------------------ sorted dispatch
    def _sorted_dispatch(self, node, ctx, name, args, first) -> bool:
        """Sorting positions, and what follows the sort's order (see the module
        docstring). True when ``node`` is fully accounted for."""
        group = self.claims.get(node)
        if group is not None and (group.ok or node not in (group.split, group.cat)):
            return True  # part of a grouped product (prepare); its handler ran
        if name in ("sort", "argsort") and isinstance(first, fx.Node):
            s = self._plain_positions(first)
            shape = self._shape(first)
            if s is None or shape is None or len(shape) != 1:
                return False
            self.sorts[node] = s
            if name == "argsort":
                self.order[node] = node
            ctx.consume(first)
            return True
        if node.target is operator.getitem and first in self.sorts and isinstance(args[1], int):
            if args[1] == 1:
                self.order[node] = first
            else:  # the sorted values: numbers that change under a renumbering
                self.taint[node] = self.sorts[first]
            return True
        orders = [a for a in node.all_input_nodes if a in self.order]
        if not orders:
            return False
        sort = self.order[orders[0]]
        tensors = [a for a in node.all_input_nodes if is_tensor_meta(self.engine.meta.get(a))]
        clean = all(a not in self.taint and a not in self.garbage for a in tensors if a not in orders)
        if (name in _ARITHMETIC or name in _RESHAPES) and tensors == [first] and first in self.order \
                and self._shape(node) == self._shape(first):
            self.order[node] = sort  # order // k: the token of each sorted pick
            return True
        if name in ("index", "getitem") and len(args) == 2 and first not in self.order and clean:
            idx = args[1]
            if isinstance(idx, (list, tuple)) and len(idx) == 1:
                idx = idx[0]
            if idx in self.order and self.order[idx] is sort and first not in self.garbage:
                # rows gathered in sorted order: shuffled by a renumbering
                self.garbage[node] = Slots((sort, "sorted"), len(self._shape(idx)), self.sorts[sort])
                return True
        if name in ("index_add", "index_add_") and len(args) == 4 and args[1] == 0 \
                and args[2] in self.order and self.order[args[2]] is sort \
                and args[3] in self.garbage and self.garbage[args[3]].key == (sort, "sorted") \
                and self.garbage[args[3]].k == 1 and args[0] not in self.garbage \
                and args[0] not in self.taint:
            return True  # the rows put back where the order says: clean
        for a in orders:
            self._block(self.sorts[self.order[a]], f"{node.name}: {name} uses the order of "
                                                   f"positions sorted along the axis")
        return False

    def prepare(self, graph: fx.Graph) -> None:
        """Find the grouped products of dispatch by sorting (see the module
        docstring): ``cat([linear(split(rows, sizes)[e], W.select(0, e)) for e])``
        with ``sizes`` the items, in order, of ``counts.unbind(0)`` and ``counts``
        a histogram of positions. Their nodes are claimed: :meth:`claim` gives
        the rule that the walk uses for them."""
        for node in graph.nodes:
            if node.op != "call_function" or op_name_of(node.target) not in ("split_with_sizes", "split"):
                continue
            args = node.args
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            if dim != 0 or len(args) < 2 or not isinstance(args[1], (list, tuple)) or len(args[1]) < 2:
                continue
            found = self._counts_of(args[1])
            if found is None:
                continue
            counts, unbind, items = found
            pieces = {u.args[1]: u for u in node.users
                      if u.target is operator.getitem and isinstance(u.args[1], int)}
            if len(pieces) != len(node.users) or sorted(pieces) != list(range(len(args[1]))):
                continue
            weight, links = None, []
            for e in range(len(args[1])):
                piece = pieces[e]
                lin = next(iter(piece.users)) if len(piece.users) == 1 else None
                if lin is None or op_name_of(lin.target) != "linear" or len(lin.args) != 2 \
                        or lin.kwargs or lin.args[0] is not piece or len(lin.users) != 1:
                    break
                sel = lin.args[1]
                if not isinstance(sel, fx.Node) or op_name_of(sel.target) != "select" \
                        or tuple(sel.args[1:]) != (0, e) or len(sel.users) != 1 \
                        or (weight is not None and sel.args[0] is not weight):
                    break
                weight = sel.args[0]
                links.append((sel, lin))
            else:
                cat = next(iter(links[0][1].users))
                cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
                if op_name_of(cat.target) not in ("cat", "concat") or cat_dim != 0 \
                        or list(cat.args[0]) != [lin for _, lin in links]:
                    continue
                group = _Grouped(split=node, counts=counts, cat=cat)
                for n in (unbind, *items, node, *(sel for sel, _ in links), cat):
                    self.claims[n] = group

    def _counts_of(self, sizes):
        """``(counts, unbind, items)`` when ``sizes`` are ``counts.unbind(0)[e].item()``
        for e = 0, 1, ... (``counts.tolist()`` as torch.export records it), the
        items used for nothing but these sizes (and checks on them), else None."""
        items, unbind = [], None
        for e, n in enumerate(sizes):
            if not isinstance(n, fx.Node) or op_name_of(n.target) not in ("item", "_local_scalar_dense"):
                return None
            g = n.args[0]
            if not isinstance(g, fx.Node) or g.target is not operator.getitem or g.args[1] != e \
                    or len(g.users) != 1:
                return None
            u = g.args[0]
            if unbind is None:
                unbind = u
            if u is not unbind or op_name_of(u.target) != "unbind" or \
                    (u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)) != 0:
                return None
            for user in n.users:
                if op_name_of(getattr(user, "target", None)) not in ("split_with_sizes", "split") \
                        and not self._scalar_only(user):
                    return None
            items.append(n)
        if unbind is None or len(unbind.users) != len(sizes):
            return None
        counts = unbind.args[0]
        shape = self._shape(counts)
        if shape is not None and shape != (len(sizes),):
            return None
        return counts, unbind, items

    def claim(self, node: fx.Node, rule):
        """The rule the walk uses for a claimed ``node`` (``rule``: the one it
        would use otherwise, kept for a group found not to be a grouped product)."""
        group = self.claims[node]

        def grouped(ctx):
            if node is group.split:
                group.ok = self._check_grouped(group, ctx)
                if group.ok:
                    rows = list(ctx.layout(ctx.args[0]))
                    return [[ctx.new(self._shape(p)[0], "rows of one expert", structural=True),
                             *rows[1:]] for p in sorted(node.users, key=lambda u: u.args[1])]
                # not a grouped product: the counts were read one by one after all
                for sym in layout_symbols(self.engine.layouts.get(group.counts)):
                    self._block(sym, f"{node.name}: split by sizes read one by one")
            elif node is group.cat and group.ok:
                outs = [ctx.layout(a) for a in ctx.args[0]]
                for o in outs[1:]:
                    ctx.union(o[1], outs[0][1])
                key = self.garbage[group.split.args[0]].key
                self.garbage[node] = Slots(key, 1, group.sym)
                return [ctx.new(self._shape(node)[0], "rows in sorted order", structural=True),
                        outs[0][1]]
            elif op_name_of(node.target) == "select" and group.ok:
                lay = list(ctx.layout(ctx.args[0]))
                ctx.union(lay[0], group.sym)
                ctx.restrict(lay[0], PERMUTATION, "experts of a grouped product")
                return lay[1:]
            elif op_name_of(node.target) == "unbind":
                return [[] for _ in range(self._shape(node.args[0])[0])]
            elif op_name_of(node.target) in ("item", "_local_scalar_dense"):
                return None
            if group.ok is None:  # visited before its split: not the order a walk takes
                group.ok = False
            if rule is None:
                raise ValueError("no rule")
            return rule(ctx)

        grouped.kinds = getattr(rule, "kinds", PERMUTATION)
        return grouped

    def _scalar_only(self, node) -> bool:
        """Whether ``node`` and all it feeds are plain numbers (checks on a size)."""
        if node.op == "output" or is_tensor_meta(self.engine.meta.get(node)):
            return False
        return all(self._scalar_only(u) for u in node.users)

    def _histogram(self, counts):
        """``(axis, positions)`` when ``counts`` is the number of entries of the
        positions equal to each position: ``zeros(T, n).scatter(1, idx, 1)``
        summed over its rows (one pick per class and row, as topk's); else
        ``(None, None)``."""
        c = _through_copies(counts)
        name = op_name_of(getattr(c, "target", None))
        if name == "sum" and len(c.args) >= 2 and list(c.args[1]) in ([0], [-2]) \
                and not (len(c.args) > 2 and c.args[2]) and not c.kwargs.get("keepdim"):
            sc = _through_copies(c.args[0])
            if op_name_of(getattr(sc, "target", None)) == "scatter" and len(sc.args) == 4 \
                    and sc.args[1] in (1, -1) and sc.args[3] == 1 \
                    and op_name_of(getattr(sc.args[0], "target", None)) in ("zeros", "new_zeros") \
                    and len(self._shape(sc) or ()) == 2:
                idx = sc.args[2]
                s = self._plain_positions(idx)
                if s is not None and self.engine.sym.size[s] == self._shape(sc)[1] \
                        and self._distinct_rows(idx):
                    return s, idx
        # (bincount, the other natural histogram, has a size torch.export cannot know,
        # and a graph of one input's sizes is refused: it never reaches this point)
        return None, None

    def _distinct_rows(self, idx) -> bool:
        """Whether each row of ``idx`` holds distinct positions: topk's and argmax's do."""
        src = _through_copies(idx)
        if src.target is operator.getitem:
            src = src.args[0]
        return op_name_of(getattr(src, "target", None)) in ("topk", "argmax", "argmin") or \
            (len(self._shape(idx) or ()) == 2 and self._shape(idx)[1] == 1)

    def _check_grouped(self, group, ctx) -> bool:
        """The split's rows are in the order of sorting the counted positions
        (ascending), so piece e holds exactly the picks of class e."""
        s, idx = self._histogram(group.counts)
        rows = group.split.args[0]
        tag = self.garbage.get(rows)
        if s is None or tag is None or tag.k != 1 or tag.key[1] != "sorted":
            return False
        sort = tag.key[0]
        descending = sort.args[2] if len(sort.args) > 2 else sort.kwargs.get("descending", False)
        if descending or _through_copies(sort.args[0], flat=True) is not idx:
            return False
        group.sym = s
        return True

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
