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

Cost. Only the tensors of ``g``'s members are touched in a step, and only along
the axes other groups act on (one ``index_select`` per such axis), never the
whole state dict. Terms that no other group touches (biases, norm scales, BN
statistics, a first layer's weight) are summed once into a static part of
``C_g``. A group whose inputs did not change since it was last solved is
skipped: its assignment would come out the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from tqdm.auto import tqdm

from ..permute import _check_perm, axis_index
from ..spec import Member, PermutationSpec, SpecError
from .lap import solve_lap

Perms = dict[str, torch.Tensor]

_REL_TOL = 1e-12


@dataclass
class _Term:
    """One member's contribution ``A_m @ B_m^T`` to its group's similarity."""

    member: Member
    a_rows: torch.Tensor                       # (n, rest) gathered from A, compute dtype
    rows: torch.Tensor | None                  # (prod(member.shape),) axis positions; None: whole axis
    same_axis: list[tuple[str, Member]]        # other members on member.axis of this tensor
    other_axes: list[tuple[int, list[tuple[str, Member]]]]  # (axis, members) elsewhere
    deps: frozenset[str] = field(default_factory=frozenset)  # groups whose perms B_m depends on


def _validate(spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor],
              sd_b: Mapping[str, torch.Tensor]) -> None:
    for gname, g in spec.groups.items():
        for m in g.members:
            for label, sd in (("a", sd_a), ("b", sd_b)):
                if m.param not in sd:
                    raise SpecError(f"state_dict {label} has no entry {m.param!r} "
                                    f"that group {gname!r} permutes")
            ta, tb = sd_a[m.param], sd_b[m.param]
            if ta.shape != tb.shape:
                raise SpecError(f"{m.param!r} has shape {tuple(ta.shape)} in a but "
                                f"{tuple(tb.shape)} in b")
            if m.axis >= ta.dim():
                raise SpecError(f"{m.param!r} has {ta.dim()} axes; group {gname!r} "
                                f"permutes axis {m.axis}")
            if m.size != g.size:
                raise SpecError(f"member {m.describe()} of group {gname!r} has size "
                                f"{m.size}, the group {g.size}")
            need = int(m.positions().max()) + 1 if g.size else 0
            if ta.shape[m.axis] < need:
                raise SpecError(f"{m.param!r} axis {m.axis} has length {ta.shape[m.axis]}, "
                                f"group {gname!r} needs {need}")


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
    return _Term(member=m, a_rows=m.gather(a),
                 rows=None if whole_axis else m.positions().reshape(-1).to(a.device),
                 same_axis=[(h, o) for h, o in others if o.axis == m.axis],
                 other_axes=sorted(elsewhere.items()),
                 deps=frozenset(h for h, _ in others))


def _b_rows(term: _Term, b: torch.Tensor, perms: Perms) -> torch.Tensor:
    """``B_m`` (n, rest): the member's rows of ``b`` with all other members applied.

    The row/column layout equals ``term.member.gather`` so it lines up with ``a_rows``.
    """
    m = term.member
    t = b
    for axis, members in term.other_axes:
        t = t.index_select(axis, _axis_perm(t.shape[axis], members, perms, t.device))
    rows = term.rows
    if term.same_axis:
        idx = _axis_perm(t.shape[m.axis], term.same_axis, perms, t.device)
        rows = idx if rows is None else idx[rows]
    if rows is not None:
        t = t.index_select(m.axis, rows)
    t = t.movedim(m.axis, 0)
    if len(m.shape) == 1:
        return t.reshape(m.size, -1)
    return t.reshape(*m.shape, -1).movedim(m.dim, 0).reshape(m.size, -1)


def _permute_tensor(t: torch.Tensor, members: list[tuple[str, Member]], perms: Perms) -> torch.Tensor:
    per_axis: dict[int, list[tuple[str, Member]]] = {}
    for g, m in members:
        per_axis.setdefault(m.axis, []).append((g, m))
    for axis, ms in per_axis.items():
        t = t.index_select(axis, _axis_perm(t.shape[axis], ms, perms, t.device))
    return t


def weight_matching(spec: PermutationSpec, state_dict_a: Mapping[str, torch.Tensor],
                    state_dict_b: Mapping[str, torch.Tensor], max_iter: int = 100, seed: int = 0,
                    init: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
                    device: torch.device | str | None = None,
                    stats: dict | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B's groups that maximise its inner product with A.

    Args:
        spec: the groups to permute.
        state_dict_a, state_dict_b: the two models' states; every tensor a member
            names must be in both, with equal shapes. Neither is modified.
        max_iter: most sweeps over all groups.
        seed: seeds the random group order of each sweep; equal seeds give equal results.
        init: starting permutations, ``{group: LongTensor (n,)}``; groups left out
            start at the identity.
        progress: show a tqdm bar over sweeps.
        device: where to compute (default: the device of A's tensors).
        stats: if a dict is given, it receives ``sweeps`` (int), ``objective_history``
            (the objective ``sum_T <A_T, P(B_T)>`` after each sweep, floats),
            ``initial_objective``, ``converged`` (bool) and the seconds spent in
            ``similarity_seconds`` and ``lap_seconds`` and in all, ``seconds``.

    Returns:
        ``{group name: CPU LongTensor (n,)}``; apply it to B with
        :func:`autobasin.permute.apply_permutation` to align B to A.

    Similarities are computed in float32 (float64 when the tensor is float64),
    on ``device``; assignments are solved in float64.
    """
    start = time.perf_counter()
    _validate(spec, state_dict_a, state_dict_b)
    names = list(spec.groups)
    if init is not None:
        unknown = [k for k in init if k not in spec.groups]
        if unknown:
            raise SpecError(f"init has a permutation for {unknown[0]!r}, which is not a group of the spec")
    by_param = spec.members_by_param()
    if device is None:
        first = next((state_dict_a[p] for p in by_param), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    with torch.no_grad():
        a_t = {p: state_dict_a[p].detach().to(device, _compute_dtype(state_dict_a[p])) for p in by_param}
        b_t = {p: state_dict_b[p].detach().to(device, _compute_dtype(state_dict_b[p])) for p in by_param}

        perms: Perms = {}
        for name, g in spec.groups.items():
            p = _check_perm(name, init[name], g.size) if init is not None and name in init \
                else torch.arange(g.size)
            perms[name] = p.to(device)

        # Per group: the static part of C and the terms that depend on other groups.
        static: dict[str, torch.Tensor | None] = {}
        dynamic: dict[str, list[_Term]] = {}
        deps: dict[str, tuple[str, ...]] = {}
        for gname, g in spec.groups.items():
            static[gname] = None
            dynamic[gname] = []
            for m in g.members:
                term = _make_term(gname, m, by_param[m.param], a_t[m.param])
                if term.deps:
                    dynamic[gname].append(term)
                else:
                    b_rows = _b_rows(term, b_t[m.param], perms)
                    static[gname] = term.a_rows @ b_rows.T if static[gname] is None \
                        else static[gname].addmm_(term.a_rows, b_rows.T)
            deps[gname] = tuple(sorted(frozenset().union(*(t.deps for t in dynamic[gname]))))

        def objective() -> float:
            total = 0.0
            for param, members in by_param.items():
                pb = _permute_tensor(b_t[param], members, perms)
                total += float(torch.dot(a_t[param].reshape(-1), pb.reshape(-1)))
            return total

        version = dict.fromkeys(names, 0)
        solved_at: dict[str, tuple[int, ...] | None] = dict.fromkeys(names)
        gen = torch.Generator().manual_seed(seed)
        history: list[float] = []
        initial = objective() if stats is not None else float("nan")
        sim_s = lap_s = 0.0
        sweeps = 0
        converged = False
        bar = tqdm(total=max_iter, desc="weight matching", unit="sweep", disable=not progress)
        for _ in range(max_iter):
            sweeps += 1
            improved = False
            for k in torch.randperm(len(names), generator=gen).tolist():
                gname = names[k]
                n = spec.groups[gname].size
                key = tuple(version[d] for d in deps[gname])
                if n <= 1 or solved_at[gname] == key:
                    continue  # same inputs as last time: same assignment
                t0 = time.perf_counter()
                c = static[gname].clone() if static[gname] is not None else None
                for term in dynamic[gname]:
                    b_rows = _b_rows(term, b_t[term.member.param], perms)
                    c = term.a_rows @ b_rows.T if c is None else c.addmm_(term.a_rows, b_rows.T)
                if c is None:  # a group without members: nothing to align
                    solved_at[gname] = key
                    continue
                c = c.double()
                t1 = time.perf_counter()
                new = solve_lap(c, name=gname).to(device)
                lap_s += time.perf_counter() - t1
                sim_s += t1 - t0
                rows = torch.arange(n, device=device)
                old_obj = float(c[rows, perms[gname]].sum())
                new_obj = float(c[rows, new].sum())
                solved_at[gname] = key
                if new_obj - old_obj > _REL_TOL * max(abs(old_obj), abs(new_obj)):
                    perms[gname] = new
                    version[gname] += 1
                    improved = True
            if stats is not None or progress:
                history.append(objective())
                bar.set_postfix(objective=f"{history[-1]:.6g}", refresh=False)
            bar.update(1)
            if not improved:
                converged = True
                break
        bar.close()

    result = {name: p.cpu() for name, p in perms.items()}
    if stats is not None:
        stats.update(sweeps=sweeps, objective_history=history, initial_objective=initial,
                     converged=converged, similarity_seconds=sim_s, lap_seconds=lap_s,
                     seconds=time.perf_counter() - start)
    return result
