"""Weight matching: align B to A by permutation coordinate descent on the weights.

Git Re-Basin (Ainsworth et al., ICLR 2023), Algorithm 1, generalised from a
chain of layers to any :class:`~autobasin.spec.PermutationSpec`. The objective
is the inner product of A with the permuted B over every tensor the spec
permutes::

    J(P) = sum_T < A_T, P(B_T) >

It is linear in the permutation of one group when the others are held fixed
(up to the rare tensor that one group permutes on two axes, where the other
axis is held at its current value as in the reference implementation). So
each step solves a linear assignment for one group ``g``::

    C_g = sum_{m in members(g)} A_m @ B_m^T            (n, n)
    p_g = argmax_p sum_i C_g[i, p[i]]

where ``A_m = m.gather(A_T)`` (n, rest) and ``B_m`` gathers the same rows of
``B_T`` with every *other* member of ``T`` applied at its current permutation.
A sweep visits all groups in a random order; the descent stops after a sweep
in which no group improved its objective.

Initialisation. Descent from the identity can stall far from the optimum: with
every other group wrong, a group's similarity is mostly noise (on random-init
networks, and wherever heads x head-dim or GroupNorm grids put two groups on
one axis, B = P(A) is then not recovered). ``init="greedy"`` solves
the groups once each, best-determined first. An axis of a tensor is *known*
once every group acting on it is solved (axes no group acts on always are), and
a member is *clean* when every other group that moves its rows ``B_m`` is
solved. Its term ``A_m @ B_m^T`` is then exact, and if ``B = P(A)`` the true
permutation maximises the sum of the clean terms (Cauchy-Schwarz), uniquely when
the rows are distinct. So the greedy repeatedly solves the unsolved group with
the most clean evidence (columns of its clean members) from its clean members
alone. When no unsolved group has a clean member (a cycle, e.g. heads and
head-dim of one axis), it solves the group whose members are closest to clean,
replacing each unknown axis by a permutation-invariant signature: the tensor is
sorted along every axis (or grid dimension) an unsolved group acts on. Sorting
is invariant to any permutation of that axis, so for ``B = P(A)`` the true
permutation still maximises the similarity. Descent then starts from there.
When the start reaches the Cauchy-Schwarz bound ``J <= ||A|| ||B||`` (B = P(A)
exactly), it is a global optimum and the first sweep ends at once; with noise
on a planted problem, descent stops after one sweep that changes nothing.
The default ``init="best"`` also descends from the identity (unless the greedy
start reached the bound) and keeps the higher objective: on independent
ResNets the identity start can end a little higher.

Objective. By default only parameters count (the paper's objective); buffers
that a group permutes (BatchNorm running statistics) are permuted with it but
do not steer it, see ``match_buffers``.

Cost. Only the tensors of ``g``'s members are touched in a step, and only along
the axes other groups act on (one ``index_select`` per such axis), never the
whole state dict. Terms that no other group touches (biases, norm scales, BN
statistics, a first layer's weight) are summed once into a static part of
``C_g``. A group whose inputs did not change since it was last solved is
skipped: its assignment would come out the same.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from tqdm.auto import tqdm

from ..alloc import release_freed
from ..guard import check_finite, check_materialized
from ..permute import check_perm, axis_index
from ..spec import Member, PermutationSpec, Perms, SpecError
from .descent import Descent, coordinate_descent
from .lap import solve_lap
from .result import WeightMatching, fill_stats


# A greedy step with at most this many columns of evidence per row accumulates its
# similarity in float64: with one or two columns (a bias, a norm scale) the margin
# of the right assignment over a swap of two close rows is below float32 rounding.
_FLOAT64_COLS = 64
# Descent is skipped when the starting objective is within this fraction of the
# Cauchy-Schwarz bound ||A|| ||B|| that no permutation can exceed.
_BOUND_TOL = 1e-12
# Most elements a gathered temporary holds (products and objectives are taken a
# slice at a time): 1 MiB in float32, so the workspace's slots cost 8 MiB.
_CHUNK = 1 << 18


@dataclass
class _Term:
    """One member's contribution ``A_m @ B_m^T`` to its group's similarity."""

    member: Member
    a: torch.Tensor                            # A's whole tensor (compute dtype; not copied)
    rows: torch.Tensor | None                  # (prod(member.shape),) axis positions; None: whole axis
    same_axis: list[tuple[str, Member]]        # other members on member.axis of this tensor
    other_axes: list[tuple[int, list[tuple[str, Member]]]]  # (axis, members) elsewhere
    deps: frozenset[str] = field(default_factory=frozenset)  # groups whose perms B_m depends on

    @property
    def a_rows(self) -> torch.Tensor:
        """``A_m`` (n, rest): a view of A for a whole leading axis, else gathered
        when asked for and dropped after use (keeping them would copy A)."""
        m = self.member
        if self.rows is None and m.axis == 0:
            return self.a.reshape(m.size, -1)
        return m.gather(self.a)

    @property
    def cols(self) -> int:
        m = self.member
        return math.prod(m.shape) * (self.a.numel() // self.a.shape[m.axis]) // m.size

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype


def _validate(spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor],
              sd_b: Mapping[str, torch.Tensor]) -> None:
    spec.check_fits(sd_a, "state_dict a")
    spec.check_fits(sd_b, "state_dict b")
    for param in spec.members_by_param():
        ta, tb = sd_a[param], sd_b[param]
        if ta.shape != tb.shape:
            raise SpecError(f"{param!r} has shape {tuple(ta.shape)} in a but "
                            f"{tuple(tb.shape)} in b")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _axis_perm(length: int, members: list[tuple[str, Member]], perms: Perms,
               device: torch.device) -> torch.Tensor:
    """Index (length,) of one axis with ``members`` at their current ``perms``."""
    if len(members) == 1 and members[0][1].is_plain and members[0][1].size == length:
        return perms[members[0][0]]
    idx = axis_index(length, [(m, perms[g].cpu()) for g, m in members])
    return idx.to(device)


def _make_term(gname: str, m: Member, on_tensor: list[tuple[str, Member]], a: torch.Tensor) -> _Term:
    """The term of member ``m`` of group ``gname``; ``on_tensor`` lists all members of its tensor."""
    others = [(h, o) for h, o in on_tensor if not (h == gname and o == m)]
    elsewhere: dict[int, list[tuple[str, Member]]] = {}
    for h, o in others:
        if o.axis != m.axis:
            elsewhere.setdefault(o.axis, []).append((h, o))
    whole_axis = m.is_plain and m.size == a.shape[m.axis]
    mine = torch.zeros(a.shape[m.axis], dtype=torch.bool)
    mine[m.positions().reshape(-1)] = True
    # a member of the same axis on other positions (another segment) leaves B_m alone
    same_axis = [(h, o) for h, o in others
                 if o.axis == m.axis and bool(mine[o.positions().reshape(-1)].any())]
    others = same_axis + [(h, o) for h, o in others if o.axis != m.axis]
    return _Term(member=m, a=a,
                 rows=None if whole_axis else m.positions().reshape(-1).to(a.device),
                 same_axis=same_axis,
                 other_axes=sorted(elsewhere.items()),
                 deps=frozenset(h for h, _ in others))


def _b_rows(term: _Term, b: torch.Tensor, perms: Perms) -> torch.Tensor:
    """``B_m`` (n, rest): the member's rows of ``b`` with all other members applied.

    The row/column layout equals ``term.member.gather`` so it lines up with ``a_rows``.
    Copies ``b`` once where it can: when axes of size > 1 follow the member's
    axis, the member's axis is moved to the front first (a view) so that the
    permuting ``index_select`` already writes the (n, rest) layout.
    """
    m = term.member
    rows = term.rows
    if term.same_axis:
        idx = _axis_perm(b.shape[m.axis], term.same_axis, perms, b.device)
        rows = idx if rows is None else idx[rows]
    if math.prod(b.shape[m.axis + 1:]) > 1 and (term.other_axes or rows is not None):
        t = b.movedim(m.axis, 0)
        if rows is not None:
            t = t.index_select(0, rows)
        for axis, members in term.other_axes:
            t = t.index_select(axis + 1 if axis < m.axis else axis,
                               _axis_perm(b.shape[axis], members, perms, b.device))
    else:  # the moved axis reshapes as a view: permute in place order, then move
        t = b
        for axis, members in term.other_axes:
            t = t.index_select(axis, _axis_perm(t.shape[axis], members, perms, t.device))
        if rows is not None:
            t = t.index_select(m.axis, rows)
        t = t.movedim(m.axis, 0)
    if len(m.shape) == 1:
        return t.reshape(m.size, -1)
    return t.reshape(*m.shape, -1).movedim(m.dim, 0).reshape(m.size, -1)


def _accumulate(c: torch.Tensor | None, a_rows: torch.Tensor, b_rows: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``c + a_rows @ b_rows.T`` (in place where possible); ``c`` may be wider than the rows.
    Without ``c``, the product is written into ``out`` when given."""
    if c is None:
        if out is None:
            return a_rows @ b_rows.T
        if out.dtype == a_rows.dtype:
            return torch.mm(a_rows, b_rows.T, out=out)
        return out.copy_(a_rows @ b_rows.T)
    if c.dtype == a_rows.dtype:
        return c.addmm_(a_rows, b_rows.T)
    return c.add_(a_rows @ b_rows.T)


@dataclass
class _LowRank:
    """The static part of a group's similarity as factors ``a @ b.T``, each (n, k).

    With k columns (a bias, a norm scale, BatchNorm statistics: k <= 4 per
    layer) far below n, the (n, n) product would be the largest thing weight
    matching holds: 128 MiB per 4096-wide MLP group in float64, 3 GiB for
    ViT-L/16 (2.7x the model). The factors cost n * k; the product is formed
    when the group is solved.
    """

    a: torch.Tensor
    b: torch.Tensor


def _static_matrix(static: torch.Tensor | _LowRank | None,
                   dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor | None:
    """An (n, n) matrix holding the static similarity (None: there is none), made
    in ``dtype`` (default: the one it is kept in): fresh, or written into ``out``
    (of that dtype) when given."""
    if static is None:
        return None
    if isinstance(static, _LowRank):
        a, b = (static.a.to(dtype), static.b.to(dtype)) if dtype else (static.a, static.b)
        return a @ b.T if out is None else torch.mm(a, b.T, out=out)
    if out is not None:
        return out.copy_(static)
    return static.to(dtype or static.dtype, copy=True)


class _Workspace:
    """Buffers weight matching reuses instead of allocating per group and sweep.

    One buffer per dtype, the size of the largest group's (n, n) similarity, for
    every similarity that is solved and dropped (not kept in the cache), and a
    few flat slots of ``_CHUNK`` elements for the rows a product is gathered
    from. Made and freed each time, such tensors left glibc's heap holding freed
    blocks of every size (it serves them from the heap once it has freed one
    block that large; see :mod:`autobasin.alloc`) and cost page faults on each
    use: resnet50's extra peak was 146 MB with about 80 MB live.
    """

    SLOTS = 8

    def __init__(self, device: torch.device, largest: dict[torch.dtype, int]):
        self.device, self.largest = device, largest  # per dtype, the largest group's size
        self.matrices: dict[torch.dtype, torch.Tensor] = {}
        self.flats: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.next = 0

    def matrix(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """An (n, n) matrix: the front of one buffer per dtype, grown to the
        largest group's size at once (one at a time is in use: solved, then dropped)."""
        buf = self.matrices.get(dtype)
        if buf is None or buf.numel() < n * n:
            self.matrices.pop(dtype, None)
            size = max(n, self.largest.get(dtype, 0)) ** 2
            buf = self.matrices[dtype] = torch.empty(size, dtype=dtype, device=self.device)
        return buf[:n * n].view(n, n)

    def start(self) -> None:
        """Every slot is free again (the tensors taken from them are done with)."""
        self.next = 0

    def flat(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A free slot of ``numel`` elements; a slot grows when asked for more."""
        key = (self.next % self.SLOTS, dtype)
        self.next += 1
        buf = self.flats.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.flats[key] = torch.empty(max(numel, _CHUNK), dtype=dtype, device=self.device)
        return buf[:numel]

    def take(self, t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
        """``t.index_select(axis, index)``, written into a slot."""
        shape = list(t.shape)
        shape[axis] = index.numel()
        return torch.index_select(t, axis, index, out=self.flat(math.prod(shape), t.dtype).view(shape))

    def front(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """``t.movedim(axis, 0)``, contiguous (in a slot when that needs a copy)."""
        moved = t.movedim(axis, 0)
        if moved.is_contiguous():
            return moved
        return self.flat(t.numel(), t.dtype).view(moved.shape).copy_(moved)

    def clear(self) -> None:
        self.matrices.clear()
        self.flats.clear()


def _sliced(term: _Term) -> bool:
    """Whether ``term``'s product can be taken a slice of its one other axis at a time."""
    return len(term.member.shape) == 1 and not term.same_axis and len(term.other_axes) == 1 \
        and term.a.shape[term.other_axes[0][0]] > 0


def _add_sliced(c: torch.Tensor | None, term: _Term, b: torch.Tensor, now: torch.Tensor,
                cols: torch.Tensor, ws: _Workspace, before: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``c + A_m[:, cols] @ (B_m[:, now[cols]] - B_m[:, before[cols]])^T`` for a
    :func:`_sliced` term, its columns indexed along its other axis (no ``before``:
    that term is 0), a few positions at a time, each gathered into ``ws``'s
    slots: no temporary holds more than ``_CHUNK`` elements, and none is allocated."""
    m = term.member
    axis = term.other_axes[0][0]
    step = max(1, _CHUNK * b.shape[axis] // max(b.numel(), 1))
    for part in cols.split(step):
        ws.start()
        b_rows = ws.take(b, axis, now[part])
        if before is not None:
            b_rows.sub_(ws.take(b, axis, before[part]))
        a_rows = ws.take(term.a, axis, part)  # the same layout as b_rows
        if term.rows is not None:
            b_rows, a_rows = ws.take(b_rows, m.axis, term.rows), ws.take(a_rows, m.axis, term.rows)
        c = _accumulate(c, ws.front(a_rows, m.axis).reshape(m.size, -1),
                        ws.front(b_rows, m.axis).reshape(m.size, -1), out)
    return c


def _add_whole(c: torch.Tensor | None, term: _Term, b: torch.Tensor, perms: Perms,
               ws: _Workspace, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c + A_m @ B_m^T`` at ``perms`` for a :func:`_sliced` term, every position of
    its other axis (see :func:`_add_sliced`)."""
    axis, members = term.other_axes[0]
    return _add_sliced(c, term, b, _axis_perm(b.shape[axis], members, perms, b.device),
                       torch.arange(b.shape[axis], device=b.device), ws, out=out)


def _update(c: torch.Tensor, term: _Term, b: torch.Tensor, perms: Perms, seen: Perms,
            ws: _Workspace) -> None:
    """Bring ``c``, computed at the permutations ``seen``, to ``perms`` for ``term``'s part.

    ``A_m @ B_m^T`` changes by ``A_m @ (B_m' - B_m)^T``, and only the columns of
    ``B_m`` whose values moved count: late in a descent a sweep swaps a few
    units of each group, so the update costs a few columns, not all of them.
    Which columns moved is read off the values, which holds for any layout a
    member has (grids, segments, several axes).
    """
    if all(perms[d] is seen[d] for d in term.deps):
        return
    then = {**perms, **{d: seen[d] for d in term.deps}}
    m = term.member
    if _sliced(term):
        # one other axis moves (a conv's or linear's other side): slice the moved
        # positions of that axis out of B, and the matching columns of A_m
        axis, members = term.other_axes[0]
        now, before = (_axis_perm(b.shape[axis], members, q, b.device) for q in (perms, then))
        moved = (now != before).nonzero().squeeze(1)
        if moved.numel():
            _add_sliced(c, term, b, now, moved, ws, before)
        return
    new = _b_rows(term, b, perms)
    diff = new.sub_(_b_rows(term, b, then))
    moved = diff.ne(0).any(0).nonzero().squeeze(1)
    if moved.numel() == 0:
        return
    a_rows = term.a_rows
    if 2 * moved.numel() <= diff.shape[1]:
        a_rows, diff = a_rows.index_select(1, moved), diff.index_select(1, moved)
    _accumulate(c, a_rows, diff)


def _cached_groups(spec: PermutationSpec, dynamic: dict[str, list[_Term]],
                   sim_dtype: dict[str, torch.dtype],
                   a_t: dict[str, torch.Tensor], b_t: dict[str, torch.Tensor],
                   budget: float) -> set[str]:
    """The groups whose similarity is kept between sweeps and updated, not recomputed.

    A kept (n, n) matrix costs n^2 elements and saves a product over all of its
    dynamic terms' columns, so groups are taken by columns per element until
    they fill ``budget`` times the bytes of the matched tensors of A and B,
    less the matrix the largest group is solved in (the workspace's): the
    budget bounds all similarity memory, kept or in use.
    """
    room = budget * sum(t.numel() * t.element_size() for d in (a_t, b_t) for t in d.values())
    candidates = []
    for g, terms in dynamic.items():
        n = spec.groups[g].size
        if n > 1 and terms:
            size = n * n * sim_dtype[g].itemsize
            candidates.append((sum(t.cols for t in terms) / (n * n), size, g))
    room -= max((size for _, size, _ in candidates), default=0)
    keep = set()
    for _, size, g in sorted(candidates, reverse=True):
        if size <= room:
            keep.add(g)
            room -= size
    return keep


def _norm64(tensors) -> float:
    """The 2-norm of all ``tensors`` together, summed in float64 a slice at a time
    (a whole float64 copy of each would cost twice the model in passing)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(piece, dtype=torch.float64)) ** 2
                         for t in tensors for piece in t.reshape(-1).split(_CHUNK)))


def _dot_permuted(a: torch.Tensor, b: torch.Tensor, members: list[tuple[str, Member]],
                  perms: Perms, dtype: torch.dtype | None = None) -> float:
    """``<a, P(b)>`` with ``members`` at ``perms``, in ``dtype`` (default: theirs),
    a slice of the first permuted axis at a time: no temporary above ``_CHUNK``
    elements (a whole permuted copy of each tensor would cost up to two in passing)."""
    per_axis: dict[int, list[tuple[str, Member]]] = {}
    for g, m in members:
        per_axis.setdefault(m.axis, []).append((g, m))
    index = {axis: _axis_perm(b.shape[axis], ms, perms, b.device) for axis, ms in per_axis.items()}
    first = min(index, default=0)
    if b.dim() == 0 or b.numel() == 0:
        return float(torch.dot(a.reshape(-1).to(dtype or a.dtype), b.reshape(-1).to(dtype or b.dtype)))
    step = max(1, _CHUNK * b.shape[first] // b.numel())
    total = 0.0
    for start in range(0, b.shape[first], step):
        part = torch.arange(start, min(start + step, b.shape[first]), device=b.device)
        pb = b.index_select(first, index[first][part] if first in index else part)
        for axis, idx in index.items():
            if axis != first:
                pb = pb.index_select(axis, idx)
        pa = a.narrow(first, start, part.numel())
        pa, pb = pa.reshape(-1), pb.reshape(-1)
        if dtype is not None:
            pa, pb = pa.to(dtype), pb.to(dtype)
        total += float(torch.dot(pa, pb))
    return total


def _sorted(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.sort(dim).values``, sorted along a contiguous last dimension (torch sorts
    a strided dimension at half the speed: vit_base's q/k/v rows, 9 vs 18 ms)."""
    if dim % t.dim() == t.dim() - 1:
        return t.sort(dim=-1).values
    return t.movedim(dim, -1).contiguous().sort(dim=-1).values.movedim(-1, dim)


def _signature_rows(term: _Term, t: torch.Tensor, perms: Perms | None,
                    unknown: set[str] | frozenset[str]) -> torch.Tensor:
    """Rows (n, rest) of member ``term.member`` of ``t``, invariant to the groups in ``unknown``.

    Axes (or grid dimensions of the member's own axis) that an ``unknown`` group
    acts on are sorted, which no permutation of them changes; the other groups
    are applied at ``perms`` (None: not at all, for A). The member's own rows
    keep their order, so permuting them permutes the result's rows.
    """
    m = term.member
    for axis, members in term.other_axes:
        if any(h in unknown for h, _ in members):
            t = _sorted(t, axis)
        elif perms is not None:
            t = t.index_select(axis, _axis_perm(t.shape[axis], members, perms, t.device))
    known = [(h, o) for h, o in term.same_axis if h not in unknown]
    rows = m.positions().reshape(-1).to(t.device)
    if known and perms is not None:
        rows = _axis_perm(t.shape[m.axis], known, perms, t.device)[rows]
    t = t.index_select(m.axis, rows).movedim(m.axis, 0).reshape(*m.shape, -1)
    whole_row = False
    for h, o in term.same_axis:
        if h not in unknown:
            continue
        if (o.offset, o.shape, o.strides) == (m.offset, m.shape, m.strides) and o.dim != m.dim:
            t = _sorted(t, o.dim)  # another dimension of the same grid
        else:
            whole_row = True  # overlapping in some other layout: sort whole rows
    t = t.movedim(m.dim, 0).reshape(m.size, -1)
    return t.sort(dim=1).values if whole_row else t


def _greedy_init(spec: PermutationSpec, static: dict[str, torch.Tensor | _LowRank | None],
                 static_cols: dict[str, int], dynamic: dict[str, list[_Term]],
                 a_t: dict[str, torch.Tensor], b_t: dict[str, torch.Tensor], perms: Perms,
                 device: torch.device, keep: set[str], cache: dict, ws: _Workspace
                 ) -> tuple[list[str], dict[str, bool], float, float]:
    """Solve every group once, best-determined first (see the module docstring).

    Updates ``perms`` in place; a complete similarity of a group in ``keep`` goes
    into ``cache`` (with its dependencies' permutations) for descent to update.
    Returns the order the groups were solved in, for
    each group whether its similarity was complete (every term exact, so equal
    to what descent would compute at these perms), and the seconds spent on
    similarities and on assignments.
    """
    names = list(spec.groups)
    index = {g: i for i, g in enumerate(names)}
    solved: set[str] = set()
    waiting: dict[str, list[_Term]] = {g: [] for g in names}  # terms that wait on group g
    unknown_deps: dict[int, int] = {}                          # id(term) -> unsolved deps
    clean: dict[str, list[_Term]] = {g: [] for g in names}
    cols = dict(static_cols)                                   # clean evidence per group
    for g in names:
        for term in dynamic[g]:
            unknown_deps[id(term)] = len(term.deps)
            for d in term.deps:
                waiting[d].append(term)
    owner = {id(t): g for g in names for t in dynamic[g]}
    heap = [(-cols[g], index[g], g) for g in names]
    heapq.heapify(heap)
    order: list[str] = []
    complete: dict[str, bool] = {}
    sim_s = lap_s = 0.0

    def mark_solved(g: str) -> None:
        solved.add(g)
        for term in waiting[g]:
            unknown_deps[id(term)] -= 1
            if unknown_deps[id(term)] == 0:
                h = owner[id(term)]
                clean[h].append(term)
                if h not in solved:
                    cols[h] += term.cols
                    heapq.heappush(heap, (-cols[h], index[h], h))

    for g in names:  # nothing to solve: size 0 or 1, or no members
        if spec.groups[g].size <= 1 or (static[g] is None and not dynamic[g]):
            complete[g] = True
            mark_solved(g)

    while len(solved) < len(names):
        while heap and (heap[0][2] in solved or -heap[0][0] != cols[heap[0][2]]):
            heapq.heappop(heap)
        if heap and heap[0][0] < 0:
            g = heap[0][2]
            signature = False
        else:  # no clean member anywhere: take the group closest to clean
            def closeness(h: str) -> tuple[float, int]:
                near = sum(t.cols / (1 + unknown_deps[id(t)]) for t in dynamic[h])
                return near, -index[h]
            g = max((h for h in names if h not in solved), key=closeness)
            signature = True
        t0 = time.perf_counter()
        unknown = {h for h in names if h not in solved} if signature else set()
        chosen = {id(t) for t in clean[g]}
        rough = [t for t in dynamic[g] if id(t) not in chosen] if signature else []

        # a signature row holds the same elements as the member's row, sorted
        wide = static_cols[g] + sum(t.cols for t in (*clean[g], *rough)) > _FLOAT64_COLS
        complete[g] = len(clean[g]) == len(dynamic[g])
        # narrow: float64; wide: the terms' precision
        dtype = torch.float64 if not wide else dynamic[g][0].dtype if dynamic[g] else None
        out = None if (complete[g] and g in keep) or dtype is None else \
            ws.matrix(spec.groups[g].size, dtype)
        c = _static_matrix(static[g], dtype, out)

        def pairs():  # one term's rows at a time: never all of B's rows at once
            for term in clean[g]:
                if not (wide and _sliced(term)):
                    yield term.a_rows, _b_rows(term, b_t[term.member.param], perms)
            for term in rough:
                p = term.member.param
                yield (_signature_rows(term, a_t[p], None, unknown),
                       _signature_rows(term, b_t[p], perms, unknown))
        for term in clean[g]:
            if wide and _sliced(term):  # a slice at a time, in the workspace
                c = _add_whole(c, term, b_t[term.member.param], perms, ws, out)
        for a_rows, b_rows in pairs():
            if not wide:
                a_rows, b_rows = a_rows.double(), b_rows.double()
            c = _accumulate(c, a_rows, b_rows, out)
        if complete[g] and g in keep:
            cache[g] = (c, {d: perms[d] for t in dynamic[g] for d in t.deps})
        t1 = time.perf_counter()
        sim_s += t1 - t0
        perms[g] = solve_lap(c, name=g).to(device)
        lap_s += time.perf_counter() - t1
        order.append(g)
        mark_solved(g)
    return order, complete, sim_s, lap_s


def weight_matching(spec: PermutationSpec, state_dict_a: Mapping[str, torch.Tensor],
                    state_dict_b: Mapping[str, torch.Tensor], max_iter: int = 100, seed: int = 0,
                    init: Mapping[str, torch.Tensor] | str | None = "best", progress: bool = True,
                    device: torch.device | str | None = None,
                    stats: dict | None = None, tol: float = 0.0,
                    match_buffers: bool = False, cache_budget: float = 0.25) -> WeightMatching:
    """Permutations of B's groups that maximise its inner product with A.

    Args:
        spec: the groups to permute.
        state_dict_a, state_dict_b: the two models' states; every tensor a member
            names must be in both, with equal shapes. Neither is modified.
        max_iter: most sweeps over all groups.
        seed: seeds the random group order of each sweep; equal seeds give equal results.
        init: where descent starts. ``"greedy"``: solve each group once,
            best-determined first (see the module docstring); recovers ``B = P(A)``
            exactly. ``None`` or ``"identity"``: the identity. A mapping
            ``{group: LongTensor (n,)}``: those permutations, groups left out
            at the identity. ``"best"`` (default): descend from the greedy
            start, then, unless that start already reached the bound
            ``||A|| ||B||`` (so nothing beats it), from the identity too, and
            keep the higher objective (ties go to greedy). Neither start
            dominates: greedy recovers planted permutations and wins on
            heads x head-dim grids; on independently trained or initialised
            ResNets the identity start can end a fraction of a percent higher.
        match_buffers: whether buffers (BatchNorm running statistics, ...) count
            in the objective. Default False: the paper's objective, over
            parameters only; buffers in a group are still permuted with it
            (:func:`~autobasin.permute.apply_permutation`), they just do not
            steer the matching. Running statistics carry about one unit of
            similarity per channel, as much as a whole weight row, so matching
            them lets them dominate BatchNorm groups. A spec made by hand
            without :attr:`~autobasin.spec.PermutationSpec.tensors` entries
            treats every tensor as a parameter.
        progress: show a tqdm bar over sweeps.
        device: where to compute (default: the device of A's tensors).
        tol: stop after a sweep that raises the objective by at most ``tol`` times
            its value. The default 0 is the paper's rule: stop after a sweep
            that changes nothing. A small ``tol`` (say 1e-4) trades the last
            sweeps' tiny gains for time on large models.
        cache_budget: memory for similarity matrices, as a share of the matched
            tensors' bytes in A and B (default 0.25): the one the largest group is
            solved in, and matrices kept between sweeps and updated by the columns
            that moved instead of recomputed, in what is left (none when nothing is
            left: 0 recomputes every time).
        stats: kept for compatibility: a dict given here receives the result's
            fields (:meth:`~autobasin.match.result.Matching.as_dict`).

    Returns:
        a :class:`~autobasin.match.result.WeightMatching`: the mapping ``{group
        name: CPU LongTensor (n,)}`` (apply it to B with
        :func:`autobasin.permute.apply_permutation` to align B to A) with the
        objective, sweeps, starts and timings as attributes.

    Similarities are computed in float32 (float64 when the tensor is float64),
    on ``device``; assignments are solved in float64.

    Raises :class:`~autobasin.guard.NonFiniteWeightError` (a ``ValueError``)
    naming the entry when a permuted tensor holds NaN or Inf, and
    :class:`~autobasin.guard.MetaTensorError` when one is on the meta device.
    """
    start = time.perf_counter()
    if isinstance(init, str) and init == "best":
        kw = dict(max_iter=max_iter, seed=seed, progress=progress, device=device, tol=tol,
                  match_buffers=match_buffers, cache_budget=cache_budget)
        runs: dict[str, WeightMatching] = {}
        for mode in ("greedy", "identity"):
            runs[mode] = weight_matching(spec, state_dict_a, state_dict_b, init=mode, **kw)
            if runs[mode].optimal_by_bound:
                break  # the greedy start reached ||A|| ||B||: no start can end higher
        kept = max(runs, key=lambda m: (runs[m].objective, m == "greedy"))
        result = dataclasses.replace(
            runs[kept], seconds=time.perf_counter() - start,
            starts={m: runs[m].objective if m in runs else None for m in ("greedy", "identity")})
        fill_stats(stats, result)
        return result
    if not (isinstance(tol, (int, float)) and 0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    _validate(spec, state_dict_a, state_dict_b)
    by_param = spec.members_by_param()
    groups_of = {p: "permuted by group " + ", ".join(repr(g) for g in sorted({g for g, _ in ms}))
                 for p, ms in by_param.items()}
    for label, sd in (("a", state_dict_a), ("b", state_dict_b)):
        check_materialized({p: sd[p] for p in by_param}, "weight matching", f"state_dict {label}")
        check_finite(sd, by_param, where=f"state_dict {label}'s entry", notes=groups_of)
    names = list(spec.groups)
    if isinstance(init, str):
        if init not in ("greedy", "identity"):
            raise ValueError(f"init must be 'best', 'greedy', 'identity', None or a mapping of "
                             f"permutations, not {init!r}")
        mode, given = init, {}
    elif init is None:
        mode, given = "identity", {}
    else:
        mode, given = "given", init
        unknown = [k for k in given if k not in spec.groups]
        if unknown:
            raise SpecError(f"init has a permutation for {unknown[0]!r}, which is not a group of the spec")
    # the tensors that count in the objective (see match_buffers); every member
    # is still validated above, and permuted by apply_permutation
    by_param = {p: ms for p, ms in spec.members_by_param().items()
                if match_buffers or p not in spec.tensors or spec.tensors[p].is_parameter}
    if device is None:
        first = next((state_dict_a[p] for p in by_param), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    release_freed()  # what the caller (or the other start) freed: see autobasin.alloc
    with torch.no_grad():
        a_t = {p: state_dict_a[p].detach().to(device, _compute_dtype(state_dict_a[p])) for p in by_param}
        b_t = {p: state_dict_b[p].detach().to(device, _compute_dtype(state_dict_b[p])) for p in by_param}

        perms: Perms = {}
        for name, g in spec.groups.items():
            p = check_perm(name, given[name], g.size) if name in given else torch.arange(g.size)
            perms[name] = p.to(device)

        # Per group: the static part of C and the terms that depend on other groups.
        static: dict[str, torch.Tensor | _LowRank | None] = {}
        static_cols: dict[str, int] = {}
        dynamic: dict[str, list[_Term]] = {}
        deps: dict[str, tuple[str, ...]] = {}
        for gname, g in spec.groups.items():
            static[gname] = None
            dynamic[gname] = []
            fixed = []
            for m in g.members:
                if m.param not in by_param:
                    continue  # a buffer, not matched
                term = _make_term(gname, m, by_param[m.param], a_t[m.param])
                if term.deps:
                    dynamic[gname].append(term)
                else:
                    fixed.append(term)
            static_cols[gname] = sum(t.cols for t in fixed)

            def pairs():  # one term's rows at a time
                for term in fixed:  # few columns (biases, norms): float64, see _FLOAT64_COLS
                    a_rows, b_rows = term.a_rows, _b_rows(term, b_t[term.member.param], perms)
                    if static_cols[gname] <= _FLOAT64_COLS:
                        a_rows, b_rows = a_rows.double(), b_rows.double()
                    yield a_rows, b_rows
            if fixed and 2 * static_cols[gname] < g.size:
                # low rank: keep the factors, not the (n, n) product (see _static_matrix)
                factors = list(pairs())
                static[gname] = _LowRank(torch.cat([a for a, _ in factors], 1),
                                         torch.cat([b for _, b in factors], 1))
                del factors
            elif fixed:
                for a_rows, b_rows in pairs():
                    static[gname] = _accumulate(static[gname], a_rows, b_rows)
            deps[gname] = tuple(sorted(frozenset().union(*(t.deps for t in dynamic[gname]))))

        on_tensor = {p: sorted({g for g, _ in members}) for p, members in by_param.items()}
        cached: dict[str, tuple[tuple, float]] = {}  # tensor -> (its groups' versions, <A_T, P(B_T)>)

        def objective(dtype: torch.dtype | None = None) -> float:
            total = 0.0
            for param, members in by_param.items():
                key = (dtype, *(version[g] for g in on_tensor[param]))
                if param in cached and cached[param][0] == key:
                    total += cached[param][1]
                    continue
                cached[param] = (key, _dot_permuted(a_t[param], b_t[param], members, perms, dtype))
                total += cached[param][1]
            return total

        # the dtype of each group's similarity in descent: float64 when its few columns
        # were summed so (see _FLOAT64_COLS), else its terms' precision
        sim_dtype = {g: torch.float64 if static[g] is not None and
                     static_cols[g] + sum(t.cols for t in dynamic[g]) <= _FLOAT64_COLS
                     else dynamic[g][0].dtype for g in names if dynamic[g]}
        keep = _cached_groups(spec, dynamic, sim_dtype, a_t, b_t, cache_budget)
        largest: dict[torch.dtype, int] = {}
        for g, dtype in sim_dtype.items():
            largest[dtype] = max(largest.get(dtype, 0), spec.groups[g].size)
        ws = _Workspace(device, largest)
        cache: dict[str, tuple[torch.Tensor, Perms]] = {}  # group -> (C_g, its deps' perms then)
        version = dict.fromkeys(names, 0)
        solved_at: dict[str, tuple[int, ...] | None] = dict.fromkeys(names)
        sim_s = lap_s = init_s = 0.0
        order: list[str] = []
        if mode == "greedy":
            t0 = time.perf_counter()
            order, complete, sim_s, lap_s = _greedy_init(spec, static, static_cols, dynamic,
                                                         a_t, b_t, perms, device, keep, cache, ws)
            for gname in names:
                version[gname] = 0 if torch.equal(perms[gname].cpu(), torch.arange(perms[gname].numel())) else 1
            for gname in names:  # solved from its full similarity at these perms: descent may skip it
                if complete[gname]:
                    solved_at[gname] = tuple(version[d] for d in deps[gname])
            release_freed()  # the similarities greedy solved and dropped
            init_s = time.perf_counter() - t0

        history: list[float] = []
        initial = objective()
        # No permutation beats ||A|| ||B|| (Cauchy-Schwarz). Reaching it (B = P(A), a
        # planted problem) proves the start optimal: the first sweep would find nothing.
        bound = _norm64(a_t.values()) * _norm64(b_t.values())
        optimal = bound > 0 and initial >= (1 - 1e-6) * bound and \
            1 - objective(torch.float64) / bound <= _BOUND_TOL
        sweep_seconds = [time.perf_counter() - start]
        bar = tqdm(total=max_iter, desc=f"weight matching ({mode} start)", unit="sweep", disable=not progress)

        def similarity(gname: str) -> torch.Tensor | None:
            nonlocal sim_s
            key = tuple(version[d] for d in deps[gname])
            if spec.groups[gname].size <= 1 or solved_at[gname] == key:
                return None  # same inputs as last time: same assignment
            t0 = time.perf_counter()
            if gname in cache:
                c, seen = cache[gname]
                for term in dynamic[gname]:
                    _update(c, term, b_t[term.member.param], perms, seen, ws)
            else:
                dtype = sim_dtype.get(gname)
                out = None if gname in keep or dtype is None else \
                    ws.matrix(spec.groups[gname].size, dtype)
                c = _static_matrix(static[gname], dtype, out)
                for term in dynamic[gname]:
                    b = b_t[term.member.param]
                    c = _add_whole(c, term, b, perms, ws, out) if _sliced(term) else \
                        _accumulate(c, term.a_rows, _b_rows(term, b, perms), out)
            if gname in keep and c is not None:
                cache[gname] = (c, {d: perms[d] for d in deps[gname]})
            solved_at[gname] = key
            if c is None:  # a group without members: nothing to align
                return None
            sim_s += time.perf_counter() - t0
            return c

        def changed(gname: str) -> None:
            version[gname] += 1

        # J is linear in each group's permutation (so a sweep's gain in J is the sum
        # of its assignment steps' gains) unless a group moves two axes of one tensor
        linear = all(len({m.axis for h, m in members if h == g}) <= 1
                     for members in by_param.values() for g in {h for h, _ in members})

        def after_sweep(gain: float) -> bool:
            history.append((history[-1] if history else initial) + gain if linear else objective())
            sweep_seconds.append(time.perf_counter() - start)
            bar.set_postfix(objective=f"{history[-1]:.6g}", refresh=False)
            bar.update(1)
            before = history[-2] if len(history) > 1 else initial
            return tol > 0 and history[-1] - before <= tol * abs(history[-1])

        if optimal and max_iter > 0:
            descent = Descent(sweeps=1, converged=True)
            history.append(initial)
            sweep_seconds.append(time.perf_counter() - start)
            bar.update(1)
        else:
            descent = coordinate_descent(names, similarity, perms, max_iter=max_iter, seed=seed,
                                         on_change=changed, after_sweep=after_sweep)
            lap_s += descent.lap_seconds
            cache.clear()  # the similarities are done with: free them before the last objective
            ws.clear()
            if history:  # sweeps' gains are summed in float32 similarities: end exact
                history[-1] = objective()
        bar.close()

    result = WeightMatching(
        perms={name: p.cpu() for name, p in perms.items()}, method="weight",
        sweeps=descent.sweeps, converged=descent.converged, objective_history=history,
        initial_objective=initial, optimal_by_bound=optimal, init=mode,
        objective=history[-1] if history else initial, init_order=order, init_seconds=init_s,
        similarity_seconds=sim_s, lap_seconds=lap_s, sweep_seconds=sweep_seconds,
        seconds=time.perf_counter() - start)
    fill_stats(stats, result)
    return result
