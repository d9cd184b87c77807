"""Infer a model's PermutationSpec from its torch.fx graph."""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..guard import eval_mode, is_meta_model, unwrap_model
from ..spec import (PAIR_KINDS, Group, Member, PermutationSpec, TensorInfo, group_kind,
                    symmetry_kinds)
from ..inputs import ModelInputs, as_inputs, positional, seeded_rng, select_output
from ..trace import (ExampleRecorder, TraceError, caused_by, default_inputs, export_trace, graph_over,
                     op_name_of, symbolic_trace)
from . import rope
from . import rules as _rules  # noqa: F401 - registers the built-in rules
from .engine import GraphInference, TensorTable, is_user_opaque, layout_symbols
from .registry import module_rule, rule
from .symbols import Symbols

__all__ = ["infer_spec", "trace_model", "rule", "TracedModel"]


class ExampleInputError(ValueError):
    """The model cannot run on the example inputs it was given to trace with."""

    def __init__(self, model: nn.Module, inputs: ModelInputs, error: Exception):
        lines = str(error).strip().splitlines()
        node = next((ln.strip() for ln in lines if ln.startswith("While executing")), "")
        where = f" ({node})" if node else ""
        first = lines[0] if lines else type(error).__name__
        super().__init__(f"{type(model).__name__} cannot run on the example inputs of "
                         f"shapes [{inputs.describe()}]{where}: {type(error).__name__}: {first}. Pass "
                         f"example_inputs that forward accepts: a tensor, a tuple of positional "
                         f"inputs or a dict of keyword inputs")


CAPTURES = ("auto", "fx", "export")


def capture_graph(model: nn.Module, inputs: ModelInputs, opaque: Iterable = (),
                  capture: str = "auto", concrete: bool = True
                  ) -> tuple[fx.GraphModule, tuple, dict[str, str], str]:
    """Capture ``model``'s forward as an fx graph.

    ``"fx"``: torch.fx symbolic tracing, with timm's leaves and opaque
    submodules (module-level rules apply). ``"export"``: torch.export,
    non-strict, at ATen level (every submodule is looked through; parameters
    keep their state_dict names). ``"auto"``: fx first, export when fx cannot
    trace the top-level forward or cannot take the inputs positionally.
    Where torch.export fails, ``concrete`` allows the ATen graph of these
    inputs (:func:`autobasin.trace.concrete_aten_trace`: refused when a branch
    depends on the weights).

    Returns the graph, its flat inputs (one per placeholder), the modules fx
    made opaque with why, and which front end captured it.
    """
    if capture not in CAPTURES:
        raise ValueError(f"capture={capture!r}; choose one of {CAPTURES}")
    fx_error: Exception | None = None
    if capture in ("auto", "fx"):
        args = positional(model, inputs)
        if args is None:
            fx_error = TraceError(f"torch.fx takes positional inputs, and the keyword inputs "
                                  f"{sorted(inputs.kwargs)} cannot be passed positionally to "
                                  f"{type(model).__name__}.forward")
        else:
            try:
                gm, opaque_modules = symbolic_trace(model, opaque, n_inputs=len(args))
                return gm, tuple(args), opaque_modules, "fx"
            except TraceError as e:
                fx_error = e
        if capture == "fx":
            raise fx_error
    if opaque:
        raise ValueError("opaque= applies to the fx front end only (capture='fx')")
    try:
        gm, flat = export_trace(model, inputs, concrete=concrete)
    except Exception as e:  # noqa: BLE001 - say what each front end reported
        tried = f"{fx_error}; " if fx_error is not None else ""
        first = (str(e).strip().splitlines() or [""])[0]
        notes = "".join(f"; {n}" for n in getattr(e, "__notes__", []))
        where = caused_by(e)
        raise TraceError(f"cannot capture {type(model).__name__}: {tried}torch.export "
                         f"(non-strict) failed too: {type(e).__name__}: {first}"
                         f"{f' (at {where})' if where else ''}{notes}") from e
    return gm, flat, {}, "export"


class TracedModel:
    """A model as inference captured it: the graph (``gm``, whose submodules
    and tensors are the model's own), the example inputs it ran on, each
    node's axis symbols, and the spec they gave (``spec``). Returned by
    :func:`trace_model`; checks and activation matching take it to name a
    diverging node or to find activation sites without capturing again.
    The spec itself is plain data and holds no reference to it."""

    def __init__(self, model: nn.Module, inputs: ModelInputs, opaque: Iterable = (),
                 capture: str = "auto", outputs: Sequence | None = None,
                 fixed: Iterable[str] = (), concrete: bool = True, symmetries=None,
                 more_inputs: Sequence[ModelInputs] = ()):
        self.example_inputs = inputs
        self.symmetries = symmetry_kinds(symmetries)
        self.outputs = None if outputs is None else list(outputs)
        try:  # forward's parameter names, to match later inputs given another way
            self._names = [n for n, prm in inspect.signature(model.forward).parameters.items()
                           if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD,
                                           prm.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            self._names = []
        self.gm, self.flat_inputs, self.opaque_modules, self.capture = capture_graph(
            model, inputs, opaque, capture, concrete)
        self.sym = Symbols()
        self.table = TensorTable(model, self.sym, opaque)
        self.model_state_names = list(model.state_dict().keys())
        self.graph = self._walk(model, inputs, self.gm, self.flat_inputs)
        # Further input sets (another modality, another mode of forward): each is
        # captured on its own and walked over the same symbols, so every axis
        # carries one permutation that holds on every set; the first set's graph
        # stays the one diagnoses and activation sites use.
        self.more_inputs = list(more_inputs)
        # whether some set's graph is the one its branches take (export_trace's
        # fallback), not one that holds for every input
        self.branches_taken = bool(self.gm.meta.get("branches_taken"))
        for more in self.more_inputs:
            gm, flat, opaque_more, _ = capture_graph(model, more, opaque, self.capture, concrete)
            self.branches_taken |= bool(gm.meta.get("branches_taken"))
            self._walk(model, more, gm, flat, log=self.graph.log,
                       distributions=self.graph.distributions)
            self.opaque_modules.update(opaque_more)
        self._finish()
        self.root_to_group: dict[int, str] = {}
        self.spec: PermutationSpec = self._build_spec(fixed)

    def _walk(self, model: nn.Module, inputs: ModelInputs, gm: fx.GraphModule, flat: tuple,
              **shared) -> GraphInference:
        """Run ``gm`` on ``flat`` once, recording shapes and calls, then walk it over
        this model's symbols and fix the outputs that define the model. ``shared``:
        the first graph's ``log`` and ``distributions``, for a further input set."""
        opaque = self.table.opaque

        def may_inline(n: fx.Node) -> bool:
            """Whether the walk may look inside this call, and so needs its example
            arguments (and whether it hands an input back): not a module its rule covers."""
            if n.op == "call_function":
                return inspect.isfunction(n.target)
            if n.op != "call_module":
                return False
            m = gm.get_submodule(n.target)
            return is_user_opaque(opaque, n.target, m) or module_rule(m, exact_only=True) is None
        capture_nodes = {n for n in gm.graph.nodes if may_inline(n)}
        # RoPE's head dims admit pair rotations, asked for as orthogonal / invertible maps
        ropes = rope.find_patterns(gm.graph, set(self.table.by_id), gm) \
            if self.symmetries & {"orthogonal", "invertible"} else []
        rec = ExampleRecorder(gm, capture_nodes, {
            p.final: ((p.x, p.r, p.c, p.s), rope.check) if p.form == "real" else
            ((p.x, p.c), rope.check_complex) for p in ropes})
        with torch.no_grad(), eval_mode(model):
            try:
                rec.run(*flat)
            except Exception as e:  # noqa: BLE001 - name the model, inputs and node
                raise ExampleInputError(model, inputs, e) from e
        graph = GraphInference(gm, self.sym, self.table, rec.meta, rec.captured,
                               passthrough=rec.passthrough, **shared)
        graph.rope.confirm(ropes, rec.probed)
        for s in layout_symbols(self._selected(graph.run(block_outputs=False), gm)):
            self.sym.block(s, "graph output", structural=True)
        return graph

    def _selected(self, out_layout, gm: fx.GraphModule):
        """The part of the output's layout that defines what the model
        computes: all of it, or the ``outputs`` asked for."""
        if self.outputs is None:
            return out_layout
        if self.capture == "export":  # flat outputs: rebuild forward's structure
            import torch.utils._pytree as pytree
            out_layout = pytree.tree_unflatten(list(out_layout), gm.meta["out_spec"])
        return [select_output(out_layout, key) for key in self.outputs]

    def _finish(self) -> None:
        """Undo a q/k/v distribution whose shared factors were constrained
        elsewhere (see GraphInference.cut): re-share them, or fix the axis."""
        sym = self.sym
        # Each pass only blocks a class or joins two classes, so it reaches a fixed
        # point: run passes until one changes nothing.
        changed = True
        while changed:
            changed = False
            for x, others, copies in self.graph.distributions:
                rx = sym.find(x)
                if sym.class_size(x) > 1 or sym.refined(x) is not None:
                    if rx not in sym.blocked:
                        sym.block(x, "a cut axis is used elsewhere")
                        changed = True
                for j, f in enumerate(others):
                    if not sym.pristine(f):
                        for cp in copies:
                            if sym.find(cp[j]) != sym.find(f):
                                sym.union(cp[j], f)
                                changed = True

    def _build_spec(self, fixed: Iterable[str] = ()) -> PermutationSpec:
        sym = self.sym
        state = self.table.state
        # a RoPE head dim that some op admits no pair rotation on carries nothing
        for r in list(sym.pairs):
            root = sym.find(r)
            if root not in sym.blocked and group_kind(sym.kinds(root), self.symmetries) is None:
                sym.block(root, sym.narrowed.get(root) or "RoPE frequency pairs")
        members: dict[int, list[Member]] = {}
        for name in state:
            syms = self.table.syms.get(name)
            if not syms:
                continue
            for axis, s in enumerate(syms):
                for root, offset, shape, strides, dim, dual in sym.leaves(s):
                    if root in sym.blocked:
                        continue
                    members.setdefault(root, []).append(
                        Member(name, axis, offset, tuple(shape), tuple(strides), dim, dual))
        tensors = {n: TensorInfo(tuple(t.shape), isinstance(t, nn.Parameter), t.is_floating_point())
                   for n, t in state.items()}
        groups, used = [], set()
        for root, ms in members.items():
            name = _group_name(ms[0], state, used)
            used.add(name)
            self.root_to_group[root] = name
            kind = group_kind(sym.kinds(root), self.symmetries)
            if kind == "permutation":  # orientation means nothing to a permutation
                ms = [dataclasses.replace(m, contra=False) for m in ms]
            groups.append(Group(name, sym.size[root], ms, kind,
                                sym.pairs.get(root) if kind in PAIR_KINDS else None))
        blocked = [(n, r) for n, r in self.graph.log]
        blocked += [(m, f"opaque module: {why}") for m, why in self.opaque_modules.items()]
        axes, fixed_axes = self._axis_kinds(state, members)
        spec = PermutationSpec(groups, tensors, blocked + fixed_axes, axes, self.outputs,
                               self.capture)
        if fixed:
            spec = spec.without(*fixed)
        return spec

    def unused_tensors(self) -> list[str]:
        """Floating-point state_dict tensors (more than one entry) that the
        captured forward never reads."""
        return [n for n, t in self.table.state.items()
                if not self.table.syms.get(n) and n not in self.table.unreached
                and t.is_floating_point() and t.numel() > 1]

    def _axis_kinds(self, state, members) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
        """Each state_dict axis as ``"permuted"`` (some group acts on it),
        ``"structural"`` (tied to the model's inputs or outputs, or positions
        with meaning: see :mod:`autobasin.infer.symbols`), ``"fixed"`` (a
        hidden axis left unpermuted) or ``"trivial"`` (length 1); and the
        reason of each fixed axis, as ``("name[axis]", reason)``."""
        sym = self.sym
        on_axis = {(m.param, m.axis) for ms in members.values() for m in ms}
        kinds: dict[str, list[str]] = {}
        reasons: list[tuple[str, str]] = []
        for name, t in state.items():
            syms = self.table.syms.get(name)
            row = []
            for axis, n in enumerate(t.shape):
                if n <= 1:
                    row.append("trivial")
                elif (name, axis) in on_axis:
                    row.append("permuted")
                    # a part of the axis may still be fixed (RoPE's q/k head-dim
                    # inside permuted heads): name the part and why
                    for root, offset, shape, _, dim, _ in sym.leaves(syms[axis]):
                        if root in sym.blocked and root not in sym.structural:
                            grid = "x".join(map(str, shape))
                            reasons.append((f"{name}[{axis}@{offset}:{grid}.d{dim}]",
                                            sym.blocked[root]))
                elif not syms:
                    row.append("fixed")
                    reasons.append((f"{name}[{axis}]", self.table.unreached.get(
                        name, "not used by forward on the example inputs")))
                else:
                    leaves = [leaf[0] for leaf in sym.leaves(syms[axis])]
                    if leaves and all(r in sym.structural for r in leaves):
                        row.append("structural")
                        continue
                    row.append("fixed")
                    why = next((sym.blocked[r] for r in leaves
                                if r in sym.blocked and r not in sym.structural), None)
                    if why is None and not leaves:  # cut down to pieces of length 1
                        cut = sym.refined(syms[axis])
                        why = (cut and cut.why) or \
                            "its entries are used one by one (split or selected singly)"
                    reasons.append((f"{name}[{axis}]", why or "no group"))
            kinds[name] = row
        return kinds, reasons

    # ------------------------------------------------------------- diagnosis
    def value_index(self, s: int, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Where each position of axis ``s`` comes from under ``perms``."""
        from ..spec import axis_index
        n = self.sym.size[s]
        ms = []
        for root, offset, shape, strides, dim, _ in self.sym.leaves(s):
            g = self.root_to_group.get(root)
            if g is not None and g in perms:
                ms.append((Member("", 0, offset, shape, strides, dim), perms[g]))
        return axis_index(n, ms)

    def flat(self, inputs: ModelInputs) -> tuple | None:
        """``inputs`` as the captured graph's placeholders, or None if they do
        not fit it (other keywords than the graph was captured with)."""
        if self.capture == "fx":
            return positional(self.gm, inputs) if inputs.kwargs else tuple(inputs.args)
        import torch.fx._pytree as fx_pytree
        for args, kwargs in ((tuple(inputs.args), dict(inputs.kwargs)), self.as_captured(inputs)):
            try:
                return tuple(fx_pytree.tree_flatten_spec((args, kwargs), self.gm.meta["in_spec"]))
            except Exception:  # noqa: BLE001 - another input structure
                continue
        return None

    def as_captured(self, inputs: ModelInputs) -> tuple[tuple, dict]:
        """``inputs`` arranged as the example inputs were (positional or by name,
        matched through forward's signature: a batch's ``input_ids`` given
        positionally fits a graph captured with ``input_ids=``); the example's
        non-tensor keywords (``use_cache=False``) are kept."""
        given = dict(zip(self._names, inputs.args))
        given.update(inputs.kwargs)
        ex = self.example_inputs
        names = self._names[:len(ex.args)]
        if any(n not in given for n in names):
            return (), {}
        kwargs = {}
        for key, value in ex.kwargs.items():
            if key in given:
                kwargs[key] = given[key]
            elif not isinstance(value, torch.Tensor):
                kwargs[key] = value
            else:
                return (), {}
        return tuple(given[n] for n in names), kwargs

    def first_divergence(self, model: nn.Module, permuted: nn.Module, perms,
                         inputs: ModelInputs, rtol: float = 1e-3) -> "Divergence | None":
        """The first graph node whose value in ``permuted`` is not the permuted
        value of ``model``'s: a float tensor off by a relative L2 above ``rtol``,
        or an integer tensor with other entries. An integer tensor that picks
        entries (``topk``, ``sort``, ``argmax``, ...) and picks, in the
        permuted run, other entries of *equal* value (within float rounding) is
        a tie broken the other way: ``Divergence.tie`` is set, since it shows
        the model's outputs jump at these weights, not that the spec is wrong."""
        args = self.flat(inputs)
        if args is None:
            return None
        gm_a = self.gm
        gm_b = graph_over(permuted, self.gm, copy_graph=False)
        env_a = _record_all(gm_a, args)
        result: list[Divergence | None] = [None]
        layouts = self.graph.layouts
        # values of a cut qkv before the cut carry factors that were replaced
        # by per-piece copies: their permutation is not defined, skip them
        stale = {self.sym.find(s) for x, others, copies in self.graph.distributions
                 for s in [x, *others]
                 if all(self.sym.find(c[j]) != self.sym.find(f)
                        for c in copies for j, f in enumerate(others))}

        def expected(n, ref):
            """``ref`` (node ``n``'s value in the model) as the permuted model
            should compute it, or None where its layout is not known."""
            lay = layouts.get(n)
            if not (isinstance(ref, torch.Tensor) and lay and len(lay) == ref.ndim) \
                    or any(self.sym.find(s) in stale for s in lay):
                return None
            for axis, s in enumerate(lay):
                ref = ref.index_select(axis, self.value_index(s, perms))
            return ref

        class Compare(fx.Interpreter):
            def run_node(inner, n):
                value = super().run_node(n)
                if result[0] is None and n in env_a and n.op not in ("placeholder", "output") \
                        and isinstance(value, torch.Tensor) and not _uninitialized(n):
                    expect = expected(n, env_a[n])
                    if expect is None or expect.shape != value.shape:
                        return value
                    if expect.is_floating_point():
                        err = (expect.double() - value.double()).norm() / \
                            expect.double().norm().clamp_min(1e-30)
                        if err > rtol:
                            result[0] = Divergence(
                                f"{n.name} ({n.op} {_target_name(n)}), relative error {float(err):.3g}")
                    elif not torch.equal(expect, value):
                        moved = int((expect != value).sum())
                        result[0] = Divergence(
                            f"{n.name} ({n.op} {_target_name(n)}), {moved} of {value.numel()} "
                            "integer entries differ", tie=_picks_a_tie(n, expect, value, inner.env))
                return value
        with torch.no_grad(), eval_mode(permuted, gm_b), seeded_rng(gm_b):
            Compare(gm_b, garbage_collect_values=False).run(*args)
        return result[0]


#: allocations whose entries are whatever memory held: no value to compare
_ALLOCATIONS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
                          "empty_permuted"})


#: ops whose result shares its first argument's memory
_VIEWS = frozenset({"select", "slice", "view", "_unsafe_view", "reshape", "as_strided", "unsqueeze",
                    "squeeze", "permute", "transpose", "t", "expand", "alias", "unbind", "split",
                    "split_with_sizes", "chunk", "narrow", "diagonal", "unfold", "getitem",
                    "__getitem__", "detach"})


def _uninitialized(n: fx.Node, depth: int = 16) -> bool:
    """Is ``n`` (when computed) an allocation whose entries are whatever memory
    held, or a view of one, filled only later in place (``x = torch.empty(...)``
    then ``x[i, 0] = h``)? Its value there is no value to compare."""
    for _ in range(depth):
        if n.op not in ("call_function", "call_method"):
            return False
        name = op_name_of(n.target)
        if name in _ALLOCATIONS:
            return True
        if name not in _VIEWS or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        n = n.args[0]
    return False


class Divergence:
    """Where a permuted model first computes something else (see
    :meth:`TracedModel.first_divergence`)."""

    def __init__(self, where: str, tie: bool = False):
        self.where, self.tie = where, tie

    def __str__(self):
        return self.where


# ops that return positions of entries along ``dim``: name -> (position of dim
# among the arguments, its default; None: over the flattened input)
_PICKERS = {"topk": (2, -1), "sort": (1, -1), "argsort": (1, -1), "argmax": (1, None),
            "argmin": (1, None), "max": (1, None), "min": (1, None), "kthvalue": (2, -1),
            "mode": (1, -1), "median": (1, None)}


def _picks_a_tie(n: fx.Node, expect: torch.Tensor, value: torch.Tensor, env: dict) -> bool:
    """Whether integer node ``n`` holds positions picked by a ``topk`` /
    ``sort`` / ``argmax``-like op, and the positions the permuted run picked
    (``value``) hold the same values, within float rounding, of that op's input
    as the positions it should have picked (``expect``): a tie (or near tie)
    broken the other way. Positions along an axis the spec wrongly permutes
    hold other values, so a wrong spec is not mistaken for a tie."""
    import operator
    pick = n
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        pick = n.args[0]
    name = _target_name(pick).split(".")[0]
    if name not in _PICKERS or not pick.args or not isinstance(pick.args[0], fx.Node):
        return False
    x = env.get(pick.args[0])
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False
    pos, default = _PICKERS[name]
    dim = pick.kwargs.get("dim", pick.args[pos] if len(pick.args) > pos else default)
    if not isinstance(dim, int) and dim is not None:
        return False
    try:
        if dim is None:
            x, picked, wanted = x.reshape(-1), value.reshape(-1), expect.reshape(-1)
            dim = 0
        else:
            picked, wanted = value, expect
            if picked.ndim < x.ndim:  # a reduced dim (keepdim=False)
                picked, wanted = picked.unsqueeze(dim), wanted.unsqueeze(dim)
        got, want = x.gather(dim, picked.long()), x.gather(dim, wanted.long())
    except (RuntimeError, IndexError):
        return False
    scale = float(x.abs().max()) if x.numel() else 0.0
    return bool(torch.allclose(got.double(), want.double(), rtol=0, atol=1e-5 * max(scale, 1e-30)))


def _runs(model: nn.Module, inputs: ModelInputs) -> bool:
    """Whether ``model`` itself runs on ``inputs`` (eval mode, no grad)."""
    try:
        with torch.no_grad(), eval_mode(model):
            inputs.call(model)
        return True
    except Exception:  # noqa: BLE001 - only whether it runs
        return False


def _record_all(gm, args):
    env = {}

    class Rec(fx.Interpreter):
        def run_node(inner, n):
            v = super().run_node(n)
            # a clone: a later in-place op must not rewrite what was recorded
            env[n] = v.clone() if isinstance(v, torch.Tensor) else v
            return v
    # gm's submodules are the model's own: every one gets its mode back
    with torch.no_grad(), eval_mode(gm), seeded_rng(gm):  # the draws the check saw
        Rec(gm).run(*args)
    return env


def _target_name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _group_name(m: Member, state, used: set) -> str:
    module, _, leaf = m.param.rpartition(".")
    if leaf in ("weight", "bias") and module:
        label = {0: "out", 1: "in"}.get(m.axis, str(m.axis))
        base = f"{module}:{label}"
    else:
        base = f"{m.param}:{m.axis}"
    if not m.is_plain:
        if m.offset:
            base += f"@{m.offset}"
        if len(m.shape) > 1:
            base += f".d{m.dim}"
    name, k = base, 2
    while name in used:
        name, k = f"{base}#{k}", k + 1
    return name


def infer_spec(model: nn.Module, example_inputs=None, *, opaque: Iterable = (),
               fixed: Iterable[str] = (), capture: str = "auto",
               outputs: Sequence | None = None, symmetries=("permutation",),
               more_inputs: Sequence = ()) -> PermutationSpec:
    """Infer which parameter axes of ``model`` can be permuted together:
    ``trace_model(...).spec`` (see :func:`trace_model` for the arguments)."""
    return trace_model(model, example_inputs, opaque=opaque, fixed=fixed, capture=capture,
                       outputs=outputs, symmetries=symmetries, more_inputs=more_inputs).spec


def trace_model(model: nn.Module, example_inputs=None, *, opaque: Iterable = (),
                fixed: Iterable[str] = (), capture: str = "auto",
                outputs: Sequence | None = None, symmetries=("permutation",),
                more_inputs: Sequence = ()) -> TracedModel:
    """Capture ``model`` and infer which parameter axes can be permuted together.

    Args:
        model: any nn.Module that torch.fx or torch.export can capture.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (``{"input_ids": ids}``); for timm and torchvision
            models it may be omitted (see :func:`autobasin.trace.default_inputs`).
            A forward that takes ``use_cache`` is run with ``use_cache=False``
            unless given (see :func:`autobasin.inputs.as_inputs`).
        opaque: qualified module names or module types to treat as opaque
            leaves (their axes are blocked unless a rule knows them); fx only.
        fixed: group names to leave unpermuted.
        capture: ``"auto"`` (torch.fx, then torch.export when fx cannot trace
            the top-level forward), ``"fx"`` or ``"export"``; see
            :func:`capture_graph`. The spec names tensors by their state_dict
            names whichever front end captured.
        outputs: the outputs that define what the model computes, when not
            all of them: keys of the dict / ``ModelOutput`` forward returns (or
            indices of a tuple), e.g. ``("logits",)`` for a Hugging Face
            encoder-decoder, whose ``encoder_last_hidden_state`` would
            otherwise fix the encoder's residual stream. The spec keeps them
            (``spec.outputs``) and every check compares only those.
        symmetries: the kinds of symmetry to look for (:data:`autobasin.spec.KINDS`):
            ``("permutation",)`` by default; add ``"sign"``, ``"scale"``,
            ``"orthogonal"``, ``"invertible"`` (or pass ``"all"``). Each group
            carries the most general kind asked for that every op on its axes
            admits (a ReLU admits positive scalings, an odd activation sign
            flips, a gainless RMSNorm orthogonal maps, a linear layer and a
            residual sum anything invertible; an op without a declaration only
            permutations), and each member whether a general element acts on
            it as ``M`` or ``M^-T`` (``Member.contra``). A RoPE head dim, which
            admits no permutation, gets the rotations (``"orthogonal"``) or
            rotations times scales (``"invertible"``) of each frequency pair:
            kinds ``"rotation"`` / ``"rotary"`` with ``Group.pairs``.
        more_inputs: further example inputs, each in any form
            ``example_inputs`` takes, that run other paths through forward
            (a modality the first set leaves out, a mode flag, a branch on
            which inputs are given): each set is captured on its own and
            constrains the same axes, so the spec holds on every set, and
            weights only another set reaches are permuted too. Check it on
            each (``check_equivalence`` per set).

    Returns:
        A :class:`TracedModel`; its ``spec`` is the :class:`PermutationSpec`.
        The model is run once in eval mode on the example inputs to learn
        shapes; its state and every submodule's mode are unchanged.

    ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile``
    wrappers are looked through (:func:`autobasin.guard.unwrap_model`): the
    spec names the inner model's tensors, without ``module.``/``_orig_mod.``.
    A model on the ``meta`` device (built under ``torch.device("meta")``) can be
    inspected: tensor inputs are moved to ``meta`` and nothing is computed.
    """
    model = unwrap_model(model)
    if example_inputs is None:
        example_inputs = default_inputs(model)
    inputs = as_inputs(example_inputs, model)
    more = [as_inputs(m, model) for m in (more_inputs or ())]
    if is_meta_model(model):
        inputs, more = inputs.to("meta"), [m.to("meta") for m in more]
    try:
        traced = TracedModel(model, inputs, opaque, capture, outputs, fixed,
                             symmetries=symmetries, more_inputs=more)
    except ExampleInputError:
        # fx's graph cannot run on the inputs although the model can (fx took
        # another path through forward than these inputs do): capture with export
        if capture != "auto" or opaque or not all(_runs(model, i) for i in [inputs, *more]):
            raise
        traced = TracedModel(model, inputs, (), "export", outputs, fixed, symmetries=symmetries,
                             more_inputs=more)
    spec = traced.spec
    if capture == "auto" and traced.capture == "fx" and not opaque and (
            spec.blocked_ops() or spec.coverage() < 1.0):
        # fx left hidden axes fixed (an untraceable submodule, a module without
        # a rule, a weight computed by a hook or a parametrization): torch.export
        # looks through every module, so try it and keep the spec that permutes
        # more. Both fail closed. The graph torch.export captures for every input
        # first; where it cannot (a branch on the inputs' values: Longformer's
        # global attention), the graph of these inputs' branches, as when fx fails
        # outright (it warns that it holds for these inputs' branches; refused
        # where a branch reads the weights). That graph is taken only when the
        # inputs read every weight: fx's opaque module holds for every input, and
        # a weight no example reads belongs to a branch they did not take
        # (Longformer's global projections without a global_attention_mask),
        # which the branch graph would leave unpermuted while its inputs move.
        try:
            other = TracedModel(model, inputs, (), "export", outputs, fixed,
                                symmetries=symmetries, more_inputs=more)
        except Exception:  # noqa: BLE001 - export cannot capture it either: keep fx's
            other = None
        if other is not None and other.branches_taken and other.unused_tensors():
            other = None
        if other is not None and other.spec.coverage() > spec.coverage() + 1e-9:
            traced = other
    _warn_unused(traced)
    return traced


def _warn_unused(traced: TracedModel) -> None:
    """Say loudly which weights the forward on these inputs never used: the spec
    leaves them as they are, while what feeds them may be permuted, so a
    permuted model computes the same only where they stay unused."""
    unused = traced.unused_tensors()
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        warnings.warn(
            f"forward on these example inputs does not use {len(unused)} weight tensor(s) "
            f"({shown}): the spec leaves them unpermuted, so a permuted model computes the "
            "same only where they stay unused. Pass example inputs that reach them "
            "(pixel_values for a vision tower, audio for an audio encoder), or accept that "
            "other inputs and modes (training's auxiliary heads) are not covered.",
            UserWarning, stacklevel=3)
