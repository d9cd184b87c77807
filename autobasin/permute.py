"""Permutations over a PermutationSpec: make, apply, invert, compose, verify.

A permutation set is ``dict[group name, LongTensor of shape (n,)]``. Permuting
an axis by ``p`` means ``x.index_select(axis, p)``: new position ``i`` holds old
position ``p[i]``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Sequence

import torch

from torch import nn

from .guard import eval_mode
from .inputs import ModelInputs, as_inputs, select_outputs
from .state import with_metadata
from .spec import (PAIR_KINDS, Member, PermutationSpec, Perms, SpecError,  # noqa: F401
                   axis_index, pair_firsts, pair_partners)  # axis_index: re-exported



class EquivalenceError(AssertionError):
    """Permuting a model by a spec changed what it computes."""


class NondeterministicModelError(EquivalenceError):
    """The model computes different outputs on two runs with the same inputs,
    so no check can tell whether a permutation changed what it computes."""


class TieBreakError(EquivalenceError):
    """The permuted model's outputs moved, but the first value that moved is a
    selection (``topk``, ``sort``, ``argmax``) that picked other entries of equal
    value: float rounding broke a tie the other way. The check cannot judge the
    spec on these inputs and weights (the model's outputs are not continuous
    there); it is not shown wrong either."""


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Perms:
    """One uniformly random permutation per group, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(g.size, generator=gen) for name, g in spec.groups.items()}


def identity_permutation(spec: PermutationSpec) -> Perms:
    return {name: torch.arange(g.size) for name, g in spec.groups.items()}


# ------------------------------------------------------- beyond permutations
# A group of another kind than "permutation" (``spec.KINDS``) takes an element
# given as a float (n, n) matrix M: a member's rows (``Member.gather``) become
# ``M @ rows``, or ``M^-T @ rows`` for a contra member. A permutation p is the
# matrix ``eye(n)[p]``; either form is accepted for any group whose kind
# contains it.

def is_permutation(t: torch.Tensor) -> bool:
    """Whether a group element is given as a permutation (integer indices)."""
    return not torch.as_tensor(t).is_floating_point()


def as_matrix(t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """A group element as a float64 (n, n) matrix."""
    t = torch.as_tensor(t)
    if is_permutation(t):
        return torch.eye(t.numel(), dtype=torch.float64)[t.long().cpu()]
    return t.detach().to(torch.float64).cpu()


def random_element(kind: str, n: int, gen: torch.Generator, pairs=None) -> torch.Tensor:
    """A random element of ``kind`` on ``n`` units: a permutation (LongTensor) or
    a well-conditioned float64 matrix (condition number at most e^2). The kinds
    of ``spec.PAIR_KINDS`` need the group's ``pairs``."""
    if kind in PAIR_KINDS:
        partner = pair_partners(pairs, n)
        k = n // 2
        angle = (torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
        scale = torch.exp(torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1) \
            if kind == "rotary" else torch.ones(k, dtype=torch.float64)
        return polar_pairs(partner, scale, angle)
    p = torch.randperm(n, generator=gen)
    if kind == "permutation":
        return p
    perm = torch.eye(n, dtype=torch.float64)[p]
    if kind == "sign":
        return perm * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).double()
    if kind == "scale":
        return perm * torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)

    def orthogonal():
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    if kind == "orthogonal":
        return orthogonal()
    if kind == "invertible":
        s = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)
        return orthogonal() @ torch.diag(s) @ orthogonal()
    raise SpecError(f"unknown symmetry kind {kind!r}")


def random_transforms(spec: PermutationSpec, seed: int = 0) -> Perms:
    """One random element per group, of the group's kind, reproducible from
    ``seed`` (:func:`random_permutation` for a spec of permutations only)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: random_element(g.kind, g.size, gen, g.pairs) for name, g in spec.groups.items()}


def pair_matrix(partner: torch.Tensor, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """The (n, n) matrix acting on each frequency pair ``(i, partner[i])``, ``i``
    the smaller, as the complex number ``re + i im`` (a rotation times a scale):
    ``x_i -> re x_i - im x_j``, ``x_j -> im x_i + re x_j``; one entry of ``re``
    and ``im`` per pair, in the order of their first positions (differentiable)."""
    n = len(partner)
    first = pair_firsts(partner)
    second = partner[first]
    m = torch.zeros(n, n, dtype=re.dtype)
    m = m.index_put((first, first), re).index_put((second, second), re)
    return m.index_put((first, second), -im).index_put((second, first), im)


def pair_parts(m: torch.Tensor, partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(re, im)`` of each pair of ``m`` (see :func:`pair_matrix`)."""
    first = pair_firsts(partner)
    return m[first, first], m[partner[first], first]


def polar_pairs(partner: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """:func:`pair_matrix` of ``scale * e^(i angle)`` per pair (differentiable)."""
    return pair_matrix(partner, scale * torch.cos(angle), scale * torch.sin(angle))


def invert(perms: Perms) -> Perms:
    """The inverse of every group's element."""
    return {k: torch.argsort(p) if is_permutation(p) else torch.linalg.inv(as_matrix(p))
            for k, p in perms.items()}


def compose(first: Perms, then: Perms) -> Perms:
    """The element equal to applying ``first`` and then ``then``."""
    return {k: first[k][then[k]] if is_permutation(first[k]) and is_permutation(then[k])
            else as_matrix(then[k]) @ as_matrix(first[k]) for k in first}


def check_perm(name: str, p: torch.Tensor, n: int) -> torch.Tensor:
    p = torch.as_tensor(p)
    if p.dim() != 1 or p.numel() != n:
        raise SpecError(f"permutation for group {name!r} has shape {tuple(p.shape)}, expected ({n},)")
    p = p.long().cpu()
    if not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise SpecError(f"permutation for group {name!r} is not a permutation of 0..{n - 1}")
    return p


# a general element's condition number beyond which applying it (and its
# inverse, for contra members) would lose the float32 weights' precision
MAX_CONDITION = 1e6


def check_element(name: str, t: torch.Tensor, n: int, kind: str, pairs=None) -> torch.Tensor:
    """A group's element, checked: a permutation of 0..n-1, or, for a group of
    another kind, a finite float (n, n) matrix (float64) whose condition number
    is below :data:`MAX_CONDITION`; for a group of ``spec.PAIR_KINDS``, the
    identity or a matrix that acts on each of its ``pairs`` alone as a rotation
    (times a scale, for "rotary"). SpecError naming the group otherwise."""
    t = torch.as_tensor(t)
    if kind in PAIR_KINDS:
        return _check_pair_element(name, t, n, kind, pairs)
    if is_permutation(t):
        return check_perm(name, t, n)
    if kind == "permutation":
        raise SpecError(f"group {name!r} carries permutations only; got a float "
                        f"{tuple(t.shape)} tensor")
    if tuple(t.shape) != (n, n):
        raise SpecError(f"element for group {name!r} has shape {tuple(t.shape)}, expected "
                        f"({n},) or ({n}, {n})")
    m = as_matrix(t)
    if not bool(torch.isfinite(m).all()):
        raise SpecError(f"element for group {name!r} has non-finite entries")
    cond = float(torch.linalg.cond(m)) if n else 1.0
    if not cond < MAX_CONDITION:
        raise SpecError(f"element for group {name!r} is ill-conditioned (condition number "
                        f"{cond:.3g} >= {MAX_CONDITION:g}): refusing to apply it")
    return m


def _check_pair_element(name: str, t: torch.Tensor, n: int, kind: str, pairs) -> torch.Tensor:
    partner = pair_partners(pairs, n)
    if is_permutation(t):
        p = check_perm(name, t, n)
        if not torch.equal(p, torch.arange(n)):
            raise SpecError(f"group {name!r} ({kind}: RoPE frequency pairs) takes no "
                            "permutation but the identity")
        return p
    m = check_element(name, t, n, "invertible")
    re, im = pair_parts(m, partner)
    want = pair_matrix(partner, re, im)
    tol = 1e-9 * max(float(m.abs().max()), 1.0)
    if float((m - want).abs().max()) > tol:
        raise SpecError(f"element for group {name!r} ({kind}) does not act on each RoPE "
                        "frequency pair alone as a rotation times a scale")
    if kind == "rotation" and float((re * re + im * im - 1).abs().max()) > 1e-9:
        raise SpecError(f"element for group {name!r} (rotation) scales a frequency pair")
    return m


def _checked_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every group's element, checked (:func:`check_element`); SpecError naming a missing one."""
    missing = [g for g in spec.groups if g not in perms]
    if missing:
        raise SpecError(f"no permutation given for group {missing[0]!r}")
    return {name: check_element(name, perms[name], g.size, g.kind, g.pairs)
            for name, g in spec.groups.items()}


def _permuted_entry(param: str, t: torch.Tensor, gm: list[tuple[str, Member]],
                    checked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``t`` (the entry ``param``) permuted by its members ``gm``: a new tensor."""
    if any(not is_permutation(checked[g]) for g, _ in gm):
        return _transformed_entry(param, t, gm, checked)
    per_axis: dict[int, list[tuple[Member, torch.Tensor]]] = {}
    for gname, m in gm:  # the caller checked that the spec fits (spec.check_fits)
        per_axis.setdefault(m.axis, []).append((m, checked[gname]))
    for axis, ms in per_axis.items():
        idx = axis_index(t.shape[axis], ms).to(t.device)
        t = t.index_select(axis, idx)
    return t


def _transformed_entry(param: str, t: torch.Tensor, gm: list[tuple[str, Member]],
                       checked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``t`` under general elements, member by member in float64 (members of one
    axis act on disjoint positions or different grid dimensions: they commute)."""
    if not t.is_floating_point():
        raise SpecError(f"{param!r} is not floating point ({t.dtype}); a general (non-"
                        "permutation) element cannot act on it")
    out = t.detach().to(torch.float64)
    for gname, m in gm:
        out = m.scatter(out, act(m.gather(out), checked[gname], m.contra))
    return out.to(t.dtype)


def act(rows: torch.Tensor, e: torch.Tensor, contra: bool = False) -> torch.Tensor:
    """A group element acting on a member's rows (:meth:`Member.gather`): a
    permutation reorders them; a matrix M maps them by ``M``, or by ``M^-T`` for
    a contra member; in ``rows``' dtype (differentiable in ``e``)."""
    if is_permutation(e):
        return rows[e.to(rows.device)]
    x = torch.linalg.inv(e).T if contra else e
    return x.to(device=rows.device, dtype=rows.dtype) @ rows


def permute_model_(model: torch.nn.Module, spec: PermutationSpec, perms: Perms) -> None:
    """Permute ``model``'s own tensors in place, one temporary tensor at a time
    (for checks of models too large to copy twice, and auto_rebasin's aligned copy)."""
    checked = _checked_perms(spec, perms)
    state = model.state_dict(keep_vars=True)
    spec.check_fits(state, "the model")
    done: set[int] = set()  # a tied tensor (one Parameter, two names) is permuted once
    with torch.no_grad():
        for param, gm in spec.members_by_param().items():
            t = state[param]
            if id(t) in done:
                continue
            done.add(id(t))
            t.copy_(_permuted_entry(param, t.detach(), gm, checked))


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def wrapper_prefix(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> str:
    """The key prefix that ``nn.DataParallel`` / ``DistributedDataParallel``
    (``module.``) and ``torch.compile`` (``_orig_mod.``), nested in any order,
    put before the names of ``state_dict`` and that the spec's names lack; ""
    when the spec names the entries as they are (or no such prefix fits).

    A prefix is only taken when every key of ``state_dict`` carries it (a
    wrapper's state_dict has nothing else) and every tensor the spec permutes
    is found under it."""
    params = list(spec.members_by_param())
    keys = list(state_dict)
    prefix = ""
    while True:
        if all(prefix + p in state_dict for p in params):
            return prefix
        nxt = next((w for w in _WRAPPER_PREFIXES
                    if keys and all(k.startswith(prefix + w) for k in keys)), None)
        if nxt is None:
            return ""
        prefix += nxt


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new state_dict with every member permuted; inputs untouched.

    Entries the spec does not mention are passed through (same tensor objects).
    Raises :class:`SpecError` naming the group or tensor on any mismatch
    (:meth:`PermutationSpec.check_fits`).

    The state_dict of a wrapped model (``nn.DataParallel``,
    ``DistributedDataParallel``, ``torch.compile``) is accepted with a spec of
    the inner model (what :func:`autobasin.infer_spec` gives for the wrapper):
    its ``module.`` / ``_orig_mod.`` prefix, when every key carries it, is
    looked through, and the result keeps the caller's keys, prefix included,
    so it loads back into the wrapper (``wrapper.load_state_dict(out)``).
    """
    permuted = permuted_entries(spec, perms, state_dict)
    return with_metadata({k: permuted(k) for k in state_dict}, state_dict)


def permuted_entries(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                     state_dict: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``entry(key)``: ``state_dict[key]`` permuted (a new tensor) or, when the spec
    does not move it, the entry itself; what :func:`apply_permutation` builds,
    one entry at a time (to write a checkpoint without holding it all). The
    checks run at once, as in :func:`apply_permutation`."""
    checked = _checked_perms(spec, perms)
    prefix = wrapper_prefix(spec, state_dict)
    inner = {k[len(prefix):]: v for k, v in state_dict.items()} if prefix else state_dict
    spec.check_fits(inner, f"state_dict (keys under {prefix!r})" if prefix else "state_dict")
    members = spec.members_by_param()

    def entry(key: str) -> torch.Tensor:
        param = key[len(prefix):]
        if key.startswith(prefix) and param in members:
            return _permuted_entry(param, inner[param], members[param], checked)
        return state_dict[key]
    return entry


def permute_model(model: torch.nn.Module, spec: PermutationSpec, perms: Perms) -> torch.nn.Module:
    """A deep copy of ``model`` with its state permuted; ``model`` is untouched."""
    new = copy.deepcopy(model)
    new.load_state_dict(apply_permutation(spec, perms, model.state_dict()))
    return new


def _flatten_tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for k in sorted(x, key=str) for t in _flatten_tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flatten_tensors(v)]
    if hasattr(x, "__dataclass_fields__"):
        return [t for f in x.__dataclass_fields__ for t in _flatten_tensors(getattr(x, f))]
    return []


def relative_error(a, b) -> float:
    """max over output tensors of ||a - b|| / max(||a||, tiny), in float64."""
    ta, tb = _flatten_tensors(a), _flatten_tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x, y = x.double(), y.double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            same = torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
            worst = max(worst, 0.0 if same else float("inf"))
            continue
        worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-30)))
    return worst


def outputs_relative_error(reference: nn.Module, other: nn.Module, example_inputs,
                           outputs: Sequence | None = None) -> float:
    """Relative L2 error of ``other``'s outputs against ``reference``'s, in eval mode,
    over the ``outputs`` named (all when None; see :func:`autobasin.infer.infer_spec`).

    Both run without grad; every submodule's train/eval mode is restored.
    """
    inputs = as_inputs(example_inputs, reference)
    with torch.no_grad(), eval_mode(reference, other):
        ref, out = inputs.call_seeded(reference), inputs.call_seeded(other)
    return relative_error(select_outputs(ref, outputs), select_outputs(out, outputs))


def verify_error(reference: nn.Module, other: nn.Module, example_inputs,
                 rtol: float = 1e-4, outputs: Sequence | None = None
                 ) -> tuple[float, torch.dtype | None]:
    """:func:`outputs_relative_error`, judged in float32 or wider.

    Permuting hidden units changes the order of sums, so half-precision
    outputs differ by rounding (1e-3 on a bf16 ResNet): a model with float16 /
    bfloat16 tensors is compared on float32 copies. An error above ``rtol``
    is re-judged on float64 copies, as :func:`autobasin.check_equivalence`
    does: a deep network can amplify float32 rounding. Returns the error and
    the dtype it was computed in (None: the models' own).
    """
    dtypes = {t.dtype for m in (reference, other) for t in (*m.parameters(), *m.buffers())
              if t.is_floating_point()}
    low = any(d.itemsize < 4 for d in dtypes)
    err = float("inf")
    if not low:
        err = outputs_relative_error(reference, other, example_inputs, outputs)
        if err <= rtol or dtypes == {torch.float64}:
            return err, None
    for wide in ((torch.float32, torch.float64) if low else (torch.float64,)):
        inputs = as_inputs(example_inputs, reference).to(dtype=wide)
        err = outputs_relative_error(copy.deepcopy(reference).to(wide),
                                     copy.deepcopy(other).to(wide), inputs, outputs)
        if err <= rtol:
            break
    return err, wide


def _float64_confirms(model: torch.nn.Module, spec: PermutationSpec, perms: Perms,
                      inputs: "ModelInputs", rtol: float) -> bool:
    """Re-run the check in float64: True if the permuted model agrees there.

    A deep random-init network can amplify float32 rounding (the permuted
    model sums in another order) beyond any fixed tolerance; exactness is a
    property of the spec, so it is judged in float64.
    """
    params = list(model.parameters()) + list(model.buffers())
    if any(p.dtype == torch.float64 for p in params if p.is_floating_point()):
        return False
    # one float64 copy, permuted in place between the two runs: a model of 645M
    # parameters (torchvision regnet_y_128gf) is checked without a second copy
    wide = copy.deepcopy(model).double().eval()
    wide_inputs = inputs.to(dtype=torch.float64)
    with torch.no_grad():
        ref = select_outputs(wide_inputs.call_seeded(wide), spec.outputs)
        permute_model_(wide, spec, perms)
        return relative_error(ref, select_outputs(wide_inputs.call_seeded(wide), spec.outputs)) <= rtol


def check_equivalence(model: torch.nn.Module, spec: PermutationSpec, example_inputs=None,
                      seed: int = 0, rtol: float = 1e-4, traced=None) -> float:
    """Permute every group at random and check the model computes the same.

    A group of another kind than permutations takes a random element of its
    kind (:func:`random_transforms`): a random orthogonal or invertible map,
    signed or scaled permutation.

    Runs ``model`` in eval mode (its mode is restored) on ``example_inputs``
    (a tensor, a tuple of positional inputs, a dict of keyword inputs, or None:
    ``traced``'s inputs, else those of :func:`autobasin.trace.default_inputs`
    for timm and torchvision models) and on a permuted copy. Returns the
    relative L2 error of the outputs; raises :class:`EquivalenceError` above
    ``rtol``, naming the first graph node whose value moved (from ``traced``,
    the :class:`~autobasin.infer.TracedModel` the spec came from, or, for an
    inferred spec, a fresh capture). An error above ``rtol`` that vanishes in
    float64 is rounding, not a wrong spec: it is returned with a warning;
    outputs that vary between two runs of the model itself raise
    :class:`NondeterministicModelError`.

    A wrapped model (``nn.DataParallel``, ``DistributedDataParallel``,
    ``torch.compile``) is checked through the model it wraps
    (:func:`autobasin.guard.unwrap_model`), whose names the spec uses.
    """
    from .guard import check_model_materialized, eval_mode
    from .inputs import as_inputs
    from .trace import default_inputs

    from .guard import unwrap_model
    model = unwrap_model(model)  # DataParallel, DDP, torch.compile: the model inside
    if example_inputs is None:
        example_inputs = traced.example_inputs if traced is not None else default_inputs(model)
    inputs = as_inputs(example_inputs, model)
    check_model_materialized(model, "check_equivalence", "the model")
    perms = random_transforms(spec, seed) if spec.is_general else random_permutation(spec, seed)
    permuted = permute_model(model, spec, perms)
    # both runs draw the same random numbers (a model that samples masks or noise in
    # eval mode): what differs is only what the weights compute
    with torch.no_grad(), eval_mode(model, permuted):  # every submodule's mode restored
        ref = inputs.call_seeded(model)
        out = inputs.call_seeded(permuted)
    err = relative_error(select_outputs(ref, spec.outputs), select_outputs(out, spec.outputs))
    del out
    if not err <= rtol:  # is it the permutation, or does the model itself vary?
        with torch.no_grad(), eval_mode(model):
            again = inputs.call_seeded(model)
        drift = relative_error(select_outputs(ref, spec.outputs), select_outputs(again, spec.outputs))
        if not drift <= rtol:
            raise NondeterministicModelError(
                f"the model's own outputs differ by {drift:.3g} between two runs on the same "
                "inputs in eval mode, even with torch's random generators seeded alike before "
                "each run (nondeterministic kernels, or randomness torch does not seed): the "
                "spec cannot be checked. Pass inputs that fix it, or make forward deterministic")
    del ref
    if not err <= rtol:
        del permuted  # the float64 re-check needs the memory; rebuilt below if it fails
    if not err <= rtol and _float64_confirms(model, spec, perms, inputs, rtol):
        import warnings
        warnings.warn(f"check_equivalence: float32 outputs moved by {err:.3g} (> {rtol:g}) under "
                      "the permutation, but in float64 they agree: that is rounding in a "
                      "badly conditioned model, not a wrong spec", stacklevel=2)
        return err
    if not err <= rtol:
        where, tie = "", False
        try:
            if traced is None and spec.capture is not None:
                # an inferred spec: capture again to name the node (its groups
                # must be the spec's, else the names would not match)
                from .infer import trace_model
                traced = trace_model(model, inputs, capture=spec.capture, outputs=spec.outputs)
                if set(traced.spec.groups) != set(spec.groups):
                    traced = None
            if traced is not None:
                permuted = permute_model(model, spec, perms)
                node = traced.first_divergence(model, permuted, perms, inputs)
                if node:
                    where, tie = f"; first diverging graph node: {node}", node.tie
        except Exception as e:  # noqa: BLE001 - the diagnosis must not hide the verdict
            where = f"; the graph could not be replayed to name the node ({type(e).__name__})"
        if tie:
            raise TieBreakError(
                f"permuting by the spec changed the outputs: relative error {err:.3g} > {rtol:g} "
                f"(seed {seed}){where}, picking entries whose values equal, within float "
                "rounding, those the unpermuted model picked: a tie broken the other way "
                "(permuting sums in another order rounds differently). The check cannot judge "
                "the spec on these inputs; check it on inputs or weights without ties")
        raise EquivalenceError(f"permuting by the spec changed the outputs: relative error "
                               f"{err:.3g} > {rtol:g} (seed {seed}){where}")
    return err
