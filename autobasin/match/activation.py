"""Activation matching: align B to A by correlating hidden activations on data.

Git Re-Basin (Ainsworth et al., ICLR 2023), Section 3.1, generalised from an
MLP to any model whose spec was inferred from its torch.fx graph. For every
graph value the inference knows each axis' symbol, and
:meth:`autobasin.infer.symbols.Symbols.leaves` says which group permutes which
positions of that axis, as the same strided grid a :class:`~autobasin.spec.Member`
uses on a parameter. An *activation entry* is such a grid on one axis of one
graph value. A and B are run on the same batches (a ``torch.fx.Interpreter``
over the traced graph, with each model's own modules), the entry's positions
are gathered from both, every other axis (batch, tokens, spatial) is folded
into samples, and streaming float64 moments give a similarity matrix per entry
(Pearson correlation, or the mean inner product). The permutation of a group
solves one linear assignment over the sum of its entries' similarities.

Which activations
-----------------
Per group, among the graph values that carry it, the most preferred kind:

1. values that are an input of a parametrised op (a module with parameters, or
   a function given a parameter, e.g. ``F.layer_norm(x, self.weight, ...)``):
   what the next Linear/Conv/norm sees, i.e. post-nonlinearity activations and
   the residual stream (the paper's choice for an MLP);
2. else values that are the output of a parametrised op (a fused qkv
   projection, for the query/key head dimension that only feeds attention);
3. else any other value of the graph.

Graph inputs and parameters themselves are never used. A value is skipped when
one of its axes carries a symbol that inference did not turn into a group and
did not block (e.g. the per-q/k/v copies of a head axis after a reshape): how B
permutes such an axis is unknown, so its samples could not be paired.

Structure
---------
Axes other than the entry's that a group permutes are averaged over before
folding (an average over permuted positions is the same in A and B). Grids
whose several dimensions are groups (heads x head-dim) keep the whole grid and
are solved jointly: each group starts from a similarity that does not depend
on the others (the best match over the other grid dimensions), then
coordinate descent on the exact objective ``sum_i C[i, pi(i)]``. Grids that
partly overlap other grids on one axis (nested structure) fall back to
averaging the other grid dimensions. Groups no usable activation carries (or
whose similarities are all zero, e.g. every unit dead) are matched by
:func:`~autobasin.match.weight.weight_matching` with the activation-derived
permutations held fixed; ``stats['fallback_groups']`` names them.

Memory: one (P, P) float64 cross-moment matrix per entry (P = the grid's
positions, at most the axis width) and, per batch, A's gathered activations.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_sum, all_sum_floats, broadcast, require_every_rank, world
from ..guard import check_model_finite, check_model_materialized, eval_mode, unwrap_model
from ..permute import apply_permutation
from ..inputs import ModelInputs, as_inputs
from ..batches import batch_inputs, model_device, to_device
from ..spec import PermutationSpec, Perms, SpecError
from ..trace import graph_over
from .descent import coordinate_descent
from .lap import solve_lap
from .result import ActivationMatching, fill_stats
from .weight import weight_matching


SIMILARITIES = ("correlation", "inner")



# ------------------------------------------------------------------ moments
class CrossMoments:
    """Streaming moments of two sets of units observed on the same samples.

    ``update(xa, xb)`` takes ``xa`` of shape (p, m) and ``xb`` of shape (q, m):
    ``m`` samples of ``p`` units of A and ``q`` units of B. Sums, sums of
    squares and the cross products ``xa @ xb.T`` are accumulated in float64
    around a shift (the first update's means), so that variances do not
    suffer from cancellation. Nothing but these (p + q + p*q) numbers is kept.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self.shift_a = self.shift_b = None
        self.sum_a = self.sum_b = self.sq_a = self.sq_b = self.cross = None

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if xa.dim() != 2 or xb.dim() != 2 or xa.shape[1] != xb.shape[1]:
            raise ValueError(f"need (p, m) and (q, m) matrices, got {tuple(xa.shape)} and {tuple(xb.shape)}")
        device = self.device if self.device is not None else xa.device
        xa = xa.detach().to(device, torch.float64)
        xb = xb.detach().to(device, torch.float64)
        m = xa.shape[1]
        if m == 0:
            return
        if self.count == 0:
            self.shift_a, self.shift_b = xa.mean(1), xb.mean(1)
            p, q = xa.shape[0], xb.shape[0]
            z = dict(dtype=torch.float64, device=device)
            self.sum_a, self.sq_a = torch.zeros(p, **z), torch.zeros(p, **z)
            self.sum_b, self.sq_b = torch.zeros(q, **z), torch.zeros(q, **z)
            self.cross = torch.zeros(p, q, **z)
        da = xa - self.shift_a[:, None]
        db = xb - self.shift_b[:, None]
        self.sum_a += da.sum(1)
        self.sum_b += db.sum(1)
        self.sq_a += (da * da).sum(1)
        self.sq_b += (db * db).sum(1)
        self.cross.addmm_(da, db.T)
        self.count += m

    def synchronize(self, p: int, q: int) -> None:
        """Combine the moments of every torch.distributed rank (no-op without a
        process group); afterwards every rank holds the moments of all samples.
        ``p``, ``q``: the unit counts, for a rank that saw no sample. Each rank's
        sums are first moved to a common shift (the count-weighted mean of the
        ranks' shifts), then summed."""
        if world() is None:
            return
        if self.count == 0:
            z = dict(dtype=torch.float64, device=self.device or "cpu")
            self.shift_a, self.shift_b = torch.zeros(p, **z), torch.zeros(q, **z)
            self.sum_a, self.sq_a = torch.zeros(p, **z), torch.zeros(p, **z)
            self.sum_b, self.sq_b = torch.zeros(q, **z), torch.zeros(q, **z)
            self.cross = torch.zeros(p, q, **z)
        n = float(self.count)
        wa, wb, count = all_sum(self.shift_a * n, self.shift_b * n,
                                torch.tensor([n], dtype=torch.float64, device=self.shift_a.device))
        total = float(count.item())
        if total == 0:
            self.count = 0
            return
        da, db = self.shift_a - wa / total, self.shift_b - wb / total  # old shift - common shift
        cross = (self.cross + torch.outer(self.sum_a, db) + torch.outer(da, self.sum_b)
                 + n * torch.outer(da, db))
        sq_a = self.sq_a + 2 * da * self.sum_a + n * da * da
        sq_b = self.sq_b + 2 * db * self.sum_b + n * db * db
        sum_a, sum_b = self.sum_a + n * da, self.sum_b + n * db
        self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross = all_sum(sum_a, sum_b, sq_a, sq_b, cross)
        self.shift_a, self.shift_b = wa / total, wb / total
        self.count = int(round(total))

    # ------------------------------------------------------------ read-out
    def _need(self):
        if self.count == 0:
            raise ValueError("no samples were accumulated")

    @property
    def mean_a(self) -> torch.Tensor:
        self._need()
        return self.shift_a + self.sum_a / self.count

    @property
    def mean_b(self) -> torch.Tensor:
        self._need()
        return self.shift_b + self.sum_b / self.count

    @property
    def var_a(self) -> torch.Tensor:
        """Population variance of each unit of A."""
        self._need()
        mu = self.sum_a / self.count
        return (self.sq_a / self.count - mu * mu).clamp_min(0)

    @property
    def var_b(self) -> torch.Tensor:
        self._need()
        mu = self.sum_b / self.count
        return (self.sq_b / self.count - mu * mu).clamp_min(0)

    def covariance(self) -> torch.Tensor:
        """(p, q) population covariance ``E[a b] - E[a] E[b]``."""
        self._need()
        n = self.count
        return self.cross / n - torch.outer(self.sum_a / n, self.sum_b / n)

    def inner(self) -> torch.Tensor:
        """(p, q) mean inner product ``E[a b]`` (uncentred)."""
        self._need()
        n = self.count
        return (self.cross / n + torch.outer(self.sum_a / n, self.shift_b)
                + torch.outer(self.shift_a, self.sum_b / n) + torch.outer(self.shift_a, self.shift_b))

    def correlation(self, eps: float = 1e-6) -> torch.Tensor:
        """(p, q) Pearson correlation; 0 (never NaN) for a unit without variance.

        A unit counts as constant ("dead") when its standard deviation is at
        most ``eps`` times the larger of its own mean's magnitude and the
        largest standard deviation among its side's units.
        """
        var_a, var_b = self.var_a, self.var_b
        std_a, std_b = var_a.sqrt(), var_b.sqrt()
        live_a = std_a > eps * torch.maximum(self.mean_a.abs(), std_a.max())
        live_b = std_b > eps * torch.maximum(self.mean_b.abs(), std_b.max())
        inv_a = torch.where(live_a, 1.0 / torch.where(live_a, std_a, 1.0), 0.0)
        inv_b = torch.where(live_b, 1.0 / torch.where(live_b, std_b, 1.0), 0.0)
        corr = self.covariance() * inv_a[:, None] * inv_b[None, :]
        return corr.clamp_(-1.0, 1.0)

    def similarity(self, kind: str, eps: float = 1e-6) -> torch.Tensor:
        if kind == "correlation":
            return self.correlation(eps)
        if kind == "inner":
            return self.inner()
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")


# -------------------------------------------------------------- activations
@dataclass
class ActivationEntry:
    """One grid of positions on one axis of one graph value.

    ``positions`` (grid shape) are the axis positions; grid dimensions in
    ``keep`` are matched (``groups[k]`` is the group of ``keep[k]``, None for a
    dimension held fixed), the others are averaged over. Tensor axes in
    ``reduce_axes`` (other axes some group permutes) are averaged over; the
    remaining axes become samples.
    """

    node: str
    axis: int
    positions: torch.Tensor
    keep: tuple[int, ...]
    groups: tuple[str | None, ...]
    reduce_axes: tuple[int, ...]
    level: int
    moments: CrossMoments = field(default_factory=CrossMoments)

    @property
    def kept_shape(self) -> tuple[int, ...]:
        return tuple(self.positions.shape[d] for d in self.keep)

    def describe(self) -> str:
        grid = "x".join(str(s) for s in self.positions.shape)
        return f"{self.node}[{self.axis}] grid {grid} keep {self.keep}"

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """(P, samples) with P = prod(kept_shape), rows in row-major grid order."""
        t = value.detach()
        if self.reduce_axes:
            t = t.mean(dim=self.reduce_axes, keepdim=True)
        t = t.movedim(self.axis, 0)
        pos = self.positions.to(t.device)
        t = t.index_select(0, pos.reshape(-1)).reshape(*pos.shape, -1)
        drop = tuple(d for d in range(pos.dim()) if d not in self.keep)
        if drop:
            t = t.mean(dim=drop)
        return t.reshape(-1, t.shape[-1])


def _positions(offset: int, shape, strides) -> torch.Tensor:
    pos = torch.full(tuple(shape), int(offset), dtype=torch.long)
    for j, (n, s) in enumerate(zip(shape, strides)):
        view = [1] * len(shape)
        view[j] = n
        pos = pos + (torch.arange(n) * s).view(view)
    return pos


def _is_param_target(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        obj = gm.get_parameter(node.target)
    except AttributeError:
        try:
            obj = gm.get_buffer(node.target)
        except AttributeError:
            return False
    return isinstance(obj, torch.Tensor)


def _parametrised(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            return False
        return any(True for _ in module.parameters())
    if node.op in ("call_function", "call_method"):
        return any(_is_param_target(gm, a) for a in node.all_input_nodes)
    return False


def _is_tensor_layout(layout) -> bool:
    return isinstance(layout, list) and all(isinstance(s, int) for s in layout)


def activation_entries(traced, spec: PermutationSpec | None = None,
                       nodes: Iterable[str] | None = None
                       ) -> tuple[list[ActivationEntry], dict[str, int]]:
    """The activation entries of a :class:`~autobasin.infer.TracedModel`'s
    graph for the groups of ``spec`` (default: ``traced.spec``), and each
    group's level.

    Without ``nodes`` the preferred entries per group are chosen (see the
    module docstring); with ``nodes`` (graph node names, as in
    ``traced.gm.graph``) exactly those values are used. Returns the
    entries and ``{group: level used}`` for every group some entry carries.
    """
    spec = traced.spec if spec is None else spec
    inf = traced
    gm, layouts, sym = inf.gm, inf.graph.layouts, inf.sym
    wanted = set(nodes) if nodes is not None else None
    graph_nodes = list(gm.graph.nodes)
    if wanted is not None:
        unknown = wanted - {n.name for n in graph_nodes}
        if unknown:
            raise ValueError(f"no graph node named {sorted(unknown)[0]!r}")

    feeds_param: set[fx.Node] = set()
    from_param: set[fx.Node] = set()
    for n in graph_nodes:
        if _parametrised(gm, n):
            from_param.add(n)
            for a in n.all_input_nodes:
                if a.op != "get_attr":
                    feeds_param.add(a)

    candidates: list[ActivationEntry] = []
    for n in graph_nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if wanted is not None and n.name not in wanted:
            continue
        lay = layouts.get(n)
        if not lay or not _is_tensor_layout(lay):
            continue
        meta = inf.graph.meta.get(n)
        if meta is None or not getattr(meta, "dtype", torch.float32).is_floating_point:
            continue
        level = 1 if n in feeds_param else 2 if n in from_param else 3
        entries = _node_entries(n.name, lay, sym, inf.root_to_group, spec, level)
        if entries is not None:
            candidates.extend(entries)

    best: dict[str, int] = {}
    for e in candidates:
        for g in e.groups:
            if g is not None:
                best[g] = min(best.get(g, 99), e.level)
    if wanted is not None:
        return candidates, best
    chosen = [e for e in candidates if any(g is not None and best[g] == e.level for g in e.groups)]
    return chosen, best


def _node_entries(name: str, layout: list[int], sym, root_to_group: Mapping[int, str],
                  spec: PermutationSpec, level: int) -> list[ActivationEntry] | None:
    """Entries of one graph value, or None if an axis' permutation is unknown."""
    per_axis: list[list[tuple[str | None, int, tuple, tuple, int]]] = []
    for s in layout:
        leaves = []
        for root, offset, shape, strides, dim, _ in sym.leaves(s):
            if root in sym.blocked:
                g = None
            elif root in root_to_group:
                g = root_to_group[root]
                g = g if g in spec.groups else None  # fixed by the user: identity
            else:
                return None  # permuted somehow, but by no group we know
            leaves.append((g, int(offset), tuple(shape), tuple(strides), int(dim)))
        per_axis.append(leaves)
    group_axes = [ax for ax, leaves in enumerate(per_axis) if any(g is not None for g, *_ in leaves)]
    out: list[ActivationEntry] = []
    for ax in group_axes:
        reduce_axes = tuple(a for a in group_axes if a != ax)
        blocks: dict[tuple, dict[int, str | None]] = {}
        for g, offset, shape, strides, dim in per_axis[ax]:
            key = (offset, shape, strides)
            dims = blocks.setdefault(key, {})
            if dims.get(dim) is None:
                dims[dim] = g
        keys = [k for k, dims in blocks.items() if any(g is not None for g in dims.values())]
        pos = {k: _positions(*k) for k in keys}
        # positions of every block of this axis, fixed ones included, to find overlaps
        all_pos = {k: _positions(*k) for k in blocks}
        for k in keys:
            mine = set(pos[k].reshape(-1).tolist())
            overlap = any(k2 != k and mine & set(all_pos[k2].reshape(-1).tolist()) for k2 in blocks)
            shape = k[1]
            if not overlap:
                keep = tuple(range(len(shape)))
                groups = tuple(blocks[k].get(d) for d in keep)
                out.append(ActivationEntry(name, ax, pos[k], keep, groups, reduce_axes, level))
            else:
                for d, g in blocks[k].items():
                    if g is not None:
                        out.append(ActivationEntry(name, ax, pos[k], (d,), (g,), reduce_axes, level))
    return out


# ------------------------------------------------------------------ running
class _Tap(fx.Interpreter):
    """Runs the graph and hands the values of chosen nodes to a callback."""

    def __init__(self, gm: fx.GraphModule, names: set[str], callback: Callable[[str, Any], None]):
        super().__init__(gm, garbage_collect_values=True)
        self.names = names
        self.callback = callback

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.callback(n.name, value)
        return value


def _batches(data):
    if isinstance(data, torch.Tensor):
        return [data]
    return data


def _missing(traced, spec: PermutationSpec) -> list[str]:
    """The groups of ``spec`` that ``traced``'s graph does not carry at their size."""
    return [g for g, grp in spec.groups.items()
            if g not in traced.spec.groups or traced.spec.groups[g].size != grp.size]


def _fits(traced, inputs) -> tuple | None:
    """``inputs`` as ``traced``'s placeholders, or None when they do not fit it: another
    structure, or other shapes for a graph torch.export captured at its example's
    shapes (fx graphs take any shape)."""
    flat = traced.flat(inputs)
    if flat is None or traced.capture == "fx":
        return flat
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in flat]
    captured = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in traced.flat_inputs]
    return flat if shapes == captured else None


def _traced_for(spec: PermutationSpec, a: nn.Module, first_args: ModelInputs, traced):
    """The traced graph whose activations ``spec``'s groups permute: ``traced``
    when it carries them and takes the first batch, else ``a`` captured on the
    first batch (two of its samples for fx; the whole batch for torch.export,
    whose graph keeps the shapes it was captured at)."""
    if traced is not None and not _missing(traced, spec) and \
            _fits(traced, as_inputs(first_args, a)) is not None:
        return traced
    from ..infer import trace_model
    capture = spec.capture or (traced.capture if traced is not None else "auto")
    inputs = first_args if capture == "export" else \
        first_args.map_tensors(lambda t: t[:2] if t.dim() else t)
    inputs = as_inputs(inputs, a)
    if traced is not None:  # given as the graph was captured (input_ids by name, use_cache)
        args, kwargs = traced.as_captured(inputs)
        if args or kwargs:
            inputs = ModelInputs(args, kwargs)
    fresh = trace_model(a, inputs, capture=capture, outputs=spec.outputs)
    missing = _missing(fresh, spec)
    if missing:
        raise SpecError(f"activation matching needs the traced graph of the spec; capturing "
                        f"model a does not give group {missing[0]!r} of the spec given (edited, "
                        f"or of another model?); pass a spec from autobasin.infer.infer_spec")
    return fresh


# ------------------------------------------------------------------ solving
def _grid(c: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return c.reshape(*shape, *shape)


def _dim_similarity(cg: torch.Tensor, j: int, perms_b: list[torch.Tensor | None]) -> torch.Tensor:
    """S[a, b] = sum_i C[(a, i), (b, pi(i))] over the other grid dims at their perms."""
    k = len(perms_b)
    t = cg
    for d, p in enumerate(perms_b):
        if d != j and p is not None:
            t = t.index_select(k + d, p)
    order = [j] + [d for d in range(k) if d != j]
    t = t.permute(*order, *[k + d for d in order])
    n = t.shape[0]
    r = math.prod(t.shape[1:k])
    t = t.reshape(n, r, n, r)
    return torch.einsum("arbr->ab", t)


def _invariant_similarity(cg: torch.Tensor, j: int, groups: tuple[str | None, ...]) -> torch.Tensor:
    """A similarity for grid dim ``j`` that no other group's permutation changes.

    Fixed dims (no group) are paired position by position; for the other
    groups' dims every A position takes its best B partner.
    """
    k = len(groups)
    fixed = [d for d in range(k) if d != j and groups[d] is None]
    free = [d for d in range(k) if d != j and groups[d] is not None]
    order = [j] + fixed + free
    t = cg.permute(*order, *[k + d for d in order])
    sh = cg.shape[:k]
    n = sh[j]
    f = 1
    for d in fixed:
        f *= sh[d]
    o = 1
    for d in free:
        o *= sh[d]
    t = t.reshape(n, f, o, n, f, o)
    t = torch.diagonal(t, dim1=1, dim2=4)         # (n, o, n, o, f)
    return t.amax(dim=3).sum(dim=(1, 3))            # (n, n)


def _solve(entries: list[ActivationEntry], sims: list[torch.Tensor], spec: PermutationSpec,
           max_iter: int, seed: int) -> tuple[Perms, dict[str, float], int]:
    """Permutations maximising ``sum_entries sum_i C[i, pi(i)]``; also each group's
    mean matched similarity per entry and the number of coordinate-descent sweeps."""
    static: dict[str, torch.Tensor] = {}
    dynamic: dict[str, list[tuple[torch.Tensor, int, tuple]]] = {}
    n_entries: dict[str, int] = {}

    def add_static(g, s):
        static[g] = s.clone() if g not in static else static[g].add_(s)

    for e, c in zip(entries, sims):
        shape = e.kept_shape
        present = [d for d, g in enumerate(e.groups) if g is not None]
        for d in present:
            n_entries[e.groups[d]] = n_entries.get(e.groups[d], 0) + 1
        if len(shape) == 1:
            add_static(e.groups[0], c)
            continue
        cg = _grid(c, shape)
        if len(present) == 1:
            j = present[0]
            add_static(e.groups[j], _dim_similarity(cg, j, [None] * len(shape)))
            continue
        for j in present:
            dynamic.setdefault(e.groups[j], []).append((cg, j, e.groups))

    groups = [g for g in spec.groups if g in static or g in dynamic]
    perms: Perms = {}
    for g in groups:
        s = static.get(g)
        for cg, j, gr in dynamic.get(g, []):
            inv = _invariant_similarity(cg, j, gr)
            s = inv if s is None else s + inv
        perms[g] = solve_lap(s, name=g)

    def similarity(g):
        s = static.get(g)
        for cg, j, gr in dynamic.get(g, []):
            pb = [perms[x] if x is not None else None for x in gr]
            d = _dim_similarity(cg, j, pb)
            s = d if s is None else s + d
        return s

    dyn = [g for g in groups if g in dynamic]
    sweeps = coordinate_descent(dyn, similarity, perms, max_iter=max_iter, seed=seed).sweeps if dyn else 0
    matched = {}
    for g in groups:
        s = similarity(g)
        rows = torch.arange(s.shape[0])
        matched[g] = float(s[rows, perms[g]].mean()) / max(n_entries.get(g, 1), 1)
    return perms, matched, sweeps


# --------------------------------------------------------------------- main
def activation_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, data: Iterable,
                        num_batches: int | None = None, similarity: str = "correlation",
                        progress: bool = True, stats: dict | None = None,
                        device: torch.device | str | None = None, *,
                        nodes: Iterable[str] | None = None, input_fn: Callable | None = None,
                        max_iter: int = 100, seed: int = 0, eps: float = 1e-6,
                        traced=None) -> ActivationMatching:
    """Permutations of B's groups that best correlate B's activations with A's.

    Args:
        spec: the groups to permute, as returned by
            :func:`autobasin.infer.infer_spec`. Which activations each group
            permutes is read from ``traced`` (the
            :class:`~autobasin.infer.TracedModel` of :func:`autobasin.infer.trace_model`)
            or, without it, from ``a`` captured on the first batch, whose
            groups must include the spec's.
        a, b: the two models (same architecture); neither is modified, and
            their train/eval modes are restored (they run in eval mode).
            Wrappers (``nn.DataParallel``, DDP, ``torch.compile``) are looked
            through. The spec must fit both (:meth:`PermutationSpec.check_fits`):
            a spec of another model is a :class:`SpecError` naming the tensor.
        data: an iterable of batches; each batch is the model input or
            ``(input, target, ...)`` / a dict (see :func:`autobasin.batches.batch_input`),
            or whatever ``input_fn(batch)`` turns into the positional inputs.
        num_batches: use at most this many batches (default: all of ``data``).
        similarity: ``"correlation"`` (Pearson; a unit without variance has
            correlation 0) or ``"inner"`` (mean product, uncentred).
        progress: show a tqdm bar over batches.
        stats: kept for compatibility: a dict given here receives the result's
            fields (:meth:`~autobasin.match.result.Matching.as_dict`).
        device: where the statistics are accumulated (default: A's device); the
            models run where they are, inputs are moved to each model's device.
        nodes: graph node names to take activations from instead of the
            automatic choice.
        input_fn: ``batch -> input tensor or tuple of positional inputs``.
        max_iter: most coordinate-descent sweeps (grids, fallback).
        seed: seeds the sweep order (and the fallback's).
        eps: relative threshold below which a unit's standard deviation counts as 0.

    Returns:
        an :class:`~autobasin.match.result.ActivationMatching`: the mapping
        ``{group name: CPU LongTensor (n,)}`` (apply it to B with
        :func:`autobasin.permute.apply_permutation`) with the groups, graph
        values, similarities and fallbacks as attributes.
    """
    start = time.perf_counter()
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    a, b = unwrap_model(a), unwrap_model(b)
    for label, model in (("a", a), ("b", b)):
        check_model_materialized(model, "activation matching", f"model {label}")
        check_model_finite(model, label)
        spec.check_fits(model.state_dict(), f"model {label}")  # a spec of another model
    dev_a, dev_b = model_device(a), model_device(b)
    stat_device = torch.device(device) if device is not None else dev_a

    entries: list[ActivationEntry] | None = None
    by_node: dict[str, list[ActivationEntry]] = {}
    gm_a = gm_b = None
    batches = samples = empty = skipped = 0
    with eval_mode(a, b):
        total = num_batches
        if total is None and hasattr(data, "__len__") and not isinstance(data, torch.Tensor):
            total = len(data)
        bar = tqdm(total=total, desc="activation matching", unit="batch", disable=not progress)
        with torch.no_grad():
            for i, batch in enumerate(_batches(data)):
                if num_batches is not None and i >= num_batches:
                    break
                args = batch_inputs(batch, input_fn, model=a)
                first = next(iter(args.tensors()), None)
                if first is not None and first.dim() and first.shape[0] == 0:
                    empty += 1  # an empty batch has no samples to correlate
                    bar.update(1)
                    continue
                if entries is None:
                    try:
                        traced = _traced_for(spec, a, args, traced)
                    except SpecError:
                        raise
                    except Exception as e:  # noqa: BLE001 - say which batch
                        raise _batch_error("a", i, args, traced, e) from e
                    entries, levels = activation_entries(traced, spec, nodes)
                    for e in entries:
                        e.moments = CrossMoments(stat_device)
                        by_node.setdefault(e.node, []).append(e)
                    gm_a = graph_over(a, traced.gm)
                    gm_b = graph_over(b, traced.gm)
                names = set(by_node)
                got_a: dict[int, torch.Tensor] = {}

                def tap_a(name, value):
                    if isinstance(value, torch.Tensor):
                        for e in by_node[name]:
                            got_a[id(e)] = e.gather(value)

                def tap_b(name, value):
                    for e in by_node[name]:
                        xa = got_a.pop(id(e), None)
                        if xa is not None and isinstance(value, torch.Tensor):
                            e.moments.update(xa, e.gather(value))

                flat = _fits(traced, as_inputs(args, a))
                if flat is None and traced.flat(as_inputs(args, a)) is not None:
                    # another shape than the graph torch.export captured (a last,
                    # smaller batch): its samples are left out
                    skipped += 1
                    bar.update(1)
                    continue
                for label, gm, dev, tap in (("a", gm_a, dev_a, tap_a), ("b", gm_b, dev_b, tap_b)):
                    try:
                        if flat is None:
                            raise ValueError("the inputs do not fit the captured graph")
                        _Tap(gm, names, tap).run(*[to_device(t, dev) for t in flat])
                    except Exception as e:  # noqa: BLE001 - say which batch, and what was expected
                        raise _batch_error(label, i, args, traced, e) from e
                batches += 1
                samples += int(first.shape[0]) if first is not None and first.dim() else 1
                bar.update(1)
        bar.close()
    if world() is not None:
        # every rank's shard: combine the moments, then solve on identical statistics
        require_every_rank(entries is not None, "activation matching got no non-empty batch on this "
                                                "rank: give every rank at least one batch")
        for e in entries:
            size = math.prod(e.kept_shape)
            e.moments.synchronize(size, size)
        batches, samples, skipped = (int(v) for v in all_sum_floats(batches, samples, skipped))
    if skipped:
        warnings.warn(f"activation matching left out {skipped} batch(es) whose input shapes differ "
                      f"from those the graph was captured at ({traced.example_inputs.describe()}); "
                      f"torch.export graphs keep their shapes: give batches of one shape",
                      stacklevel=2)
    if entries is None:
        if empty:
            raise ValueError(f"activation matching got no samples from data: all {empty} "
                             f"batches were empty")
        raise ValueError("activation matching got no batches from data")

    used = [e for e in entries if e.moments.count > 0]
    sims = [e.moments.similarity(similarity, eps).cpu() for e in used]
    perms, matched, sweeps = _solve(used, sims, spec, max_iter, seed)

    # groups without a usable activation (or with only zero similarity): weight matching
    fallback = [g for g, grp in spec.groups.items()
                if grp.size > 1 and (g not in perms or _all_zero(used, sims, g))]
    wm = None
    for g, grp in spec.groups.items():
        if g not in perms or g in fallback:
            perms[g] = torch.arange(grp.size)
    if fallback:
        sd_a, sd_b = a.state_dict(), b.state_dict()
        b_now = apply_permutation(spec, perms, sd_b)
        sub = spec.without(*[g for g in spec.groups if g not in fallback])
        wm = weight_matching(sub, sd_a, b_now, max_iter=max_iter, seed=seed, progress=False)
        perms.update(wm)

    # solved once: every rank returns rank 0's permutations (identical statistics
    # give identical solutions; the broadcast makes sure of it)
    perms = broadcast(perms)
    group_nodes: dict[str, list[str]] = {}
    for e in used:
        for g in e.groups:
            if g is not None and e.node not in group_nodes.setdefault(g, []):
                group_nodes[g].append(e.node)
    result = ActivationMatching(
        perms={g: perms[g].long().cpu() for g in spec.groups}, method="activation",
        activation_groups=len([g for g in matched if g not in fallback]),
        fallback_groups=fallback, entries=len(used), nodes=sorted({e.node for e in used}),
        group_nodes=group_nodes, levels={g: levels[g] for g in group_nodes},
        matched_similarity=matched, batches=batches, samples=samples, sweeps=sweeps,
        skipped_batches=skipped,
        converged=True, weight_matching=wm, seconds=time.perf_counter() - start)
    fill_stats(stats, result)
    return result


def _batch_error(label: str, index: int, args: ModelInputs, traced, error: Exception) -> ValueError:
    """A ValueError naming the batch, its input shapes and those the spec was traced with."""
    shapes = traced.example_inputs if traced is not None else None
    expected = f"; the spec was traced with inputs of shapes {shapes.describe()}" if shapes else ""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ValueError(f"activation matching: model {label} failed on batch {index} (inputs of "
                      f"shapes {args.describe()}): {type(error).__name__}: {first}{expected}. Is each "
                      f"batch the model input or (input, target, ...)? Else pass input_fn=...")


def _all_zero(entries, sims, g) -> bool:
    return all(float(s.abs().max()) == 0.0 for e, s in zip(entries, sims) if g in e.groups)

