"""Axis symbols: union-find over tensor axes, with structure.

Every axis of every value in the graph, and of every parameter, is a *symbol*
of some size. ``union(a, b)`` says two axes carry the same permutation;
``block(a)`` says an axis can only carry the identity. An axis can be
*refined*: as a product (the axis is a row-major grid, e.g. channels =
heads x head_dim, or GroupNorm's groups x channels-per-group) or as a concat
(the axis is a sequence of segments, e.g. the output of ``torch.cat``).
A refined symbol allows only the permutations that respect its structure:
``product(a, b)`` allows ``P_a (x) P_b``; ``concat(a, b)`` allows
``diag(P_a, P_b)``. Refinement belongs to an equivalence class, so every axis
unioned with a refined one is refined the same way, with shared children.

A block is *structural* when the axis has no permutation symmetry to find in
any model: it is tied to the model's inputs or outputs, or its positions mean
something (a convolution's spatial and kernel axes, the vocabulary rows of an
embedding, an RNN's gate blocks, time). Other blocks fix a hidden axis that
could have moved (an op without a rule, RoPE frequencies, a buffer outside the
state_dict); coverage counts only hidden axes, and a fixed one always has its
reason.

The union-find itself is networkx's; this module adds sizes, blocking and
refinement, which networkx does not have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from networkx.utils import UnionFind


class SizeMismatch(ValueError):
    pass


@dataclass
class Refinement:
    kind: str  # "product" | "concat"
    children: list[int]


def _suffix_products(sizes: list[int]) -> set[int]:
    out, acc = {1}, 1
    for s in reversed(sizes):
        acc *= s
        out.add(acc)
    return out


def _common_product(a: list[int], b: list[int]) -> list[int] | None:
    """Finest row-major factorisation refining both ``a`` and ``b``, or None."""
    cuts = sorted(_suffix_products(a) | _suffix_products(b), reverse=True)
    if any(hi % lo for hi, lo in zip(cuts, cuts[1:])):
        return None
    return [hi // lo for hi, lo in zip(cuts, cuts[1:])]


def _runs(sizes: list[int], fine: list[int], combine) -> list[list[int]]:
    """Split ``fine`` into consecutive runs whose combination equals each size."""
    runs, i = [], 0
    for s in sizes:
        run, acc = [], None
        while acc != s:
            run.append(fine[i])
            acc = fine[i] if acc is None else combine(acc, fine[i])
            i += 1
        runs.append(run)
    return runs


class Symbols:
    """Sized, blockable, refinable union-find over integer symbols."""

    def __init__(self):
        self.uf = UnionFind()
        self.size: list[int] = []
        self.blocked: dict[int, str] = {}
        self.structural: set[int] = set()  # roots of classes with a structural block
        self.refinement: dict[int, Refinement] = {}

    # ---------------------------------------------------------------- basics
    def new(self, size: int, blocked: str | None = None, structural: bool = False) -> int:
        s = len(self.size)
        self.size.append(int(size))
        self.uf[s]  # register
        if blocked:
            self.block(s, blocked, structural)
        return s

    def find(self, s: int) -> int:
        return self.uf[s]

    def trivial(self, s: int) -> bool:
        return self.size[s] <= 1

    def refined(self, s: int) -> Refinement | None:
        return self.refinement.get(self.find(s))

    def class_size(self, s: int) -> int:
        """How many symbols share ``s``'s class (1: nothing was joined to it)."""
        return self.uf.weights[self.find(s)]

    def pristine(self, s: int) -> bool:
        """``s``'s class is alone, unblocked and unrefined: nothing constrains it yet."""
        r = self.find(s)
        return r not in self.blocked and r not in self.refinement and self.uf.weights[r] == 1

    def set_refinement(self, s: int, kind: str, parts: list[int]) -> None:
        """Declare ``s``'s class the ``kind`` (``"product"`` / ``"concat"``) of ``parts``
        as they are, for a symbol just made (:meth:`refine_product` and
        :meth:`refine_concat` reconcile with an existing refinement instead)."""
        self.refinement[self.find(s)] = Refinement(kind, list(parts))

    def block(self, s: int, reason: str, structural: bool = False) -> None:
        """Fix the class of ``s`` (see the module docstring for ``structural``)."""
        if self.trivial(s):
            return
        r = self.find(s)
        if structural and r not in self.structural:
            self.structural.add(r)
        elif r in self.blocked:
            return
        self.blocked.setdefault(r, reason)
        ref = self.refinement.get(r)
        if ref:
            for c in ref.children:
                self.block(c, reason, structural)

    def is_structural(self, s: int) -> bool:
        return self.find(s) in self.structural

    def union(self, a: int, b: int) -> None:
        if self.size[a] != self.size[b]:
            raise SizeMismatch(f"cannot identify axes of sizes {self.size[a]} and {self.size[b]}")
        if self.trivial(a):
            return
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        fa, fb = self.refinement.pop(ra, None), self.refinement.pop(rb, None)
        reason = self.blocked.pop(ra, None) or self.blocked.pop(rb, None)
        self.blocked.pop(rb, None)
        structural = ra in self.structural or rb in self.structural
        self.structural.discard(ra)
        self.structural.discard(rb)
        self.uf.union(ra, rb)
        r = self.find(ra)
        if fa is not None:
            self.refinement[r] = fa
        elif fb is not None:
            self.refinement[r] = fb
        if fa is not None and fb is not None:
            sizes = [self.size[c] for c in fb.children]
            kids = (self.refine_product(r, sizes) if fb.kind == "product"
                    else self.refine_concat(r, sizes))
            for k, c in zip(kids, fb.children):
                self.union(k, c)
        if reason:
            self.block(r, reason, structural)

    # ------------------------------------------------------------ refinement
    def refine_product(self, s: int, sizes: list[int]) -> list[int]:
        """Children of ``s`` viewed as a row-major grid of ``sizes``."""
        if math.prod(sizes) != self.size[s]:
            raise SizeMismatch(f"product {sizes} does not match axis size {self.size[s]}")
        return self._refine(s, list(sizes), "product")

    def refine_concat(self, s: int, lengths: list[int]) -> list[int]:
        """Children of ``s`` viewed as consecutive segments of ``lengths``."""
        if sum(lengths) != self.size[s]:
            raise SizeMismatch(f"segments {lengths} do not add up to axis size {self.size[s]}")
        return self._refine(s, list(lengths), "concat")

    def _refine(self, s: int, sizes: list[int], kind: str) -> list[int]:
        # a size-1 factor is no structure; a size-1 segment is a real position
        floor = 1 if kind == "product" else 0
        keep = [i for i, n in enumerate(sizes) if n > floor]
        out = [self.new(n) for n in sizes]
        if len(keep) == 0:
            return out
        if len(keep) == 1:
            out[keep[0]] = s
            return out
        kids = self._refine_nontrivial(s, [sizes[i] for i in keep], kind)
        for i, k in zip(keep, kids):
            out[i] = k
        return out

    def _refine_nontrivial(self, s: int, sizes: list[int], kind: str) -> list[int]:
        r = self.find(s)
        reason = self.blocked.get(r)
        cur = self.refinement.get(r)
        if cur is None:
            kids = [self.new(n, reason) for n in sizes]
            if r in self.structural:  # pieces of an input's or output's axis are too
                self.structural.update(self.find(k) for k in kids if not self.trivial(k))
            self.refinement[r] = Refinement(kind, kids)
            return kids
        cur_sizes = [self.size[c] for c in cur.children]
        if cur.kind == kind and cur_sizes == sizes:
            return list(cur.children)
        if cur.kind != kind:
            both = self._concat_of_products(cur, sizes, kind)
            if both is not None:
                return both
            self.block(r, f"axis needed as both a {cur.kind} and a {kind}")
            return [self.new(n, "conflicting structure") for n in sizes]
        if kind == "product":
            fine = _common_product(cur_sizes, sizes)
            if fine is None:
                self.block(r, f"factorisations {cur_sizes} and {sizes} are incompatible")
                return [self.new(n, "conflicting structure") for n in sizes]
            combine = lambda x, y: x * y  # noqa: E731
        else:
            cuts = sorted({0, *_prefix(cur_sizes), *_prefix(sizes)})
            fine = [b - a for a, b in zip(cuts, cuts[1:])]
            combine = lambda x, y: x + y  # noqa: E731
        leaves: list[int] = []
        for c, run in zip(cur.children, _runs(cur_sizes, fine, combine)):
            leaves += self._refine(c, run, kind)
        out, i = [], 0
        for run in _runs(sizes, fine, combine):
            if len(run) == 1:
                out.append(leaves[i])
            else:
                f = self.new(sum(run) if kind == "concat" else math.prod(run))
                self.refinement[f] = Refinement(kind, leaves[i:i + len(run)])
                out.append(f)
            i += len(run)
        return out

    def _concat_of_products(self, cur: Refinement, sizes: list[int],
                            kind: str) -> list[int] | None:
        """An axis cut into segments and also viewed as a grid (g0, *inner).
        Both views hold when every segment is a whole number of rows of the
        grid: the rows permute only within their segment, and every segment
        takes the same permutation of ``inner``. A fused qkv whose bias is
        sliced into q, k and v while its output is reshaped to (3, heads,
        head_dim): q, k and v stay in place and share head-dim permutations
        (I_3 (x) P is blockdiag(P, P, P)); heads reshaped from channels that are
        split into groups of heads (coat's conv position encoding): heads move
        within their group. With several outer factors (g0 * g1 rows) only
        segments of exactly one row are handled, outer factors fixed.
        Returns the children for the view asked for, or None."""
        if kind == "product":
            grid, lengths = list(sizes), [self.size[c] for c in cur.children]
            segments = list(cur.children)
        else:
            grid, lengths = [self.size[c] for c in cur.children], list(sizes)
            segments = [self.new(n) for n in lengths]
        if len(lengths) < 2:
            return None
        k = next((i for i in range(1, len(grid))
                  if all(n % math.prod(grid[i:]) == 0 for n in lengths)), None)
        if k is None:
            return None
        row = math.prod(grid[k:])
        rows = [n // row for n in lengths]
        if k > 1 and any(m != 1 for m in rows):
            return None
        reason = "segments of the axis stay in place"
        if kind == "product":
            outer = [self.new(g, reason if k > 1 else None) for g in grid[:k]]
            inner = [self.new(g) for g in grid[k:]]
        else:
            outer, inner = list(cur.children[:k]), list(cur.children[k:])
            if k > 1:
                for c in outer:
                    self.block(c, reason)
        outer_rows = self.refine_concat(outer[0], rows) if k == 1 else [None] * len(rows)
        for seg, m, o in zip(segments, rows, outer_rows):
            kids = self.refine_product(seg, [m, *grid[k:]])
            if o is not None:
                self.union(kids[0], o)
            for a, b in zip(kids[1:], inner):
                self.union(a, b)
        return outer + inner if kind == "product" else segments

    # -------------------------------------------------------------- read-out
    def leaves(self, s: int, offset: int = 0, shape: tuple[int, ...] | None = None,
               strides: tuple[int, ...] | None = None, dim: int = 0):
        """Yield ``(root, offset, shape, strides, dim)`` for each unrefined class
        under ``s``: where on the axis of ``s`` it acts, as a strided grid."""
        if self.trivial(s):
            return
        if shape is None:
            shape, strides = (self.size[s],), (1,)
        r = self.find(s)
        ref = self.refinement.get(r)
        if ref is None:
            yield r, offset, shape, strides, dim
            return
        sizes = [self.size[c] for c in ref.children]
        if ref.kind == "product":
            t = strides[dim]
            inner = [math.prod(sizes[j + 1:]) * t for j in range(len(sizes))]
            new_shape = shape[:dim] + tuple(sizes) + shape[dim + 1:]
            new_strides = strides[:dim] + tuple(inner) + strides[dim + 1:]
            for j, c in enumerate(ref.children):
                yield from self.leaves(c, offset, new_shape, new_strides, dim + j)
        else:
            start = 0
            for c, n in zip(ref.children, sizes):
                sh = shape[:dim] + (n,) + shape[dim + 1:]
                yield from self.leaves(c, offset + start * strides[dim], sh, strides, dim)
                start += n


def _prefix(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        acc += n
        out.append(acc)
    return out
