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

Beyond permutations (see ``spec.KINDS``), every class also records the kinds
of symmetry its ops admit (``restrict``: the intersection of what each op on
its axes allows; nothing recorded means every kind) and, for each symbol, its
*orientation* in the class: a contraction ``sum_k a_k b_k`` relates ``a``'s
axis to the *dual* of ``b``'s (``union(a, b, dual=True)``), since a general
map M on one side needs ``M^-T`` on the other. A weighted union-find (parity
to the parent) keeps orientations; a class that meets itself with both
orientations (a Gram matrix, a tied embedding that is also the output head)
is self-dual, and admits only maps equal to their inverse-transpose:
orthogonal ones. A RoPE head dim (``set_pairs``, see ``rope.py``) records each
position's partner in its frequency pair and admits no permutation, only
rotations (times scales) of each pair; a class with pairs that is cut into
pieces, or met with other pairs, is fixed.

The union-find itself is networkx's; this module adds sizes, blocking,
refinement, admitted kinds and orientation, which networkx does not have.
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
    why: str = ""  # what cut the axis, for a fixed axis cut into pieces of length 1


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


ALL_KINDS = frozenset({"permutation", "sign", "scale", "orthogonal", "invertible", "rotation",
                       "rotary"})
# the kinds whose every element equals its inverse-transpose
SELF_DUAL_KINDS = frozenset({"permutation", "sign", "orthogonal", "rotation"})
# an op that admits every orthogonal (invertible) map admits the pair rotations
# (times scales) of RoPE's head dims too: they are among them (see spec.PAIR_KINDS)
_SUBKINDS = {"orthogonal": {"rotation"}, "invertible": {"rotary", "rotation"},
             "rotary": {"rotation"}}


def with_subkinds(kinds) -> frozenset:
    return frozenset(kinds).union(*(_SUBKINDS.get(k, ()) for k in kinds))


class Symbols:
    """Sized, blockable, refinable union-find over integer symbols."""

    def __init__(self):
        self.uf = UnionFind()
        self.size: list[int] = []
        self.blocked: dict[int, str] = {}
        self.structural: set[int] = set()  # roots of classes with a structural block
        self.refinement: dict[int, Refinement] = {}
        # kinds each class admits (absent: all) and the first reason it lost one
        self.admits: dict[int, frozenset] = {}
        self.narrowed: dict[int, str] = {}
        # RoPE head dims: each position's partner in its frequency pair, by class
        self.pairs: dict[int, tuple[int, ...]] = {}
        # orientation: weighted union-find, parity of each symbol to its parent
        self._pparent: list[int] = []
        self._pbit: list[int] = []

    # ----------------------------------------------------------- orientation
    def parity(self, s: int) -> int:
        """1 when ``s`` is oriented dual to its class's reference, else 0."""
        return self._proot(s)[1]

    def _proot(self, s: int) -> tuple[int, int]:
        bit, path = 0, []
        while self._pparent[s] != s:
            path.append(s)
            bit ^= self._pbit[s]
            s = self._pparent[s]
        acc = bit
        for x in path:  # compress
            b = self._pbit[x]
            self._pparent[x], self._pbit[x] = s, acc
            acc ^= b
        return s, bit

    def _dual_of(self, k: int) -> int:
        """A new symbol dual to ``k`` (same class, opposite orientation)."""
        d = self.new(self.size[k])
        self.union(d, k, dual=True)
        return d

    # ---------------------------------------------------------------- kinds
    def kinds(self, s: int) -> frozenset:
        """The kinds of symmetry every op on ``s``'s class admits."""
        return self.admits.get(self.find(s), ALL_KINDS)

    def restrict(self, s: int, kinds, reason: str = "", permutations: bool = True) -> None:
        """Only ``kinds`` (and permutations, unless ``permutations=False``) may
        act on ``s``'s class; a refined class's parts are restricted alike."""
        if self.trivial(s):
            return
        kinds = with_subkinds(kinds) | ({"permutation"} if permutations else set())
        r = self.find(s)
        cur = self.admits.get(r, ALL_KINDS)
        new = cur & kinds
        if new != cur:
            self.admits[r] = new
            if reason:
                self.narrowed.setdefault(r, reason)
        ref = self.refinement.get(r)
        if ref:
            for c in ref.children:
                self.restrict(c, kinds, reason, permutations)

    def set_pairs(self, s: int, partner: tuple[int, ...], reason: str) -> None:
        """``s``'s class is a RoPE head dim: only maps acting on each pair
        ``(i, partner[i])`` alone as a rotation (times a scale) keep what the
        model computes (see ``spec.PAIR_KINDS``); ``reason`` names the op."""
        r = self.find(s)
        self.restrict(r, {"rotary", "rotation"}, reason, permutations=False)
        old = self.pairs.get(r)
        if r in self.refinement or (old is not None and old != tuple(partner)):
            self.block(r, f"{reason}: RoPE frequency pairs that do not agree")
        self.pairs[r] = tuple(partner)

    # ---------------------------------------------------------------- basics
    def new(self, size: int, blocked: str | None = None, structural: bool = False) -> int:
        s = len(self.size)
        self.size.append(int(size))
        self._pparent.append(s)
        self._pbit.append(0)
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

    def union(self, a: int, b: int, dual: bool = False) -> None:
        """``a`` and ``b`` carry one symmetry; ``dual``: ``b`` is read against ``a``
        in a contraction, so a general map M on ``a`` is ``M^-T`` on ``b``."""
        if self.size[a] != self.size[b]:
            raise SizeMismatch(f"cannot identify axes of sizes {self.size[a]} and {self.size[b]}")
        if self.trivial(a):
            return
        (pa, ba), (pb, bb) = self._proot(a), self._proot(b)
        rel = ba ^ bb ^ int(dual)  # orientation of b's reference against a's
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            if pa == pb and rel:
                self.restrict(ra, SELF_DUAL_KINDS, "an axis contracted with itself (self-dual)")
            return
        self._pparent[pb], self._pbit[pb] = pa, rel
        ka, kb = self.admits.pop(ra, None), self.admits.pop(rb, None)
        na, nb = self.narrowed.pop(ra, None), self.narrowed.pop(rb, None)
        fa, fb = self.refinement.pop(ra, None), self.refinement.pop(rb, None)
        qa, qb = self.pairs.pop(ra, None), self.pairs.pop(rb, None)
        reason = self.blocked.pop(ra, None) or self.blocked.pop(rb, None)
        self.blocked.pop(rb, None)
        structural = ra in self.structural or rb in self.structural
        self.structural.discard(ra)
        self.structural.discard(rb)
        self.uf.union(ra, rb)
        r = self.find(ra)
        if ka is not None or kb is not None:
            self.admits[r] = (ALL_KINDS if ka is None else ka) & (ALL_KINDS if kb is None else kb)
        if na or nb:
            self.narrowed[r] = na or nb
        # refinements are recorded in the orientation of their class's reference
        # (the parity root); ``pa`` stays the reference of the joined class
        if fa is not None:
            self.refinement[r] = fa
        elif fb is not None:
            self.refinement[r] = fb
            if rel:  # fb's parts were oriented against pb's reference
                self.refinement[r] = Refinement(fb.kind, [self._dual_of(c) for c in fb.children])
        if fa is not None and fb is not None:
            sizes = [self.size[c] for c in fb.children]
            kids = (self.refine_product(r, sizes, _frame=True) if fb.kind == "product"
                    else self.refine_concat(r, sizes, _frame=True))
            for k, c in zip(kids, fb.children):
                self.union(k, c, dual=bool(rel))
        if qa is not None or qb is not None:
            self.pairs[r] = qa if qa is not None else qb
            if (qa is not None and qb is not None and qa != qb) or r in self.refinement:
                reason = reason or "RoPE frequency pairs that do not agree, or an axis cut"
        if reason:
            self.block(r, reason, structural)

    # ------------------------------------------------------------ refinement
    def refine_product(self, s: int, sizes: list[int], _frame: bool = False) -> list[int]:
        """Children of ``s`` viewed as a row-major grid of ``sizes``."""
        if math.prod(sizes) != self.size[s]:
            raise SizeMismatch(f"product {sizes} does not match axis size {self.size[s]}")
        return self._refine(s, list(sizes), "product", _frame)

    def refine_concat(self, s: int, lengths: list[int], _frame: bool = False) -> list[int]:
        """Children of ``s`` viewed as consecutive segments of ``lengths``."""
        if sum(lengths) != self.size[s]:
            raise SizeMismatch(f"segments {lengths} do not add up to axis size {self.size[s]}")
        return self._refine(s, list(lengths), "concat", _frame)

    def _refine(self, s: int, sizes: list[int], kind: str, frame: bool = False) -> list[int]:
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
        # the parts are recorded in the reference's orientation; a symbol dual
        # to it sees them dual (``frame``: the caller wants the reference's)
        flip = not frame and self.parity(s)
        kinds = self.admits.get(self.find(s))
        for i, k in zip(keep, kids):
            out[i] = self._dual_of(k) if flip and not self.trivial(k) else k
            if kinds is not None:
                self.restrict(k, kinds)
        return out

    def _refine_nontrivial(self, s: int, sizes: list[int], kind: str) -> list[int]:
        r = self.find(s)
        if r in self.pairs:  # a pair rotation does not act on the pieces alone
            self.block(r, f"a RoPE head dim viewed as a {kind} of {sizes}")
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
               strides: tuple[int, ...] | None = None, dim: int = 0, flip: int = 0):
        """Yield ``(root, offset, shape, strides, dim, dual)`` for each unrefined
        class under ``s``: where on the axis of ``s`` it acts, as a strided grid,
        and whether the axis sees that class dual to its reference orientation."""
        if self.trivial(s):
            return
        flip ^= self.parity(s)
        if shape is None:
            shape, strides = (self.size[s],), (1,)
        r = self.find(s)
        ref = self.refinement.get(r)
        if ref is None:
            yield r, offset, shape, strides, dim, bool(flip)
            return
        sizes = [self.size[c] for c in ref.children]
        if ref.kind == "product":
            t = strides[dim]
            inner = [math.prod(sizes[j + 1:]) * t for j in range(len(sizes))]
            new_shape = shape[:dim] + tuple(sizes) + shape[dim + 1:]
            new_strides = strides[:dim] + tuple(inner) + strides[dim + 1:]
            for j, c in enumerate(ref.children):
                yield from self.leaves(c, offset, new_shape, new_strides, dim + j, flip)
        else:
            start = 0
            for c, n in zip(ref.children, sizes):
                sh = shape[:dim] + (n,) + shape[dim + 1:]
                yield from self.leaves(c, offset + start * strides[dim], sh, strides, dim, flip)
                start += n


def _prefix(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        acc += n
        out.append(acc)
    return out
