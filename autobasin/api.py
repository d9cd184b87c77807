"""auto_rebasin: align model B to model A in one call."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .guard import check_model_finite, check_model_materialized, unwrap_model
from .match import MATCHERS, Matching
from .state import state_dict_mismatch
from .permute import EquivalenceError, permute_model_, verify_error
from .repair import check_repair_option
from .spec import PermutationSpec, Perms

_DEFAULT = type("_Default", (), {"__repr__": lambda self: "<as given to auto_rebasin>"})()


class ArchitectureMismatchError(ValueError):
    """Models A and B are not two instances of one architecture."""


@dataclass
class RebasinResult:
    """The outcome of :func:`auto_rebasin`.

    ``model`` is a deep copy of B whose state is permuted to line up with A;
    it computes what B computes. ``state_dict`` is that state (sharing storage
    with ``model``). ``perms`` maps each group of ``spec`` to a CPU LongTensor
    (n,). ``matching`` is what the matcher returned (a
    :class:`~autobasin.match.result.Matching`, e.g. ``matching.sweeps``,
    ``matching.objective``). ``verify_error`` is the relative error between the
    aligned model's and B's outputs on the example inputs (None when not
    verified), ``verify_dtype`` the dtype it was confirmed in when float32
    rounding needed a float64 re-check, and ``seconds`` the whole call's time.
    ``stats`` (kept for compatibility) is all of that as one dict.

    ``reference`` is model A itself (not a copy) and ``repair`` /
    ``repair_data`` what :func:`auto_rebasin` was given for them: the defaults
    of :meth:`interpolate` and :meth:`loss_barrier`.
    """

    model: nn.Module
    perms: Perms
    spec: PermutationSpec
    state_dict: dict[str, torch.Tensor]
    method: str
    matching: Matching | None = None
    verify_error: float | None = None
    verify_dtype: str | None = None
    seconds: float = 0.0
    reference: nn.Module | None = field(default=None, repr=False)
    repair: str | None = None
    repair_data: Iterable | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict:
        out = self.matching.as_dict() if self.matching is not None else {}
        if self.verify_error is not None:
            out["verify_error"] = self.verify_error
        if self.verify_dtype is not None:
            out["verify_dtype"] = self.verify_dtype
        out["seconds"] = self.seconds
        return out

    def _repair_args(self, repair: str | None | type, data: Iterable | None) -> tuple:
        repair = self.repair if repair is _DEFAULT else repair
        data = self.repair_data if data is None else data
        if repair is not None and data is None:
            raise ValueError(f"repair={repair!r} needs data=<batches>")
        if self.reference is None:
            raise ValueError("this result holds no reference model A")
        return repair, data

    def interpolate(self, lam: float = 0.5, data: Iterable | None = None,
                    repair: str | None | type = _DEFAULT) -> nn.Module:
        """The model ``(1 - lam) * A + lam * aligned B``, repaired.

        ``repair`` (default: the one given to :func:`auto_rebasin`) is None,
        ``"reset_bn"``, ``"repair"`` or ``"rescale"`` (see :func:`autobasin.repair`,
        with A and aligned B as endpoints and alphas ``(1 - lam, lam)``), done on
        ``data`` (default: auto_rebasin's ``data``). A and B are not modified.
        """
        from .merge import interpolate
        from .repair import repair as repair_model
        repair, data = self._repair_args(repair, data)
        mixed = interpolate(self.reference, self.model, lam)
        if repair is None:
            return mixed
        return repair_model(mixed, [self.reference, self.model], data, alphas=lam, mode=repair)

    def loss_barrier(self, eval_fn_or_data, data: Iterable | None = None,
                     repair: str | None | type = _DEFAULT, **kwargs: Any):
        """:func:`autobasin.loss_barrier` between A and aligned B, every point repaired
        as in :meth:`interpolate`; ``kwargs`` go to ``loss_barrier``."""
        from .barrier import loss_barrier
        repair, data = self._repair_args(repair, data)
        return loss_barrier(self.reference, self.model, eval_fn_or_data, repair=repair,
                            repair_data=data, **kwargs)


# ---------------------------------------------------------------------- checks
def _graph_mismatch(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> str | None:
    """The first difference of two GraphModules' graphs (node by node: op, target,
    arguments) or submodule types, as a sentence naming the node, or None."""
    nodes_a, nodes_b = list(a.graph.nodes), list(b.graph.nodes)
    for i, (na, nb) in enumerate(zip(nodes_a, nodes_b)):
        fa, fb = na.format_node(), nb.format_node()
        if fa != fb:
            return (f"the two GraphModules have different graphs: node {i} is {fa!r} in a "
                    f"but {fb!r} in b")
    if len(nodes_a) != len(nodes_b):
        which, extra = ("a", nodes_a) if len(nodes_a) > len(nodes_b) else ("b", nodes_b)
        node = extra[min(len(nodes_a), len(nodes_b))]
        return (f"the two GraphModules have different graphs: {which} has {len(extra)} "
                f"nodes, the other {min(len(nodes_a), len(nodes_b))}; first extra node "
                f"{node.format_node()!r}")
    mods_b = dict(b.named_modules())
    for name, ma in a.named_modules():
        if not name:
            continue  # the roots: fx makes a class per GraphModule
        mb = mods_b.get(name)
        if mb is None:
            return f"submodule {name!r} of a is missing from b"
        if type(ma) is not type(mb):
            return (f"submodule {name!r} is a {type(ma).__qualname__} in a but a "
                    f"{type(mb).__qualname__} in b")
    return None


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first difference.

    Two ``torch.fx.GraphModule`` s (each of which fx gives a class of its own)
    are the same architecture when their graphs are node for node the same and
    their submodules are of the same types; any other models when they are of
    one type. Then the state_dicts must agree in keys, shapes and dtypes.
    """
    if isinstance(a, torch.fx.GraphModule) and isinstance(b, torch.fx.GraphModule):
        problem = _graph_mismatch(a, b)
        if problem:
            raise ArchitectureMismatchError(problem)
    elif type(a) is not type(b):
        raise ArchitectureMismatchError(f"models are of different types: "
                                        f"{type(a).__qualname__} and {type(b).__qualname__}")
    problem = state_dict_mismatch(a.state_dict(), b.state_dict(), dtypes=True)
    if problem:
        raise ArchitectureMismatchError(problem)


# ------------------------------------------------------------------------ main
def auto_rebasin(a: nn.Module, b: nn.Module, example_inputs=None, method: str = "weight",
                 data: Iterable | None = None, seed: int = 0, verify: bool = True,
                 spec: PermutationSpec | None = None, max_iter: int = 100, progress: bool = True,
                 device: torch.device | str | None = None, repair: str | None = None,
                 symmetries=("permutation",), more_inputs: Iterable = (),
                 **matcher_kwargs: Any) -> RebasinResult:
    """Permute B's hidden units to line up with A's; A and B are left untouched.

    Args:
        a, b: two models of the same architecture (same type, state_dict keys,
            shapes and dtypes; else :class:`ArchitectureMismatchError`).
        example_inputs: inputs to trace ``a`` with when inferring the spec, and to
            verify with (a tensor, a tuple of positional inputs, or a dict of
            keyword inputs).
        method: a key of :data:`autobasin.match.MATCHERS`: ``"weight"`` (default),
            ``"activation"`` or ``"ste"`` (these two need ``data``).
        data: batches for matchers that need data, and for ``repair``.
        seed: seeds the matcher.
        verify: check that the aligned B computes what B computes on the example
            inputs (relative error at most 1e-4, else :class:`EquivalenceError`);
            skipped with a warning when there are no example inputs.
        spec: the permutation spec; inferred from ``a`` when None.
        more_inputs: further example inputs that run other paths through
            forward (another modality, a mode): the spec is inferred to hold on
            each (see :func:`autobasin.infer.trace_model`), and each is verified
            like ``example_inputs``.
        symmetries: the kinds of symmetry to align with when the spec is inferred
            (see :func:`autobasin.infer_spec`): ``("permutation",)`` by default;
            with ``"sign"``, ``"scale"``, ``"orthogonal"``, ``"invertible"`` (or
            ``"all"``) groups that admit them are aligned by signed or scaled
            permutations, orthogonal or invertible maps (weight or activation
            matching: :func:`autobasin.match.general.general_weight_matching`,
            :func:`~autobasin.match.general.general_activation_matching`), and
            ``perms`` holds a float (n, n) matrix for each such group.
        max_iter, progress, device, **matcher_kwargs: passed to the matcher.
        repair: how to treat models interpolated from A and aligned B: None,
            ``"reset_bn"`` (recompute BatchNorm statistics), ``"repair"`` (REPAIR:
            every hidden channel gets the interpolated mean and std of A's and B's)
            or ``"rescale"`` (std only); see :func:`autobasin.repair`. The aligned
            model itself computes what B computes and needs no repair, so this sets
            the default of ``result.interpolate(lam)`` and ``result.loss_barrier(...)``,
            which use ``data``; it needs ``data``.

    Returns:
        a :class:`RebasinResult` whose ``model`` is the aligned copy of B.

    Refused up front, naming the tensor: a NaN or Inf in a parameter
    (:class:`~autobasin.guard.NonFiniteWeightError`), a model on the ``meta``
    device (:class:`~autobasin.guard.MetaTensorError`). ``nn.DataParallel``,
    ``DistributedDataParallel`` and ``torch.compile`` wrappers are removed
    (:func:`~autobasin.guard.unwrap_model`): ``model`` is then an aligned copy
    of the inner model, and the state_dict keys carry no ``module.`` /
    ``_orig_mod.`` prefix.
    """
    start = time.perf_counter()
    a, b = unwrap_model(a), unwrap_model(b)
    if method not in MATCHERS:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(MATCHERS)}")
    matcher = MATCHERS[method]
    check_repair_option(repair)
    if repair is not None and data is None:
        raise ValueError(f"repair={repair!r} needs data=<iterable of batches>")
    if matcher.needs_data and data is None:
        raise ValueError(f"method {method!r} needs data: pass data=<iterable of batches>")
    check_same_architecture(a, b)
    for label, model in (("a", a), ("b", b)):
        check_model_materialized(model, "auto_rebasin", f"model {label}")
        check_model_finite(model, label)
    traced = None
    if spec is None:
        from .infer import trace_model
        traced = trace_model(a, example_inputs, symmetries=symmetries, more_inputs=more_inputs)
        spec = traced.spec
    if spec.is_general and method not in ("weight", "activation", "ste"):
        raise NotImplementedError(
            f"method {method!r} aligns permutations only, and the spec has groups of other "
            f"kinds ({sorted({g.kind for g in spec.groups.values()} - {'permutation'})}): use "
            "method='weight' or 'activation', or symmetries=('permutation',)")
    if traced is not None and matcher.takes_traced:
        matcher_kwargs.setdefault("traced", traced)
    if not matcher.runs_on_a:
        matcher_kwargs["device"] = device

    matching = matcher.run(spec, a, b, data, seed=seed, progress=progress, max_iter=max_iter,
                           **matcher_kwargs)
    if not isinstance(matching, Matching):  # a registered matcher that returns a plain mapping
        matching = Matching(perms=dict(matching), method=method)
    # permutations as indices; the elements of other kinds as float64 matrices
    perms = {k: torch.as_tensor(p).cpu() if torch.as_tensor(p).is_floating_point()
             else torch.as_tensor(p).long().cpu() for k, p in matching.items()}
    # a copy of b permuted in place, one tensor at a time: its own tensors, no aliasing
    # with b's, and no second copy of the state held meanwhile
    aligned = copy.deepcopy(b)
    permute_model_(aligned, spec, perms)
    result = RebasinResult(model=aligned, perms=perms, spec=spec, state_dict=aligned.state_dict(),
                           method=method, matching=matching, reference=a, repair=repair,
                           repair_data=data)

    if verify:
        inputs = traced.example_inputs if traced is not None else example_inputs
        if inputs is None:
            warnings.warn("auto_rebasin: no example inputs, so the aligned model was not "
                          "verified; pass example_inputs=... to check it", stacklevel=2)
        else:
            sets = [inputs, *(traced.more_inputs if traced is not None else more_inputs)]
            for k, each in enumerate(sets):
                err, wide = verify_error(b, aligned, each, outputs=spec.outputs)
                if k == 0 or err > result.verify_error:
                    result.verify_error = err
                    if wide is not None:
                        result.verify_dtype = str(wide).removeprefix("torch.")
                if not err <= 1e-4:
                    which = "the example inputs" if k == 0 else f"more_inputs[{k - 1}]"
                    raise EquivalenceError(
                        f"the aligned model computes something else than b on {which}: "
                        f"relative error {err:.3g} > 1e-4; the permutation spec does not fit "
                        f"this model (check it with autobasin.check_equivalence)")
    result.seconds = time.perf_counter() - start
    return result
