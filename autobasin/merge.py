"""Merge models in weight space: linear interpolation, and MergeMany for N models."""
from __future__ import annotations

import copy
import time
import warnings
from typing import Callable, Mapping, TypeVar, overload

import torch
from torch import nn

from .batches import model_device
from .state import StateDict, average, check_compatible, interpolate_state_dicts
from .repair import check_repair_option

M = TypeVar("M", bound=nn.Module)


@overload
def interpolate(a: M, b: nn.Module, lam: float) -> M: ...
@overload
def interpolate(a: StateDict, b: StateDict, lam: float) -> dict[str, torch.Tensor]: ...


def interpolate(a, b, lam: float):
    """The point ``(1 - lam) * a + lam * b`` on the line between two models.

    ``a`` and ``b`` are both ``nn.Module`` (returns a deep copy of ``a`` holding the
    interpolated state) or both state dicts (returns a new dict). ``lam = 0``
    gives ``a``, ``lam = 1`` gives ``b``; values outside [0, 1] extrapolate.

    Floating (and complex) tensors are mixed in float32, or float64 when ``a``'s
    tensor is float64, and cast back to ``a``'s dtype, on ``a``'s device.
    Integer and bool tensors (e.g. BatchNorm's ``num_batches_tracked``) cannot be
    mixed and take ``a``'s value. Keys and shapes must agree: a ``ValueError``
    names the first key that differs. Neither input is modified.
    """
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        state = interpolate_state_dicts(a.state_dict(), b.state_dict(), lam)
        merged = copy.deepcopy(a)
        merged.load_state_dict(state)
        return merged
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return interpolate_state_dicts(a, b, lam)
    raise TypeError(f"interpolate needs two nn.Modules or two state dicts, "
                    f"got {type(a).__name__} and {type(b).__name__}")


def _verify_aligned(models: list[nn.Module], aligned: list[StateDict], spec,
                    example_inputs) -> list[float] | None:
    """Each model, with its aligned state, must compute what it computes on the example
    inputs (``example_inputs``, else the spec's); :class:`EquivalenceError` naming
    the model otherwise. Returns the errors, or None (with a warning) when there
    are no inputs to run."""
    from .permute import verify_error
    from .permute import EquivalenceError
    from .inputs import as_inputs

    if example_inputs is None:
        warnings.warn("merge_many: no example inputs, so the aligned models were not verified "
                      "to compute what their sources compute (a spec loaded from JSON carries "
                      "none); pass example_inputs=... to verify", stacklevel=3)
        return None
    errors = []
    for i, (model, state) in enumerate(zip(models, aligned)):
        device = model_device(model)
        inputs = as_inputs(example_inputs, model).to(device)
        permuted = copy.deepcopy(model)
        permuted.load_state_dict(state)
        err, _ = verify_error(model, permuted, inputs, outputs=spec.outputs)
        del permuted
        if not err <= 1e-4:
            raise EquivalenceError(
                f"merge_many: model {i}, permuted to align with the others, computes something "
                f"else than model {i}: relative error {err:.3g} > 1e-4; the permutation spec "
                f"does not fit this model (check it with autobasin.check_equivalence)")
        errors.append(err)
    return errors


def merge_many(models, method: str = "weight", seed: int = 0, max_rounds: int = 10,
               data=None, weights=None, spec=None, example_inputs=None, symmetries=("permutation",),
               progress: bool | Callable[[str], None] = True,
               stats: dict | None = None, repair: str | None = None,
               num_batches: int | None = None):
    """MergeMany (Ainsworth et al. 2023, Algorithm 3): align N models to a
    common basin and average them.

    Each round visits the models in a random order (from ``seed``); model i is
    aligned to the (weighted) mean of the others, as currently aligned: by
    weight matching (``method="weight"``, the paper's), or with
    ``method="activation"`` by activation matching against the model whose
    weights are that mean, on ``data`` (correlations, so the smaller
    activations of an averaged model do not matter; modules only). Rounds stop when a round changes no permutation, or
    after ``max_rounds``. The result is the weighted mean of the aligned
    models (``weights``: one non-negative number per model, normalized to sum
    1; default equal).

    ``symmetries``: the kinds to align with when the spec is inferred (see
    :func:`autobasin.infer_spec`); a spec with groups beyond permutations is
    matched by :func:`~autobasin.match.general.general_weight_matching`
    (``method="weight"`` only).

    After the average, with ``data`` (batches as for :func:`autobasin.reset_bn_stats`;
    at most ``num_batches`` of them), the merged model is repaired:

    - ``repair=None`` (default) or ``"reset_bn"``: BatchNorm running statistics are
      recomputed on ``data`` (:func:`autobasin.reset_bn_stats`); a model without
      BatchNorm is unchanged.
    - ``"repair"`` / ``"rescale"``: :func:`autobasin.repair` with the aligned
      models as endpoints and ``weights`` as alphas: every hidden channel gets the
      weighted mean of the parents' activation mean and std (``"rescale"``: std only).

    ``models``: nn.Modules of one architecture (the first one's class and
    buffers are used for the result; ``nn.DataParallel``, DDP and
    ``torch.compile`` wrappers are looked through, as by :func:`autobasin.auto_rebasin`) or state dicts (then ``spec`` is needed,
    a state dict is returned and ``data``/``repair`` do not apply). Inputs are
    never modified. ``stats``, if a dict, receives ``rounds``, ``perms`` (the
    permutation applied to each model) and, when verified, ``verify_errors``
    (one relative error per model).

    Verified before anything is returned: the spec must fit every model's
    state dict (:meth:`~autobasin.spec.PermutationSpec.check_fits`, a
    :class:`~autobasin.spec.SpecError` naming the tensor), and each model,
    permuted as aligned, must compute what it computed, on ``example_inputs``
    (default: the inputs the spec is inferred with when none is given), to a relative error of
    1e-4 (judged as :func:`autobasin.auto_rebasin` judges it), else
    :class:`~autobasin.permute.EquivalenceError` naming the model's index. With
    no example inputs (a spec loaded from JSON and no ``example_inputs=``), or
    state dicts instead of modules, that check cannot run and a warning says so.

    ``progress``: a callable such as ``print`` is given one line per stage (spec inference,
    each model's matching in each round, verification, repair); True or False print nothing
    (the matchers' own progress bars stay off).
    """
    from .match.activation import activation_matching
    from .match.weight import weight_matching
    from .permute import apply_permutation, identity_permutation

    say = progress if callable(progress) else (lambda line: None)
    if method not in ("weight", "activation"):
        raise ValueError(f"merge_many supports method='weight' or 'activation' (got {method!r})")
    check_repair_option(repair)
    if repair is not None and data is None:
        raise ValueError(f"repair={repair!r} needs data=<batches>")
    from .guard import unwrap_model
    models = [unwrap_model(m) if isinstance(m, nn.Module) else m for m in models]
    if len(models) < 2:
        raise ValueError("merge_many needs at least two models")
    as_modules = all(isinstance(m, nn.Module) for m in models)
    sds = [m.state_dict() if isinstance(m, nn.Module) else dict(m) for m in models]
    for i, sd in enumerate(sds[1:], 1):
        try:
            check_compatible(sds[0], sd)
        except ValueError as e:
            raise ValueError(f"model {i} does not match model 0: {e}") from None
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights) or len(weights) != len(models):
        raise ValueError("weights must be one non-negative number per model, not all zero")
    weights = [float(w) / total for w in weights]
    if method == "activation" and (data is None or not as_modules):
        raise ValueError("method='activation' needs nn.Modules and data=<batches>")
    traced = None
    if spec is None:
        if not as_modules:
            raise ValueError("pass spec= when merging state dicts")
        from .infer import trace_model
        say("inferring the spec ...")
        t0 = time.perf_counter()
        traced = trace_model(models[0], example_inputs, symmetries=symmetries)
        spec = traced.spec
        say(f"inferred the spec in {time.perf_counter() - t0:.1f} s: {len(spec.groups)} groups")
        if example_inputs is None:
            example_inputs = traced.example_inputs  # to verify with
    for i, sd in enumerate(sds):
        spec.check_fits(sd, f"model {i}'s state_dict")
    if spec.is_general and method != "weight":
        raise NotImplementedError("merge_many aligns groups beyond permutations by weight "
                                  "matching only: use method='weight'")

    if method == "activation" and traced is None and example_inputs is not None:
        from .infer import trace_model  # captured once, not once per visit
        traced = trace_model(models[0], example_inputs, capture=spec.capture or "auto",
                             outputs=spec.outputs)
    # activation matching runs the mean of the others as a model: one copy, reloaded per visit
    mean_model = copy.deepcopy(models[0]) if method == "activation" else None
    perms = [identity_permutation(spec) for _ in models]
    aligned = list(sds)
    gen = torch.Generator().manual_seed(seed)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for i in torch.randperm(len(models), generator=gen).tolist():
            others = [j for j in range(len(models)) if j != i]
            w_others = [weights[j] for j in others]
            norm = sum(w_others)
            w_others = [w / norm for w in w_others] if norm > 0 else [1 / len(others)] * len(others)
            target = average([aligned[j] for j in others], w_others)
            # first visit: weight matching's default start (solves each group
            # best-determined first); later visits warm-start from the last answer
            visit_seed = seed + rounds * 1000 + i
            say(f"round {rounds}: matching model {i} to the mean of the others")
            if method == "weight" and spec.is_general:
                from .match.general import general_weight_matching
                new = general_weight_matching(spec, target, sds[i], seed=visit_seed)
            elif method == "weight":
                start = "greedy" if rounds == 1 else perms[i]
                new = weight_matching(spec, target, sds[i], seed=visit_seed, init=start,
                                      progress=False)
            else:
                mean_model.load_state_dict(target)
                new = activation_matching(spec, mean_model, models[i], data, seed=visit_seed,
                                          num_batches=num_batches, progress=False, traced=traced)
            if any(new[g].shape != perms[i][g].shape or not torch.allclose(
                    new[g].double(), perms[i][g].double(), atol=1e-9) for g in new):
                changed = True
            perms[i] = new
            aligned[i] = apply_permutation(spec, new, sds[i])
        if not changed:
            break
    if as_modules and example_inputs is not None:
        say(f"verifying the {len(models)} aligned models")
    errors = _verify_aligned(models, aligned, spec, example_inputs) if as_modules else None
    if not as_modules:
        warnings.warn("merge_many merged state dicts: the aligned models were not verified to "
                      "compute what their sources compute (only that the spec fits them); pass "
                      "nn.Modules and example_inputs=... to verify", stacklevel=2)
    merged_sd = average(aligned, weights)
    if stats is not None:
        stats.update(rounds=rounds, perms=perms)
        if errors is not None:
            stats["verify_errors"] = errors
    if not as_modules:
        return merged_sd
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(merged_sd)
    if data is None:
        return merged
    from .repair import repair as repair_model
    from .repair import reset_bn_stats
    say("recomputing BatchNorm statistics" if repair in (None, "reset_bn") else
        f"{repair}: setting the merged model's channel statistics")
    if repair in (None, "reset_bn"):
        return reset_bn_stats(merged, data, num_batches=num_batches)
    endpoints = []
    for model, sd in zip(models, aligned):
        endpoint = copy.deepcopy(model)
        endpoint.load_state_dict(sd)
        endpoints.append(endpoint)
    return repair_model(merged, endpoints, data, alphas=weights, mode=repair,
                        num_batches=num_batches)
