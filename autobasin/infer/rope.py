"""Rotary position embeddings (RoPE): the maps of a head dim that commute with them.

RoPE rotates the head dim of queries and keys pair by pair, by an angle that
depends on the token's position and the pair's frequency:
``y = x * cos + rot(x) * sin``, where ``rot`` maps each pair ``(x_i, x_j)`` to
``(-x_j, x_i)`` (``rotate_half``: ``j = i + d/2``; GPT-J's interleaved form:
``j = i + 1``) and ``cos`` / ``sin`` are equal on the two positions of a pair.
Such ops fix the head dim for permutations (each position has its own
frequency), but any map acting on each pair alone as a rotation times a scale
(a complex number) commutes with them: ``y(Mx) = M y(x)``. With ``q -> M q``
and ``k -> M^-T k`` the logits ``q . k`` stay; ``M^-T`` is again such a map.

This module finds the pattern before the walk (:func:`find_patterns`:
``add``/``sub`` of ``mul(x, c)`` and ``mul(r, s)``, where ``r`` is computed from
``x`` alone by ops that only move, negate or copy values, and ``c``, ``s`` read no
state_dict tensor), checks it on the example run (:func:`check`: ``r`` is ``x``
under a fixed pairing with opposite signs on the two positions of each pair,
``c`` and ``s`` are equal on both positions of each pair), and, when the walk
reaches it, relates every other axis as the ops would and gives the head dim
the pairing (``Symbols.set_pairs``), which admits only ``spec.PAIR_KINDS``.
Only asked for with ``symmetries`` holding "orthogonal" or "invertible";
otherwise (or when a check fails) the ops' own rules fix the head dim as before.

The complex form (Llama 4: the pairs ``(2i, 2i + 1)`` viewed as complex
numbers by ``view_as_complex``, multiplied by a constant, viewed back with
``view_as_real``) is the same map: complex multiplication commutes with any
complex number per pair. :func:`check_complex` checks it on the example run.

Not recognised (the head dim stays fixed, with the ops' reason): RoPE inside a
function the walk inlines, or with a table read from the state_dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..trace import get_attr, op_name_of
from .context import SHAPE_QUERIES, VALUE_COPIES

# ops that move, negate or copy their one tensor argument's values: a chain of
# them from x picks each entry of r from one entry of x, the same ones whatever
# the values, so r == J x on the example run (checked on every entry) makes it J
# (no broadcasting copies: on an example whose rows happen to be equal, a chain
# that copies one row to all could pass for J)
_MOVES = {"slice", "neg", "cat", "concat", "stack", "flatten", "view", "reshape", "_unsafe_view",
          "unsqueeze", "squeeze", "clone", "contiguous", "getitem", "chunk", "split",
          "split_with_sizes", "unflatten", "alias", "unbind", "select", "to", "_to_copy"}


@dataclass
class Pattern:
    final: fx.Node        # x * c + r * s
    x: fx.Node
    r: fx.Node
    c: fx.Node
    s: fx.Node
    mul_x: fx.Node
    mul_r: fx.Node
    chain: set            # the nodes computing r from x
    axis: int | None = None          # the head dim, after the example run
    partner: tuple[int, ...] | None = None
    # "real": x * c + r * s; "complex": x's pairs (2i, 2i + 1) viewed as complex
    # numbers (r, the view) times a constant c, viewed back (final); then mul_r is
    # None, and ``stored`` holds the product's layout until final is reached
    form: str = "real"
    stored: list | None = None


def _mul_operands(n) -> tuple[fx.Node, fx.Node] | None:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") or \
            op_name_of(n.target) != "mul" or len(n.users) != 1 or n.kwargs:
        return None
    a = n.args[:2]
    if len(n.args) != 2 or not all(isinstance(v, fx.Node) for v in a):
        return None
    return a[0], a[1]


def _chain(r: fx.Node, x: fx.Node, limit: int = 16) -> set | None:
    """The nodes computing ``r`` from ``x`` by :data:`_MOVES` ops alone (no other
    tensor comes in), or None."""
    seen, todo = set(), [r]
    while todo:
        n = todo.pop()
        if n is x or n in seen:
            continue
        if n.op not in ("call_function", "call_method") or op_name_of(n.target) not in _MOVES:
            return None
        seen.add(n)
        if len(seen) > limit:
            return None
        ins = [a for a in n.all_input_nodes if not _is_size(a)]
        if not ins:
            return None
        todo.extend(ins)
    return seen if x not in seen and r is not x else None


_SIZE_ARITHMETIC = {"floordiv", "add", "sub", "mul", "getitem", "truediv", "neg", "mod"}


def _is_size(n: fx.Node, depth: int = 0) -> bool:
    """Whether ``n`` is a size (or dtype, ...) read off a tensor, or arithmetic on
    sizes (fx's ``x.shape[-1] // 2``): not a tensor whose values anything reads."""
    if depth > 8 or n.op not in ("call_function", "call_method"):
        return False
    name = op_name_of(n.target)
    if name in SHAPE_QUERIES or (name == "getattr" and len(n.args) > 1
                                 and n.args[1] in SHAPE_QUERIES):
        return True
    return name in _SIZE_ARITHMETIC and bool(n.all_input_nodes) and \
        all(_is_size(a, depth + 1) for a in n.all_input_nodes)


class Rope:
    """The RoPE patterns of one graph (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self.patterns: list[Pattern] = []
        self.claims: dict[fx.Node, Pattern] = {}

    # ---------------------------------------------------------------- the walk
    def confirm(self, patterns: list[Pattern], results: dict) -> None:
        """Keep the ``patterns`` :func:`check` confirmed on the example run
        (``results``: by final node), and claim their nodes."""
        for pat in patterns:
            got = results.get(pat.final)
            if not got:
                continue
            pat.axis, pat.partner = got
            self.patterns.append(pat)
            for n in (*pat.chain, pat.mul_x, pat.mul_r if pat.form == "real" else pat.final):
                self.claims[n] = pat

    def claim(self, node: fx.Node, rule):
        """The rule for ``node`` of a confirmed pattern (see the module docstring)."""
        from .registry import ALL
        pat, e = self.claims[node], self.engine

        def inside(ctx):  # r's chain: values moved within the pattern only
            return ctx.fresh()

        def term(ctx):
            """``mul(x, c)`` or ``mul(r, s)``: the op's own rule with the head dim
            masked (r read as x, whose axes it has), then the head dim put back.
            The complex form's product keeps the masked layout until ``final``."""
            x_lay = e.layouts[pat.x]
            head = x_lay[pat.axis]
            nd = len(x_lay)

            def masked(lay, size=None):
                if not isinstance(lay, list) or not lay:
                    return lay
                i = pat.axis - (nd - len(lay))
                if i < 0:
                    return lay
                out = list(lay)
                out[i] = e.sym.new(size or e.sym.size[lay[i]])
                return out
            other = pat.c if node is pat.mul_x else pat.s
            saved = {n: e.layouts.get(n) for n in (pat.x, pat.r, other)}
            try:
                if node is pat.mul_r or pat.form == "complex":
                    e.layouts[pat.r] = masked(x_lay, e.sym.size[saved[pat.r][pat.axis]])
                else:
                    e.layouts[pat.x] = masked(x_lay)
                e.layouts[other] = masked(saved[other])
                out = rule(ctx)
                e._admit(node, ctx, rule, out, ctx.op_name)
            finally:
                e.layouts.update(saved)
            if not isinstance(out, list) or len(out) != nd:
                raise ValueError("a RoPE term whose result is not shaped like its input")
            if pat.form == "complex":
                pat.stored = list(out)
                return out
            return put_back(out, head)

        def put_back(out, head):
            out = list(out)
            out[pat.axis] = head
            e.sym.set_pairs(head, pat.partner, f"{pat.final.name}: rotary position embedding")
            return out

        def final(ctx):  # the complex form's product viewed back as x's pairs
            if pat.stored is None or len(pat.stored) != len(ctx.shape()):
                raise ValueError("a complex RoPE viewed back to another shape")
            return put_back(pat.stored, e.layouts[pat.x][pat.axis])
        fn = inside if node in pat.chain else final if node is pat.final and \
            pat.form == "complex" else term
        fn.kinds = ALL
        return fn


def find_patterns(graph: fx.Graph, state_ids: set[int], root) -> list[Pattern]:
    """Every candidate pattern of ``graph`` (structure only; :func:`check`
    decides on values). ``state_ids``: ids of the state_dict's tensors, which
    ``c`` and ``s`` must not read; ``root``: the module holding get_attr targets."""
    reads: dict[fx.Node, bool] = {}
    for n in graph.nodes:  # in order: a node's inputs come before it
        if n.op in ("get_attr", "call_module"):  # fx calls a module, whose tensors it reads
            try:
                obj = get_attr(root, n.target)
            except AttributeError:
                reads[n] = True
                continue
            own = obj.state_dict(keep_vars=True).values() if isinstance(obj, nn.Module) \
                else [obj]
            reads[n] = any(id(t) in state_ids for t in own) or \
                any(reads.get(a, True) for a in n.all_input_nodes)
        else:  # a size read off a tensor (fx's x.shape[-1]) reads none of its values
            reads[n] = not _is_size(n) and any(reads.get(a, True) for a in n.all_input_nodes)

    found = []
    for f in graph.nodes:
        if f.op not in ("call_function", "call_method") or op_name_of(f.target) not in ("add", "sub") \
                or len(f.args) != 2 or f.kwargs:
            continue
        if any(_mul_operands(a) is None for a in f.args):
            continue
        pat = None
        for mx, mr in ((f.args[0], f.args[1]), (f.args[1], f.args[0])):
            for x, c in _orders(_mul_operands(mx)):
                for r, s in _orders(_mul_operands(mr)):
                    if pat is not None:
                        break
                    chain = _chain(r, x)
                    if chain is None or any(u not in chain and u is not mr
                                            for n in chain for u in n.users):
                        continue
                    if reads[c] or reads[s] or x in _ancestors(c) or x in _ancestors(s):
                        continue
                    pat = Pattern(f, x, r, c, s, mx, mr, chain)
        if pat is not None:
            found.append(pat)
    return found + _complex_patterns(graph, reads)


_CASTS = VALUE_COPIES | {"float"}
_VIEWS = {"reshape", "view", "_unsafe_view", "flatten", "unflatten"}


def _only_user(n: fx.Node):
    return next(iter(n.users)) if len(n.users) == 1 else None


def _moved(n: fx.Node) -> fx.Node | None:
    """The one tensor a view or cast ``n`` moves (its other inputs sizes), or None."""
    first = n.args[0] if n.args else None
    if not isinstance(first, fx.Node) or any(a is not first and not _is_size(a)
                                             for a in n.all_input_nodes):
        return None
    return first


def _complex_patterns(graph: fx.Graph, reads: dict) -> list[Pattern]:
    """RoPE through complex numbers (Llama 4): ``x`` (cast) viewed as pairs,
    ``view_as_complex``, times a constant ``c``, ``view_as_real``, viewed back
    (and cast): ``final``. Structure only; :func:`check_complex` decides."""
    found = []
    for a in graph.nodes:
        if a.op not in ("call_function", "call_method") or \
                op_name_of(a.target) != "view_as_complex" or len(a.all_input_nodes) != 1:
            continue
        chain, p = {a}, a.all_input_nodes[0]
        if p.op in ("call_function", "call_method") and op_name_of(p.target) in _VIEWS and \
                len(p.users) == 1:
            chain.add(p)
            q = _moved(p)
        else:
            continue
        if q is not None and q.op in ("call_function", "call_method") and \
                op_name_of(q.target) in _CASTS and len(q.users) == 1 and _moved(q) is not None:
            chain.add(q)
            q = _moved(q)
        mul = _only_user(a)
        ops = _mul_operands(mul) if mul is not None else None
        if q is None or ops is None:
            continue
        c = ops[1] if ops[0] is a else ops[0] if ops[1] is a else None
        if c is None or reads.get(c, True) or c is a:
            continue
        v = _only_user(mul)
        if v is None or op_name_of(v.target) != "view_as_real":
            continue
        chain.add(v)
        last = v
        while True:  # viewed back (and cast): the last of them is final
            u = _only_user(last)
            if u is None or u.op not in ("call_function", "call_method") or \
                    op_name_of(u.target) not in _VIEWS | _CASTS or _moved(u) is not last:
                break
            chain.add(u)
            last = u
        if last is v:
            continue
        chain.discard(last)
        found.append(Pattern(last, q, a, c, c, mul, None, chain, form="complex"))
    return found


def _orders(pair):
    return ((pair[0], pair[1]), (pair[1], pair[0]))


def _ancestors(n: fx.Node) -> set:
    out, todo = set(), [n]
    while todo:
        m = todo.pop()
        for a in m.all_input_nodes:
            if a not in out:
                out.add(a)
                todo.append(a)
    return out


def check(x: torch.Tensor, r: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
          out: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
    """``(axis, partner)`` when ``r`` is ``x`` with each position ``i`` of
    ``axis`` replaced by ``+-x[partner[i]]`` (opposite signs within a pair) and
    ``c``, ``s`` (broadcast to ``x``) are equal on both positions of each pair;
    None otherwise, or when ``x``'s positions are not told apart by their values."""
    tensors = (x, r, c, s, out)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or r.shape != x.shape or \
            out.shape != x.shape or not x.is_floating_point() or x.is_meta:
        return None
    try:
        if torch.broadcast_shapes(c.shape, x.shape) != x.shape or \
                torch.broadcast_shapes(s.shape, x.shape) != x.shape:
            return None
    except RuntimeError:
        return None
    for axis in reversed(range(x.dim())):
        d = x.shape[axis]
        if d < 2 or d % 2:
            continue
        xa = x.detach().movedim(axis, -1).reshape(-1, d)
        ra = r.detach().movedim(axis, -1).reshape(-1, d)
        xs, rs = xa[:64], ra[:64]  # the pairing from a few rows, checked on all below
        plus = (rs[:, :, None] == xs[:, None, :]).all(0)    # (i, j): r_i == x_j
        minus = (rs[:, :, None] == -xs[:, None, :]).all(0)  # r_i == -x_j
        match = plus | minus
        if not bool((match.sum(1) == 1).all()) or bool((plus & minus).any()):
            continue
        partner = match.float().argmax(1)
        idx = torch.arange(d)
        sign = torch.where(plus[idx, partner], 1.0, -1.0).to(xa.dtype)
        if not torch.equal(partner[partner], idx) or bool((partner == idx).any()) or \
                not torch.equal(sign[partner], -sign) or not torch.equal(ra, xa[:, partner] * sign):
            continue
        for t in (c, s):
            ta = t.detach().expand(x.shape).movedim(axis, -1).reshape(-1, d)
            if not torch.equal(ta, ta[:, partner]):
                return None
        return axis, tuple(int(i) for i in partner)
    return None


def check_complex(x: torch.Tensor, c: torch.Tensor, out: torch.Tensor
                  ) -> tuple[int, tuple[int, ...]] | None:
    """``(last axis, partner)`` when ``out`` is ``x`` with each pair of its last
    axis ``(2i, 2i + 1)`` read as a complex number and multiplied by ``c``
    (broadcast), in ``out``'s dtype; None otherwise."""
    if not all(isinstance(t, torch.Tensor) for t in (x, c, out)) or out.shape != x.shape or \
            not x.is_floating_point() or x.is_meta or x.shape[-1] % 2 or x.shape[-1] < 2:
        return None
    d = x.shape[-1]
    z = torch.view_as_complex(x.detach().to(torch.float64).reshape(*x.shape[:-1], d // 2, 2))
    want = torch.view_as_real(z * c.detach().to(torch.complex128)).reshape(x.shape)
    got = out.detach().to(torch.float64)
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1e-30)):
        return None
    return x.dim() - 1, tuple(i ^ 1 for i in range(d))
