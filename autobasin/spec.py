"""PermutationSpec: which parameter axes share one permutation.

Data model
----------
A *group* is one permutation of size ``n``. A *member* says how a group acts on
one axis of one parameter or buffer. The positions of that axis the member
touches form a strided grid::

    position(i_0, ..., i_k) = offset + sum_j i_j * strides[j],   0 <= i_j < shape[j]

and the group permutes grid dimension ``dim`` (so ``shape[dim] == n``) for every
value of the other grid dimensions. A plain member is ``offset=0, shape=(L,),
strides=(1,), dim=0``. A segment of a concatenated axis (DenseNet concat, the q
part of a fused qkv Linear) is a grid with an offset; channels factorised into
heads x head-dim are a 2-D grid whose dim 0 is the head group and dim 1 the
head-dim group; a GroupNorm's channel groups likewise. Grids compose under
restriction and splitting, so nested structure (a segment of heads) needs no
extra notion. Members of one axis act on disjoint positions or on different
grid dimensions, so they commute and can be applied in any order.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class Member:
    """How one group acts on one axis of one tensor (see module docstring)."""

    param: str
    axis: int
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dim: int
    # how a general (non-permutation) element M of the group acts on the grid rows:
    # ``M @ rows`` (False: the axis carries the group's vectors, an output) or
    # ``M^-T @ rows`` (True: it carries covectors, an axis a contraction reads).
    # Permutations, signs and orthogonal maps are their own inverse-transpose.
    contra: bool = False

    @property
    def size(self) -> int:
        return self.shape[self.dim]

    @property
    def is_plain(self) -> bool:
        return len(self.shape) == 1 and self.offset == 0 and self.strides == (1,)

    def positions(self) -> torch.Tensor:
        """LongTensor of shape ``self.shape``: the axis positions of the grid."""
        pos = torch.full(self.shape, self.offset, dtype=torch.long)
        for j, (n, s) in enumerate(zip(self.shape, self.strides)):
            view = [1] * len(self.shape)
            view[j] = n
            pos = pos + (torch.arange(n) * s).view(view)
        return pos

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slice of ``tensor`` this member permutes, as a matrix (n, rest).

        Row ``i`` holds every element whose grid index along ``dim`` is ``i``.
        Permuting the member by ``p`` reorders these rows by ``p``.
        """
        t = tensor.movedim(self.axis, 0)
        pos = self.positions()
        sub = t.index_select(0, pos.reshape(-1).to(t.device))
        sub = sub.reshape(*self.shape, *t.shape[1:])
        return sub.movedim(self.dim, 0).reshape(self.size, -1)

    def scatter(self, tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``tensor`` with the slice :meth:`gather` reads replaced by ``rows`` (n, rest)."""
        t = tensor.movedim(self.axis, 0)
        pos = self.positions()
        shaped = rows.reshape(self.size, *[n for j, n in enumerate(self.shape) if j != self.dim],
                              *t.shape[1:]).movedim(0, self.dim)
        out = t.clone()
        out[pos.reshape(-1).to(t.device)] = shaped.reshape(-1, *t.shape[1:]).to(t.dtype)
        return out.movedim(0, self.axis)

    def describe(self) -> str:
        tail = " (contra)" if self.contra else ""
        if self.is_plain:
            return f"{self.param}[{self.axis}]{tail}"
        grid = "x".join(str(s) for s in self.shape)
        return f"{self.param}[{self.axis}] @{self.offset} grid {grid} dim {self.dim}{tail}"


# The symmetry a group carries, from the least to the most general. Every kind
# contains permutations: "sign" signed permutations, "scale" permutations times
# positive diagonal scalings, "orthogonal" all orthogonal maps, "invertible"
# all invertible maps (a general element M acts as ``M`` or ``M^-T``, see
# ``Member.contra``).
KINDS = ("permutation", "sign", "scale", "orthogonal", "invertible")
# Two more kinds a group can carry, which contain no permutation but the
# identity: the maps that commute with rotary position embeddings (RoPE) on a
# head dim whose positions come in frequency pairs (``Group.pairs``): within
# each pair a 2x2 rotation ("rotation", orthogonal) or a rotation times a
# positive scale ("rotary", invertible; a complex number acting on the pair).
# They are asked for as "orthogonal" and "invertible": a group gets one where
# RoPE admits nothing more general.
PAIR_KINDS = ("rotation", "rotary")
GROUP_KINDS = ("permutation", "sign", "scale", "rotation", "orthogonal", "rotary", "invertible")
# the kind each asked kind brings with it
_IMPLIED = {"orthogonal": "rotation", "invertible": "rotary"}


def symmetry_kinds(symmetries) -> frozenset:
    """The kinds asked for, as a set that always holds ``"permutation"``:
    ``symmetries`` is a kind, an iterable of kinds, or ``"all"``."""
    if symmetries is None:
        return frozenset({"permutation"})
    if isinstance(symmetries, str):
        symmetries = (symmetries,)
    asked = frozenset(symmetries)
    if "all" in asked:
        asked = (asked - {"all"}) | set(KINDS)
    unknown = sorted(asked - set(KINDS))
    if unknown:
        raise ValueError(f"unknown symmetry kind {unknown[0]!r}: kinds are {', '.join(KINDS)} "
                         "(or 'all')")
    return asked | {"permutation"}


def group_kind(admitted, asked) -> str | None:
    """The most general kind a group may carry: asked for (``"orthogonal"``
    brings ``"rotation"``, ``"invertible"`` ``"rotary"``) and admitted by every
    op on its axes. None when nothing is: a RoPE head dim (which admits no
    permutation) met by an op that admits no pair rotation."""
    asked = frozenset(asked) | {_IMPLIED[k] for k in asked if k in _IMPLIED}
    both = frozenset(admitted) & asked
    return next((k for k in reversed(GROUP_KINDS) if k in both), None)


def pair_partners(pairs, n: int) -> torch.Tensor:
    """``pairs`` (each position's partner) as a LongTensor, checked: an
    involution of 0..n-1 without fixed points."""
    if pairs is None:
        raise SpecError("a group of a RoPE pair kind (rotation, rotary) needs its pairs")
    p = torch.as_tensor(list(pairs), dtype=torch.long)
    idx = torch.arange(n)
    if p.shape != (n,) or bool(((p < 0) | (p >= n)).any()) or not torch.equal(p[p], idx) \
            or bool((p == idx).any()):
        raise SpecError(f"pairs {list(pairs)[:8]}... are not a pairing of 0..{n - 1}")
    return p


def pair_firsts(partner: torch.Tensor) -> torch.Tensor:
    """The smaller position of each pair, in order (one entry per pair)."""
    return torch.nonzero(partner > torch.arange(len(partner))).reshape(-1)


@dataclass
class Group:
    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    kind: str = "permutation"
    # for the kinds of PAIR_KINDS: each position's partner in its frequency pair
    pairs: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    is_parameter: bool
    floating: bool


def _is_axis_entry(name: str) -> bool:
    return name.endswith("]") and "[" in name


def axis_index(length: int, members: list[tuple[Member, torch.Tensor]]) -> torch.Tensor:
    """Index vector of one axis of ``length`` after all its members act.

    Each member permutes its grid dimension; grids of one axis act on disjoint
    positions or different grid dimensions, so the order does not matter.
    """
    idx = torch.arange(length)
    for m, p in members:
        pos = m.positions()
        cur = idx[pos.reshape(-1)].reshape(m.shape)
        idx[pos.reshape(-1)] = cur.index_select(m.dim, p).reshape(-1)
    return idx


def format_coverage(fraction: float) -> str:
    """A coverage fraction with 4 decimals, rounded down: ``1.0000`` only when nothing is left
    fixed, so a model with one fixed axis in ten thousand shows ``0.9999``, not ``1.0000``."""
    return f"{math.floor(float(fraction) * 1e4 + 1e-9) / 1e4:.4f}"


Perms = dict[str, torch.Tensor]
"""Permutations by group name: ``{group: LongTensor (n,)}``."""


class SpecError(ValueError):
    """A spec does not fit the tensors or permutations it is used with."""


class PermutationSpec:
    """Groups of parameter/buffer axes that must share one permutation.

    ``groups`` maps a stable readable name to a :class:`Group`. ``tensors``
    records every state_dict entry the spec was inferred from (shape, whether
    it is a parameter, whether it is floating point), so coverage and
    validation need no model. ``blocked`` lists why axes were left fixed:
    ``(node or module, reason)`` pairs from inference, and one
    ``("name[axis]", reason)`` pair for every hidden axis no group permutes.
    ``axes`` gives, per tensor, each axis's kind: ``"permuted"``,
    ``"structural"`` (tied to the model's inputs or outputs, or positions
    with a meaning, such as a kernel's spatial axes or an embedding's
    vocabulary rows: no symmetry to find), ``"fixed"`` (a hidden axis left
    unpermuted) or ``"trivial"`` (length 1); None for a spec made by hand.
    ``outputs``: the outputs that define what the model computes (keys of a
    dict / ``ModelOutput``, or indices), when inference was told to keep only
    those fixed; None means every output. Checks compare only these.
    ``capture``: the front end that captured the model (``"fx"`` or
    ``"export"``), None for a spec made by hand. A spec is plain data: the
    traced graph it came from is a :class:`autobasin.infer.TracedModel`,
    which :func:`autobasin.infer.trace_model` returns with its spec.
    """

    def __init__(self, groups: Iterable[Group], tensors: dict[str, TensorInfo],
                 blocked: Iterable[tuple[str, str]] = (), axes: dict[str, list[str]] | None = None,
                 outputs: list | None = None, capture: str | None = None):
        self.groups: dict[str, Group] = {g.name: g for g in groups}
        self.tensors = dict(tensors)
        self.blocked = list(blocked)
        self.axes = dict(axes) if axes is not None else None
        self.outputs = list(outputs) if outputs is not None else None
        self.capture = capture

    # ----------------------------------------------------------------- queries
    @property
    def is_general(self) -> bool:
        """Whether some group carries more than permutations (see :data:`KINDS`)."""
        return any(g.kind != "permutation" for g in self.groups.values())

    def members_by_param(self) -> dict[str, list[tuple[str, Member]]]:
        out: dict[str, list[tuple[str, Member]]] = {}
        for g in self.groups.values():
            for m in g.members:
                out.setdefault(m.param, []).append((g.name, m))
        return out

    def axis_kinds(self, name: str) -> list[str]:
        """Each axis of tensor ``name`` as in :attr:`axes`; for a spec made by
        hand, an axis is permuted when a group acts on it, else fixed."""
        if self.axes is not None and name in self.axes:
            return list(self.axes[name])
        shape = self.tensors[name].shape
        moved = {m.axis for g in self.groups.values() for m in g.members if m.param == name}
        return ["trivial" if n <= 1 else "permuted" if a in moved else "fixed"
                for a, n in enumerate(shape)]

    def coverage(self, not_hidden: Callable[[str], bool] | None = None) -> float:
        """Share of hidden parameter axes that some group permutes.

        For each floating-point parameter with hidden axes (those neither
        structural nor trivial, see :attr:`axes`), the fraction of its hidden
        axes that a group acts on, weighted by the parameter's elements. A
        model with no hidden axis has coverage 1.0: there is nothing to
        permute. Every hidden axis left fixed has its reason in
        :attr:`blocked`. ``not_hidden(reason)``: whole axes fixed for a reason
        it accepts count as structural too (a what-if: how much of the
        symmetry left by those reasons was found). See :meth:`element_coverage`
        for the share of elements instead."""
        why = {e: r for e, r in self.fixed_axes()} if not_hidden is not None else {}
        num = den = 0.0
        for name, info in self.tensors.items():
            if not (info.is_parameter and info.floating):
                continue
            hidden = [k for a, k in enumerate(self.axis_kinds(name))
                      if k == "permuted" or (k == "fixed" and not (
                          not_hidden is not None and not_hidden(why.get(f"{name}[{a}]", ""))))]
            if not hidden:
                continue
            numel = math.prod(info.shape)
            den += numel
            num += numel * hidden.count("permuted") / len(hidden)
        return num / den if den else 1.0

    def fixed_axes(self) -> list[tuple[str, str]]:
        """``("name[axis]", reason)`` for every hidden axis no group permutes."""
        return [(n, r) for n, r in self.blocked if _is_axis_entry(n)]

    def fixed_reasons(self, top: int | None = None) -> list[tuple[str, float]]:
        """Why hidden parameter axes are fixed, most weighty first: each reason
        of :meth:`fixed_axes` with the share of all floating parameter elements
        in the tensors it fixes (a tensor counted once per reason)."""
        total = sum(math.prod(i.shape) for i in self.tensors.values()
                    if i.is_parameter and i.floating)
        weights: dict[str, int] = {}
        seen: set[tuple[str, str]] = set()
        for entry, reason in self.fixed_axes():
            name = entry.partition("[")[0]
            info = self.tensors.get(name)
            if info is None or not (info.is_parameter and info.floating) or (name, reason) in seen:
                continue
            seen.add((name, reason))
            weights[reason] = weights.get(reason, 0) + math.prod(info.shape)
        ranked = sorted(weights.items(), key=lambda kv: -kv[1])[:top]
        return [(r, n / total) for r, n in ranked] if total else []

    def blocked_ops(self) -> list[tuple[str, str]]:
        """``(node or module, reason)`` for every op inference could not see through."""
        return [(n, r) for n, r in self.blocked if not _is_axis_entry(n)]

    def element_coverage(self) -> float:
        """Fraction of floating-point parameter elements that some group
        permutes along at least one axis (what coverage meant before it
        counted hidden axes)."""
        total = permuted = 0
        by_param = self.members_by_param()
        for name, info in self.tensors.items():
            if not (info.is_parameter and info.floating):
                continue
            numel = 1
            for s in info.shape:
                numel *= s
            total += numel
            if name not in by_param or numel == 0:
                continue
            mask = torch.zeros(info.shape, dtype=torch.bool)
            for _, m in by_param[name]:
                hit = torch.zeros(info.shape[m.axis], dtype=torch.bool)
                hit[m.positions().reshape(-1)] = True
                view = [1] * len(info.shape)
                view[m.axis] = -1
                mask |= hit.view(view)
            permuted += int(mask.sum())
        return permuted / total if total else 0.0

    def check_fits(self, state_dict, label: str = "state_dict") -> None:
        """Raise :class:`SpecError` unless every member fits ``state_dict``.

        ``state_dict`` maps names to tensors (anything with ``.shape`` and
        ``.dim()``: parameters, meta tensors). For each member it checks that
        the tensor is there, that the member's axis exists, that its grid is
        well formed and permutes as many units as its group has, that the
        grid's positions lie inside the axis, and that the axis has the length
        the spec recorded for that tensor (when it recorded one): a spec made
        for a wider or narrower model is refused. The error names the group
        and the tensor, prefixed by ``label`` (``"state_dict b"``, ``"model a"``).
        Only the names and shapes are read; no values.
        """
        for gname, g in self.groups.items():
            for m in g.members:
                t = state_dict.get(m.param) if hasattr(state_dict, "get") else None
                if t is None or not hasattr(t, "shape"):
                    raise SpecError(f"{label} has no entry {m.param!r} that group {gname!r} "
                                    f"permutes")
                shape = tuple(t.shape)
                if not 0 <= m.axis < len(shape):
                    raise SpecError(f"{label}'s {m.param!r} has {len(shape)} axes; group "
                                    f"{gname!r} permutes axis {m.axis}")
                if not (len(m.shape) == len(m.strides) and 0 <= m.dim < len(m.shape)):
                    raise SpecError(f"member {m.describe()} of group {gname!r} is malformed: "
                                    f"grid {m.shape}, strides {m.strides}, dim {m.dim}")
                if m.size != g.size:
                    raise SpecError(f"member {m.describe()} of group {gname!r} has size "
                                    f"{m.size}, the group {g.size}")
                if g.size == 0 or 0 in m.shape:
                    continue
                pos = m.positions()
                low, need = int(pos.min()), int(pos.max()) + 1
                if low < 0 or shape[m.axis] < need:
                    raise SpecError(f"{label}'s {m.param!r} axis {m.axis} has length "
                                    f"{shape[m.axis]}, group {gname!r} needs positions "
                                    f"{low}..{need - 1}")
                info = self.tensors.get(m.param)
                if info is not None and len(info.shape) == len(shape) \
                        and info.shape[m.axis] != shape[m.axis]:
                    raise SpecError(f"{label}'s {m.param!r} has shape {shape}, but the spec was "
                                    f"made for shape {tuple(info.shape)} (group {gname!r} "
                                    f"permutes axis {m.axis}): a spec of another model")

    def without(self, *names: str) -> "PermutationSpec":
        """A copy with the named groups fixed (never permuted)."""
        unknown = [n for n in names if n not in self.groups]
        if unknown:
            raise SpecError(f"no group named {unknown[0]!r}; groups are {list(self.groups)[:8]}...")
        kept = [g for n, g in self.groups.items() if n not in names]
        axes = None
        if self.axes is not None:
            still = {(m.param, m.axis) for g in kept for m in g.members}
            axes = {t: ["fixed" if k == "permuted" and (t, a) not in still else k
                        for a, k in enumerate(kinds)] for t, kinds in self.axes.items()}
        freed = [(f"{m.param}[{m.axis}]", f"fixed by user (group {g.name})")
                 for g in self.groups.values() if g.name in names for m in g.members
                 if axes is not None and axes[m.param][m.axis] == "fixed"]
        spec = PermutationSpec(kept, self.tensors,
                               self.blocked + [(n, "fixed by user") for n in names] + freed, axes,
                               self.outputs, self.capture)
        return spec

    # ---------------------------------------------------------------- display
    def __repr__(self) -> str:
        return (f"PermutationSpec({len(self.groups)} groups, "
                f"coverage {format_coverage(self.coverage())})")

    def __str__(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups, "
                 f"coverage {format_coverage(self.coverage())} of hidden parameter axes"]
        width = max([len(n) for n in self.groups] + [5])
        general = self.is_general
        lines.append(f"{'group':<{width}}  {'size':>6}  " + ("kind         " if general else "")
                     + "members")
        for g in self.groups.values():
            shown = ", ".join(m.describe() for m in g.members[:4])
            more = f", ... (+{len(g.members) - 4})" if len(g.members) > 4 else ""
            kind = f"{g.kind:<11}  " if general else ""
            lines.append(f"{g.name:<{width}}  {g.size:>6}  {kind}{shown}{more}")
        ops, axes = self.blocked_ops(), self.fixed_axes()
        if ops:
            lines.append(f"{len(ops)} blocked ops, first: "
                         + "; ".join(f"{n}: {r}" for n, r in ops[:3]))
        if axes:
            lines.append(f"{len(axes)} hidden axes fixed, first: "
                         + "; ".join(f"{n}: {r}" for n, r in axes[:3]))
        return "\n".join(lines)

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "format": "autobasin.PermutationSpec/1",
            "groups": [{"name": g.name, "size": g.size,
                        **({"kind": g.kind} if g.kind != "permutation" else {}),
                        **({"pairs": list(g.pairs)} if g.pairs is not None else {}),
                        "members": [{"param": m.param, "axis": m.axis, "offset": m.offset,
                                     "shape": list(m.shape), "strides": list(m.strides),
                                     "dim": m.dim, **({"contra": True} if m.contra else {})}
                                    for m in g.members]}
                       for g in self.groups.values()],
            "tensors": {k: {"shape": list(v.shape), "is_parameter": v.is_parameter,
                            "floating": v.floating} for k, v in self.tensors.items()},
            "blocked": [list(b) for b in self.blocked],
            **({"axes": self.axes} if self.axes is not None else {}),
            **({"outputs": self.outputs} if self.outputs is not None else {}),
            **({"capture": self.capture} if self.capture is not None else {}),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "PermutationSpec":
        if d.get("format") != "autobasin.PermutationSpec/1":
            raise SpecError(f"not an autobasin spec (format={d.get('format')!r})")
        for g in d["groups"]:
            if g.get("kind", "permutation") not in GROUP_KINDS:
                raise SpecError(f"group {g['name']!r} has kind {g['kind']!r}; kinds are "
                                f"{GROUP_KINDS}")
            if (g.get("kind") in PAIR_KINDS) != ("pairs" in g):
                raise SpecError(f"group {g['name']!r}: kinds {PAIR_KINDS} and only they come "
                                "with pairs")
        groups = [Group(g["name"], int(g["size"]),
                        [Member(m["param"], int(m["axis"]), int(m["offset"]), tuple(m["shape"]),
                                tuple(m["strides"]), int(m["dim"]), bool(m.get("contra", False)))
                         for m in g["members"]], g.get("kind", "permutation"),
                        tuple(int(i) for i in g["pairs"]) if "pairs" in g else None)
                  for g in d["groups"]]
        tensors = {k: TensorInfo(tuple(v["shape"]), bool(v["is_parameter"]), bool(v["floating"]))
                   for k, v in d["tensors"].items()}
        return cls(groups, tensors, [tuple(b) for b in d.get("blocked", [])], d.get("axes"),
                   d.get("outputs"), d.get("capture"))

    @classmethod
    def from_json(cls, text: str) -> "PermutationSpec":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, PermutationSpec) and self.to_dict() == other.to_dict()
