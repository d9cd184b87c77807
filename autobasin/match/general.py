"""Weight matching beyond permutations: groups of every kind in one coordinate descent.

For a spec whose groups carry kinds other than permutations (``spec.KINDS``:
signed or scaled permutations, orthogonal or invertible maps), B is aligned to
A by minimising the distance ``sum_p ||A_p - T(B)_p||^2`` over the parameters,
one group at a time with the others held (the distance, not the inner product
of permutation matching: with scalings and invertible maps the inner product is
unbounded). Each step solves its group's subproblem from the same statistics,
``S = sum_m A_m B_m^T`` and ``G = sum_m B_m B_m^T`` over the group's members
(their rows, :meth:`Member.gather`, with every other group applied to B), kept
apart for members a general element M acts on as ``M`` (co) and as ``M^-T``
(contra):

- permutation: the assignment maximising ``tr(P S^T)`` (:func:`solve_lap`);
- sign: the assignment on ``|S|``, each unit's sign that of its match;
- orthogonal: Procrustes, ``M = U V^T`` for ``S = U Sigma V^T``;
- scale: the assignment on scale-free (cosine) similarities, then each unit's
  positive scale minimising its own distance (a one-variable problem solved by
  Newton's method in log-scale from the closed form that balances the norms,
  exact when B is a scaled permutation of A);
- invertible: least squares (``M = S_co G_co^-1``, or through ``M^-T`` for the
  contra members), refined by gradient steps on the whole subproblem; a ridge
  keeps ``G`` invertible, and a solution whose condition number exceeds
  ``max_condition`` is refused: the group keeps the orthogonal (Procrustes)
  solution and is listed in ``refused``.

A step is kept only when it lowers the distance, so the descent never gets
worse; it stops when a sweep over every group gains less than ``tol`` of the
distance. Everything is computed in float64 on the CPU: this matcher is for
models of up to a few hundred million weights (the permutation matcher,
:func:`~autobasin.match.weight.weight_matching`, is the fast path for specs of
permutations only).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..permute import act, as_matrix, polar_pairs
from ..spec import PAIR_KINDS, Member, PermutationSpec, pair_firsts, pair_partners
from .lap import solve_lap
from .result import Matching


@dataclass(eq=False, repr=False)
class GeneralMatching(Matching):
    """The elements ``{group: LongTensor (n,) | float64 (n, n)}`` aligning B to A.

    ``distance`` / ``initial_distance``: ``sqrt(sum ||A - T(B)||^2)`` over the
    parameters, after and before; ``history``: the distance after each sweep;
    ``kinds``: each group's kind; ``refused``: invertible groups whose least-
    squares solution was ill-conditioned and that kept an orthogonal map."""

    distance: float = 0.0
    initial_distance: float = 0.0
    history: list[float] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def _eye_element(kind: str, n: int) -> torch.Tensor:
    return torch.arange(n) if kind == "permutation" else torch.eye(n, dtype=torch.float64)


class _Problem:
    """One group's subproblem: its members' rows in A and in B (others applied)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor, bool]], n: int):
        self.n = n
        z = torch.zeros(n, n, dtype=torch.float64)
        self.s = {False: z.clone(), True: z.clone()}  # S = sum A B^T, by contra
        self.g = {False: z.clone(), True: z.clone()}  # G = sum B B^T
        self.aa = {False: 0.0, True: 0.0}             # sum ||A||^2
        self.has = {False: False, True: False}
        for a, b, contra in pairs:
            self.s[contra] += a @ b.T
            self.g[contra] += b @ b.T
            self.aa[contra] += float((a * a).sum())
            self.has[contra] = True

    def cost(self, m: torch.Tensor) -> float:
        """``sum_co ||A - M B||^2 + sum_contra ||A - M^-T B||^2``."""
        total = 0.0
        for contra in (False, True):
            if not self.has[contra]:
                continue
            x = torch.linalg.inv(m).T if contra else m
            total += self.aa[contra] - 2 * float((x * self.s[contra]).sum()) + \
                float((x @ self.g[contra] * x).sum())
        return total

    def grad(self, m: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(m)
        if self.has[False]:
            out += 2 * (m @ self.g[False] - self.s[False])
        if self.has[True]:
            nmat = torch.linalg.inv(m).T
            gn = 2 * (nmat @ self.g[True] - self.s[True])
            out -= nmat @ gn.T @ nmat
        return out


def _solve_permutation(pb: _Problem, name: str) -> torch.Tensor:
    return solve_lap(pb.s[False] + pb.s[True], name=name)


def _blocks(m: Member, t: torch.Tensor, inner: int) -> torch.Tensor:
    """The member's rows as (n, size of grid dim ``inner``, rest): the blocks an
    element of the group acting on ``inner`` (a head's head-dim) mixes."""
    x = t.movedim(m.axis, 0)
    sub = x[m.positions().reshape(-1)].reshape(*m.shape, *x.shape[1:])
    return sub.movedim((m.dim, inner), (0, 1)).reshape(m.size, m.shape[inner], -1)


def _solve_blocks(pairs, name: str) -> torch.Tensor:
    """The assignment of blocks (heads) whose inside another group maps by any
    invertible matrix: score each pair of blocks by the overlap of their row
    spaces, which such a map leaves unchanged, so a head-dim map far from its
    final value cannot mislead the heads."""
    def basis(x):  # orthonormal bases of each block's row space: (n, rest, d)
        q, _ = torch.linalg.qr(x.transpose(1, 2))
        return q
    score = None
    for a, b in pairs:
        qa, qb = basis(a), basis(b)
        over = (torch.einsum("ird,jre->ijde", qa, qb) ** 2).sum((2, 3))
        score = over if score is None else score + over
    return solve_lap(score, name=name)


def _solve_sign(pb: _Problem, name: str) -> torch.Tensor:
    s = pb.s[False] + pb.s[True]
    p = solve_lap(s.abs(), name=name)
    sign = torch.sign(s[torch.arange(pb.n), p])
    sign[sign == 0] = 1
    return sign[:, None] * as_matrix(p)


def _procrustes(pb: _Problem) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(pb.s[False] + pb.s[True])
    return u @ vh


def _solve_scale(pb: _Problem, name: str, pairs) -> torch.Tensor:
    n = pb.n
    eps = 1e-30
    # per-unit squared norms of A's and B's rows, co and contra
    na = {c: torch.zeros(n, dtype=torch.float64) for c in (False, True)}
    nb = {c: torch.zeros(n, dtype=torch.float64) for c in (False, True)}
    for a, b, contra in pairs:
        na[contra] += (a * a).sum(1)
        nb[contra] += (b * b).sum(1)
    sim = torch.zeros(n, n, dtype=torch.float64)
    for c in (False, True):
        if pb.has[c]:
            sim += pb.s[c] / (na[c].sqrt()[:, None] * nb[c].sqrt()[None, :] + eps)
    p = solve_lap(sim, name=name)
    idx = torch.arange(n)
    # unit i of the result is B's unit p[i] times s_i: co rows scale by s, contra by 1/s;
    # minimise alpha s^2 - 2 beta s + gamma / s^2 - 2 delta / s per unit
    alpha = nb[False][p]
    beta = pb.s[False][idx, p]
    gamma = nb[True][p]
    delta = pb.s[True][idx, p]
    s0 = _balanced_scale(na, alpha, gamma, delta, beta, pb.has)
    return _newton_scale(s0, alpha, beta, gamma, delta)[:, None] * as_matrix(p)


def _balanced_scale(na, alpha, gamma, delta, beta, has, eps: float = 1e-30) -> torch.Tensor:
    """A starting scale per unit for :func:`_newton_scale`: the one that balances
    the norms (co and contra members), else the closed form of the side there is."""
    if has[False] and has[True]:
        return ((na[False] * gamma) / (alpha * na[True] + eps) + eps) ** 0.25
    if has[False]:
        return beta / (alpha + eps)
    return gamma / (delta.abs() + eps)


def _newton_scale(s0, alpha, beta, gamma, delta, eps: float = 1e-30,
                  steps: int = 50) -> torch.Tensor:
    """Per unit, the positive ``s`` minimising ``alpha s^2 - 2 beta s + gamma / s^2
    - 2 delta / s`` (co rows scaled by ``s``, contra rows by ``1/s``): Newton's
    method in log-scale from ``s0``, each step kept only if it helps."""
    u = torch.log(s0.clamp(1e-3, 1e3))

    def f(u):
        s = torch.exp(u)
        return alpha * s * s - 2 * beta * s + gamma / (s * s) - 2 * delta / s

    for _ in range(steps):
        s = torch.exp(u)
        d1 = 2 * alpha * s * s - 2 * beta * s - 2 * gamma / (s * s) + 2 * delta / s
        d2 = 4 * alpha * s * s - 2 * beta * s + 4 * gamma / (s * s) - 2 * delta / s
        step = torch.where(d2 > 0, d1 / d2.clamp_min(eps), torch.sign(d1) * 0.1).clamp(-1, 1)
        new = (u - step).clamp(-7, 7)
        u = torch.where(f(new) <= f(u), new, u)
    return torch.exp(u)


def _solve_pairs(pb: _Problem, pairs, kind: str) -> torch.Tensor:
    """The best map acting on each RoPE frequency pair ``(i, j)`` alone as a
    rotation by ``phi`` ("rotation"), times a scale ``s`` ("rotary"): co rows
    take ``s R(phi)``, contra rows ``R(phi) / s``. The distance splits by pair:
    ``s^2 g1 - 2 s (cos a1 + sin b1) + g2 / s^2 - 2 (cos a2 + sin b2) / s`` with
    ``a = S_ii + S_jj``, ``b = S_ji - S_ij``, ``g = G_ii + G_jj`` (1: co, 2:
    contra); for a given ``s`` the best angle is closed-form, for a given angle
    the best scale is :func:`_newton_scale`'s; alternated from ``s = 1``."""
    partner = pair_partners(pairs, pb.n)
    i = pair_firsts(partner)
    j = partner[i]

    def parts(c):
        if not pb.has[c]:
            z = torch.zeros(len(i), dtype=torch.float64)
            return z, z, z
        sm, gm = pb.s[c], pb.g[c]
        return sm[i, i] + sm[j, j], sm[j, i] - sm[i, j], gm[i, i] + gm[j, j]
    (a1, b1, g1), (a2, b2, g2) = parts(False), parts(True)
    s = torch.ones(len(i), dtype=torch.float64)
    phi = torch.atan2(b1 + b2, a1 + a2)
    for _ in range(0 if kind == "rotation" else 50):
        c, sn = torch.cos(phi), torch.sin(phi)
        s_new = _newton_scale(s, g1, c * a1 + sn * b1, g2, c * a2 + sn * b2, steps=8)
        phi_new = torch.atan2(s_new * b1 + b2 / s_new, s_new * a1 + a2 / s_new)
        moved = max(float((s_new - s).abs().max()), float((phi_new - phi).abs().max()))
        s, phi = s_new, phi_new
        if moved < 1e-12:
            break
    return polar_pairs(partner, s, phi)


def _solve_invertible(pb: _Problem, current: torch.Tensor, max_condition: float,
                      steps: int = 60) -> tuple[torch.Tensor, bool]:
    n = pb.n
    cands = [current, _procrustes(pb)]
    for contra in (False, True):
        if not pb.has[contra]:
            continue
        g = pb.g[contra]
        ridge = 1e-8 * float(torch.diagonal(g).mean()) + 1e-30
        x = torch.linalg.solve(g + ridge * torch.eye(n, dtype=torch.float64), pb.s[contra].T).T
        try:
            cands.append(torch.linalg.inv(x).T if contra else x)
        except RuntimeError:  # singular: not a candidate
            pass

    def ok(m):
        return bool(torch.isfinite(m).all()) and float(torch.linalg.cond(m)) < max_condition

    good = [m for m in cands if ok(m)]
    best = min(good, key=pb.cost)
    refused = len(good) < len(cands) and pb.cost(best) > min(
        (pb.cost(m) for m in cands if bool(torch.isfinite(m).all())), default=float("inf"))
    # gradient steps with backtracking, staying well-conditioned
    cost, lr = pb.cost(best), 1.0
    scale = float(sum(torch.diagonal(pb.g[c]).sum() for c in (False, True) if pb.has[c])) / n
    lr = 0.5 / max(scale, 1e-30)
    for _ in range(steps):
        gr = pb.grad(best)
        while lr > 1e-12 / max(scale, 1e-30):
            trial = best - lr * gr
            if ok(trial):
                c = pb.cost(trial)
                if c < cost:
                    best, cost, lr = trial, c, lr * 1.5
                    break
            lr *= 0.5
        else:
            break
    return best, refused


# kinds whose elements mix a member's units (not a scaled or signed permutation)
_GENERAL_MAPS = ("orthogonal", "invertible", *PAIR_KINDS)


def _blocks_of(spec: PermutationSpec) -> dict[str, list[tuple[Member, int]]]:
    """Permutation groups whose every member is a grid (heads x head-dim) whose
    other dimension an orthogonal or invertible group maps: blocks to assign,
    with that dimension of each member."""
    general_dim: dict[tuple, int] = {}
    for grp in spec.groups.values():
        if grp.kind in _GENERAL_MAPS:
            for m in grp.members:
                general_dim[(m.param, m.axis, m.offset, m.shape, m.strides)] = m.dim
    out: dict[str, list[tuple[Member, int]]] = {}
    for g, grp in spec.groups.items():
        inner = [(m, general_dim.get((m.param, m.axis, m.offset, m.shape, m.strides)))
                 for m in grp.members]
        if grp.kind == "permutation" and inner and all(d is not None and d != m.dim
                                                      for m, d in inner):
            out[g] = inner
    return out


def general_weight_matching(spec: PermutationSpec, state_dict_a: Mapping[str, torch.Tensor],
                            state_dict_b: Mapping[str, torch.Tensor], max_iter: int = 100,
                            seed: int = 0, tol: float = 1e-9, match_buffers: bool = False,
                            max_condition: float = 1e4, progress: bool = False,
                            fixed: Mapping[str, torch.Tensor] | None = None,
                            **_ignored) -> GeneralMatching:
    """Elements of every group (of its kind) that bring B closest to A.

    Args:
        spec: the groups, with their kinds (``infer_spec(..., symmetries=...)``).
        state_dict_a, state_dict_b: the two models' states (not modified).
        max_iter: most sweeps over all groups.
        seed: the random order of the groups in each sweep.
        tol: stop when a sweep lowers the squared distance by less than this
            fraction of it.
        match_buffers: whether buffers count in the distance (they are
            transformed with their groups either way).
        max_condition: an invertible group's map must have a condition number
            below this; an ill-conditioned least-squares solution is refused
            (see the module docstring).
        fixed: elements of some groups, held as they are (found otherwise, e.g.
            from activations by :func:`general_activation_matching`).
    Returns:
        A :class:`GeneralMatching`; ``apply_permutation(spec, result, state_b)``
        applies it.
    """
    t0 = time.perf_counter()
    spec.check_fits(state_dict_a, "state_dict a")
    spec.check_fits(state_dict_b, "state_dict b")
    by_param = spec.members_by_param()
    counted = {p for p in by_param if match_buffers or spec.tensors.get(p) is None
               or spec.tensors[p].is_parameter}
    a = {p: state_dict_a[p].detach().to("cpu", torch.float64) for p in by_param}
    b0 = {p: state_dict_b[p].detach().to("cpu", torch.float64) for p in by_param}
    elems = {g: _eye_element(grp.kind, grp.size) for g, grp in spec.groups.items()}
    held_fixed = set(fixed or ())
    for g, e in (fixed or {}).items():
        elems[g] = e if not e.is_floating_point() else e.to(torch.float64).cpu()
    params_of = {g: sorted({m.param for m in grp.members}) for g, grp in spec.groups.items()}

    def transformed(p: str, skip: str | None = None) -> torch.Tensor:
        t = b0[p]
        for g, m in by_param[p]:
            if g != skip:
                t = m.scatter(t, act(m.gather(t), elems[g], m.contra))
        return t

    cur = {p: transformed(p) for p in by_param}
    blocks_of = _blocks_of(spec)

    def dist2(ps) -> float:
        return sum(float(((a[p] - cur[p]) ** 2).sum()) for p in ps if p in counted)

    siblings = {g: sorted({h for m, _ in inner for h, grp in spec.groups.items()
                           if h != g and grp.kind in _GENERAL_MAPS and any(
                               (mm.param, mm.axis, mm.offset, mm.shape) ==
                               (m.param, m.axis, m.offset, m.shape) for mm in grp.members)})
                for g, inner in blocks_of.items()}

    def solve(g: str, kind: str) -> torch.Tensor | None:
        if g in held_fixed:
            return None
        """Group ``g``'s best element of ``kind`` with the others held."""
        grp = spec.groups[g]
        held = {p: transformed(p, skip=g) for p in params_of[g]}
        pairs = [(m.gather(a[m.param]), m.gather(held[m.param]), m.contra)
                 for m in grp.members if m.param in counted]
        if not pairs:
            return None
        pb = _Problem(pairs, grp.size)
        if kind == "permutation" and g in blocks_of:
            return _solve_blocks([(_blocks(m, a[m.param], d), _blocks(m, held[m.param], d))
                                  for m, d in blocks_of[g] if m.param in counted], g)
        if kind == "permutation":
            e = _solve_permutation(pb, g)
            return as_matrix(e) if grp.kind != "permutation" else e
        if kind == "sign":
            return _solve_sign(pb, g)
        if kind == "orthogonal":
            return _procrustes(pb)
        if kind == "scale":
            return _solve_scale(pb, g, pairs)
        if kind in PAIR_KINDS:
            return _solve_pairs(pb, grp.pairs, kind)
        cur_e = elems[g] if elems[g].is_floating_point() else as_matrix(elems[g])
        e, bad = _solve_invertible(pb, cur_e, max_condition)
        if bad:
            refused.add(g)
        return e

    total = dist2(by_param)
    initial = total
    history: list[float] = []
    refused: set[str] = set()
    gen = torch.Generator().manual_seed(seed)
    names = [g for g in spec.groups if g not in held_fixed]
    sweeps, converged = 0, False
    # two phases: first every group as the nearest kind with no freedom of
    # scale (invertible -> orthogonal, scale -> permutation), which settles the
    # permutations before maps that could absorb a wrong one are free; then
    # every group as its own kind, from there
    coarse = {"invertible": "orthogonal", "scale": "permutation", "rotary": "rotation"}
    phases = [{g: coarse.get(k.kind, k.kind) for g, k in spec.groups.items()},
              {g: k.kind for g, k in spec.groups.items()}]
    if phases[0] == phases[1]:
        phases = phases[1:]
    phase = phases.pop(0)
    for sweep in range(max_iter):
        sweeps = sweep + 1
        before = total
        for i in torch.randperm(len(names), generator=gen).tolist():
            g = names[i]
            # a block assignment (heads) is judged together with the maps inside
            # the blocks (head-dims), re-fitted to it: alone, a new assignment
            # under the old inner maps looks worse even when it is right
            step = [g] + [h for h in siblings.get(g, []) if h not in held_fixed]
            touched = sorted({p for h in step for p in params_of[h]})
            old_e = {h: elems[h] for h in step}
            old = {p: cur[p] for p in touched}
            old_d = dist2(touched)
            for h in step:
                e = solve(h, phase[h])
                if e is None:
                    continue
                elems[h] = e
                for p in params_of[h]:
                    cur[p] = transformed(p)
            new_d = dist2(touched)
            if new_d < old_d:
                total += new_d - old_d
            else:  # keep the old elements: the descent never gets worse
                elems.update(old_e)
                cur.update(old)
        history.append(max(total, 0.0) ** 0.5)
        if progress:
            print(f"sweep {sweeps}: distance {history[-1]:.6g}")
        if before - total <= tol * max(before, 1e-300):
            if phases:
                phase = phases.pop(0)
                continue
            converged = True
            break
    total = dist2(by_param)  # exact, not the running sum
    if refused:
        import warnings
        warnings.warn(f"general_weight_matching: the least-squares maps of {len(refused)} "
                      f"invertible group(s) ({', '.join(sorted(refused)[:3])}) were "
                      f"ill-conditioned (condition number >= {max_condition:g}); they were "
                      "aligned by a better-conditioned map instead", stacklevel=2)
    return GeneralMatching(perms=elems, method="weight", sweeps=sweeps, converged=converged,
                           seconds=time.perf_counter() - t0, distance=max(total, 0.0) ** 0.5,
                           initial_distance=max(initial, 0.0) ** 0.5, history=history,
                           kinds={g: grp.kind for g, grp in spec.groups.items()},
                           refused=sorted(refused))


def _apply_group(t: torch.Tensor, members: list[Member], e: torch.Tensor) -> torch.Tensor:
    for m in members:
        t = m.scatter(t, act(m.gather(t), e, m.contra))
    return t


# ------------------------------------------------------------ from activations
def _sites(spec: PermutationSpec, model: nn.Module) -> list[tuple[str, Member, str, int]]:
    """Where a group's units are a layer's outputs: ``(group, member, module, axis)``
    for each member that is the output axis of a Linear (weight axis 0), a Hugging
    Face Conv1D (axis 1), an Embedding (axis 1) or a convolution (axis 0, output
    channels at axis 1 of the result)."""
    modules = dict(model.named_modules())
    out = []
    for g, grp in spec.groups.items():
        for m in grp.members:
            owner, _, leaf = m.param.rpartition(".")
            mod = modules.get(owner)
            # a grid (a head's head-dim) mixes with the other grid dimensions' groups
            # (the heads' assignment): left to weight matching, which solves them jointly
            if leaf != "weight" or mod is None or m.contra or len(m.shape) != 1:
                continue
            if isinstance(mod, nn.Linear) and m.axis == 0:
                out.append((g, m, owner, -1))
            elif isinstance(mod, nn.Embedding) and m.axis == 1:
                out.append((g, m, owner, -1))
            elif type(mod).__name__ == "Conv1D" and m.axis == 1:
                out.append((g, m, owner, -1))
            elif isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed \
                    and mod.groups == 1 and m.axis == 0:
                out.append((g, m, owner, 1))
    return out


def _element_from_stats(kind: str, s: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
                        name: str, max_condition: float) -> torch.Tensor | None:
    """The element mapping B's unit activations onto A's, from ``S = sum a b^T``,
    ``G_A = sum a a^T`` and ``G_B = sum b b^T`` (centred)."""
    sa, sb = torch.diagonal(ga).clamp_min(0).sqrt(), torch.diagonal(gb).clamp_min(0).sqrt()
    corr = s / (sa[:, None] * sb[None, :] + 1e-30)
    if kind == "sign":
        p = solve_lap(corr.abs(), name=name)
        sign = torch.sign(corr[torch.arange(len(p)), p])
        sign[sign == 0] = 1
        return sign[:, None] * as_matrix(p)
    if kind == "scale":
        p = solve_lap(corr, name=name)
        ratio = (sa / (sb[p] + 1e-30)).clamp(1e-3, 1e3)
        return ratio[:, None] * as_matrix(p)
    if kind == "orthogonal":
        u, _, vh = torch.linalg.svd(s)
        return u @ vh
    n = s.shape[0]  # invertible: regress A's activations on B's
    ridge = 1e-6 * float(torch.diagonal(gb).mean()) + 1e-30
    m = torch.linalg.solve(gb + ridge * torch.eye(n, dtype=gb.dtype), s.T).T
    if not bool(torch.isfinite(m).all()) or float(torch.linalg.cond(m)) >= max_condition:
        return None
    return m


def general_activation_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, data,
                                batches: int | None = None, max_condition: float = 1e4,
                                seed: int = 0, max_iter: int = 100,
                                general_from: str = "weights", **_ignored) -> GeneralMatching:
    """Elements of every group from activations, for specs beyond permutations.

    For each group whose units are the outputs of a layer (a Linear's, an
    Embedding's, a convolution's output channels: see :func:`_sites`), A's and
    B's outputs on the same batches give the centred statistics
    ``S = sum a b^T``, ``G_A``, ``G_B`` (summed over every such layer of the
    group); then signs and scales by assignment on the correlations, orthogonal
    maps by Procrustes on ``S``, invertible maps by regressing A's activations on
    B's (refused, and left to weight matching, when ill-conditioned). The
    permutation groups come from :func:`~autobasin.match.activation.activation_matching`
    (the general groups held at the identity there). Groups with no such layer,
    and refused ones, are found by :func:`general_weight_matching` with the
    others held.

    ``general_from``: ``"weights"`` (default) takes only the permutations from
    activations and finds every other group by weight matching with them held;
    ``"activations"`` finds them from the statistics above. On the byte-level
    Llama of ``benchmarks/generalized.py`` the first gave the lower barrier
    (Procrustes on the residual stream's contributions and regressions of the
    value heads raised it; see docs/generalized.md).
    """
    if general_from not in ("weights", "activations"):
        raise ValueError(f"general_from must be 'weights' or 'activations', not {general_from!r}")
    import warnings
    from ..batches import run_batch
    t0 = time.perf_counter()
    data = data if isinstance(data, (list, tuple)) else list(data)  # read twice
    general = [g for g, grp in spec.groups.items() if grp.kind != "permutation"]
    found: dict[str, torch.Tensor] = {}
    if len(general) < len(spec.groups):
        # the permutation groups: the permutation activation matcher, which knows
        # the graph's activation sites (heads, grids, fallbacks)
        from .activation import activation_matching
        perms = activation_matching(spec.without(*general), a, b, data, num_batches=batches,
                                    progress=False, seed=seed, max_iter=max_iter).perms
        # blocks whose insides another group maps (heads around invertible head
        # dims) are left to weight matching, which assigns them jointly
        blocks = _blocks_of(spec)
        found.update({g: p for g, p in perms.items() if g not in blocks})
    # RoPE's pair maps are not read off a layer's outputs: left to weight matching
    sites = [s for s in _sites(spec, a) if s[0] in general
             and spec.groups[s[0]].kind not in PAIR_KINDS] \
        if general_from == "activations" else []
    stats: dict[str, dict] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for which, model in ((0, a), (1, b)):
        mods = dict(model.named_modules())
        for name in {s[2] for s in sites}:
            def hook(_m, _args, out, key=(which, name)):
                outputs[key] = out.detach()
            hooks.append(mods[name].register_forward_hook(hook))
    seen = 0
    try:
        with torch.no_grad():
            was = (a.training, b.training)
            a.eval(), b.eval()
            for i, batch in enumerate(data if sites else ()):
                if batches is not None and i >= batches:
                    break
                outputs.clear()
                run_batch(a, batch)
                run_batch(b, batch)
                seen += 1
                for g, m, name, axis in sites:
                    ya, yb = outputs.get((0, name)), outputs.get((1, name))
                    if ya is None or yb is None:
                        continue
                    ra = _site_rows(m, ya, axis)
                    rb = _site_rows(m, yb, axis)
                    st = stats.setdefault(g, {"s": 0, "ga": 0, "gb": 0, "ma": 0, "mb": 0, "n": 0})
                    st["s"] = st["s"] + ra @ rb.T
                    st["ga"] = st["ga"] + ra @ ra.T
                    st["gb"] = st["gb"] + rb @ rb.T
                    st["ma"] = st["ma"] + ra.sum(1)
                    st["mb"] = st["mb"] + rb.sum(1)
                    st["n"] += ra.shape[1]
            a.train(was[0]), b.train(was[1])
    finally:
        for h in hooks:
            h.remove()
    if not seen and sites:
        raise ValueError("general_activation_matching: no batches in data")
    refused = []
    for g, st in stats.items():
        n, ma, mb = st["n"], st["ma"], st["mb"]
        s = st["s"] - ma[:, None] * mb[None, :] / n
        ga = st["ga"] - ma[:, None] * ma[None, :] / n
        gb = st["gb"] - mb[:, None] * mb[None, :] / n
        e = _element_from_stats(spec.groups[g].kind, s, ga, gb, g, max_condition)
        if e is None:
            refused.append(g)
            continue
        found[g] = e
    if refused:
        warnings.warn(f"general_activation_matching: {len(refused)} invertible group(s) "
                      f"({', '.join(refused[:3])}) had ill-conditioned regressions; they were "
                      "aligned by weight matching", stacklevel=2)
    rest = general_weight_matching(spec, a.state_dict(), b.state_dict(), max_iter=max_iter,
                                   seed=seed, max_condition=max_condition, fixed=found)
    rest.method = "activation"
    rest.seconds = time.perf_counter() - t0
    rest.refused = sorted(set(rest.refused) | set(refused))
    return rest


def _site_rows(m: Member, y: torch.Tensor, axis: int) -> torch.Tensor:
    """A layer output's features along ``axis`` as the member's rows (n, samples)."""
    y = y.movedim(axis, -1)
    flat = y.reshape(-1, y.shape[-1]).T.to(torch.float64)  # (features, samples)
    site = Member("", 0, m.offset, m.shape, m.strides, m.dim)
    return site.gather(flat)


# ------------------------------------------------------- learned on the midpoint
def _elements_applied(spec: PermutationSpec, state: Mapping[str, torch.Tensor],
                      elems: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under ``elems`` (differentiable in the float elements), float32."""
    out = {}
    for p, gm in spec.members_by_param().items():
        t = state[p]
        if not t.is_floating_point():
            continue
        for g, m in gm:
            t = m.scatter(t, act(m.gather(t), elems[g], m.contra))
        out[p] = t
    return out


def _cayley(k: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix from any square ``k`` (its skew part), identity at 0."""
    s = k - k.T
    eye = torch.eye(k.shape[0], dtype=k.dtype)
    return torch.linalg.solve(eye - s, eye + s)


def general_ste_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, data,
                         epochs: int = 1, lr: float = 1e-2, seed: int = 0,
                         max_steps: int | None = None, max_condition: float = 1e4,
                         max_iter: int = 100, loss_fn=None,
                         path: str | tuple[float, float] = "midpoint",
                         **_ignored) -> GeneralMatching:
    """Elements that lower the loss of the A-B midpoint, for specs beyond permutations.

    The permutation groups come from :func:`~autobasin.match.ste.ste_matching`
    (the other groups held at the identity; heads around general head dims are
    left to weights), the others from :func:`general_weight_matching` with those
    held; then every orthogonal, invertible, scale and RoPE pair group is refined by Adam
    on the loss of ``(A + T(B)) / 2`` over ``data`` (``epochs`` passes): an
    orthogonal element as ``T0 cayley(K)``, an invertible one as ``T0 (I + E)``,
    a scale as ``T0 diag(exp(u))``, all starting at ``T0``. Any ``T`` keeps what
    B computes, so only the midpoint moves. A refined element whose condition
    number reaches ``max_condition`` is refused (its starting point is kept).
    ``loss_fn(output, batch)``: default :func:`autobasin.batches.default_loss`.
    ``path``: where on the path each step lowers the loss: ``"midpoint"``
    (``lam = 0.5``), ``"uniform"`` (``lam`` drawn uniformly from (0, 1), seeded),
    or a range ``(lo, hi)`` to draw ``lam`` from, at ``(1 - lam) A + lam T(B)``.
    A barrier is the path's maximum, which need not sit at the midpoint: trained
    at the midpoint alone, the peak moves beside it (a Llama-style LM: 0.6), and
    a narrow range around the middle, ``(0.4, 0.6)``, brings that down too.
    """
    import warnings
    from torch.func import functional_call
    from ..batches import batch_inputs, default_loss
    from .ste import ste_matching
    t0 = time.perf_counter()
    data = data if isinstance(data, (list, tuple)) else list(data)
    loss_fn = loss_fn or default_loss
    general = [g for g, grp in spec.groups.items() if grp.kind != "permutation"]
    fixed: dict[str, torch.Tensor] = {}
    if len(general) < len(spec.groups):
        perms = ste_matching(spec.without(*general), a, b, data, epochs=epochs, seed=seed,
                             progress=False, max_steps=max_steps).perms
        blocks = _blocks_of(spec)
        fixed = {g: p for g, p in perms.items() if g not in blocks}
    base = general_weight_matching(spec, a.state_dict(), b.state_dict(), seed=seed,
                                   max_iter=max_iter, max_condition=max_condition, fixed=fixed)
    start = {g: (e if not e.is_floating_point() else e.to(torch.float64))
             for g, e in base.perms.items()}
    def free_shape(grp):
        if grp.kind == "scale":
            return (grp.size,)
        if grp.kind in PAIR_KINDS:  # per pair: log-scale and angle
            return (grp.size // 2, 2)
        return (grp.size, grp.size)
    free = {g: torch.zeros(free_shape(grp), dtype=torch.float64, requires_grad=True)
            for g, grp in spec.groups.items()
            if grp.kind in ("orthogonal", "invertible", "scale", *PAIR_KINDS)}
    partners = {g: pair_partners(spec.groups[g].pairs, spec.groups[g].size)
                for g in free if spec.groups[g].kind in PAIR_KINDS}

    def elements():
        out = dict(start)
        for g, k in free.items():
            kind = spec.groups[g].kind
            if kind == "orthogonal":
                out[g] = start[g] @ _cayley(k)
            elif kind == "invertible":
                out[g] = start[g] @ (torch.eye(k.shape[0], dtype=k.dtype) + k)
            elif kind in PAIR_KINDS:
                s = torch.exp(k[:, 0]) if kind == "rotary" else torch.ones_like(k[:, 0])
                out[g] = start[g] @ polar_pairs(partners[g], s, k[:, 1])
            else:
                out[g] = start[g] * torch.exp(k)[None, :]
        return out

    if isinstance(path, str) and path in ("midpoint", "uniform"):
        lo, hi = (0.5, 0.5) if path == "midpoint" else (0.0, 1.0)
    elif isinstance(path, (tuple, list)) and len(path) == 2 and 0 <= path[0] <= path[1] <= 1:
        lo, hi = float(path[0]), float(path[1])
    else:
        raise ValueError(f"path={path!r}; choose 'midpoint', 'uniform' or a range (lo, hi) "
                         "within [0, 1]")
    draw = torch.Generator().manual_seed(seed)
    history = []
    if free and data:
        sa = {k: v.detach() for k, v in a.state_dict().items()}
        sb = {k: v.detach() for k, v in b.state_dict().items()}
        opt = torch.optim.Adam(list(free.values()), lr=lr)
        was = a.training
        a.eval()
        step = 0
        try:
            for _ in range(epochs):
                for batch in data:
                    if max_steps is not None and step >= max_steps:
                        break
                    moved = _elements_applied(spec, sb, elements())
                    lam = lo + (hi - lo) * float(torch.rand((), generator=draw))
                    mid = {k: (1 - lam) * sa[k] + lam * moved.get(k, sb[k])
                           if sa[k].is_floating_point() else sa[k] for k in sa}
                    inputs = batch_inputs(batch, model=a)
                    out = functional_call(a, mid, inputs.args, inputs.kwargs)
                    loss = loss_fn(out, batch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    history.append(float(loss.detach()))
                    step += 1
        finally:
            a.train(was)
    final = {g: (e.detach() if e.is_floating_point() else e) for g, e in elements().items()}
    refused = []
    for g in free:
        e = final[g]
        if not bool(torch.isfinite(e).all()) or float(torch.linalg.cond(e)) >= max_condition:
            final[g] = start[g]
            refused.append(g)
    if refused:
        warnings.warn(f"general_ste_matching: {len(refused)} refined element(s) "
                      f"({', '.join(refused[:3])}) became ill-conditioned; their weight-matching "
                      "elements were kept", stacklevel=2)
    base.perms = final
    base.method = "ste"
    base.history = history
    base.refused = sorted(set(base.refused) | set(refused))
    base.seconds = time.perf_counter() - t0
    return base
