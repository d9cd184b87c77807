"""Matchers: find the permutations that align model B to model A.

Each matcher is a :class:`Matcher` record in :data:`MATCHERS`, which
:func:`autobasin.auto_rebasin`, :func:`autobasin.merge_many` and the command
line's ``--method`` read. A record's ``run(spec, a, b, data, *, seed, progress,
**kw)`` takes the two models and returns a :class:`~autobasin.match.result.Matching`.
Register another one with :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from ..spec import PermutationSpec
from .activation import activation_matching
from .general import (GeneralMatching, general_activation_matching, general_ste_matching,
                      general_weight_matching)
from .lap import solve_lap
from .result import ActivationMatching, Matching, STEMatching, WeightMatching
from .ste import ste_matching
from .weight import weight_matching


@dataclass(frozen=True)
class Matcher:
    """A matching method: its name, how to run it, and what it needs.

    ``needs_data``: the method reads batches (activation, STE), so callers
    refuse to run it without ``data``. ``takes_traced``: ``run`` accepts the
    :class:`~autobasin.infer.TracedModel` as ``traced=`` (activation matching
    reads its activation sites from it). ``runs_on_a``: the method computes
    where model A is and takes no ``device=``.
    """

    name: str
    run: Callable[..., Matching]
    needs_data: bool
    takes_traced: bool = False
    runs_on_a: bool = False
    summary: str = ""


MATCHERS: dict[str, Matcher] = {}


def register(matcher: Matcher) -> Matcher:
    """Add ``matcher`` to :data:`MATCHERS` under its name (replacing one of that name)."""
    MATCHERS[matcher.name] = matcher
    return matcher


def _weight(spec: PermutationSpec, a: nn.Module, b: nn.Module, data: Iterable | None, *,
            seed: int = 0, progress: bool = True, **kw: Any) -> WeightMatching | GeneralMatching:
    if spec.is_general:  # groups beyond permutations: the distance-minimising descent
        return general_weight_matching(spec, a.state_dict(), b.state_dict(), seed=seed,
                                       max_iter=kw.get("max_iter", 100), tol=kw.get("tol", 1e-9),
                                       match_buffers=kw.get("match_buffers", False))
    return weight_matching(spec, a.state_dict(), b.state_dict(), seed=seed, progress=progress, **kw)


def _activation(spec: PermutationSpec, a: nn.Module, b: nn.Module, data: Iterable | None, *,
                seed: int = 0, progress: bool = True, **kw: Any
                ) -> ActivationMatching | GeneralMatching:
    if spec.is_general:  # groups beyond permutations: statistics of layer outputs
        return general_activation_matching(spec, a, b, data, batches=kw.get("num_batches"),
                                           seed=seed, max_iter=kw.get("max_iter", 100),
                                           general_from=kw.get("general_from", "weights"))
    return activation_matching(spec, a, b, data, seed=seed, progress=progress, **kw)


def _ste(spec: PermutationSpec, a: nn.Module, b: nn.Module, data: Iterable | None, *,
         seed: int = 0, progress: bool = True, **kw: Any) -> STEMatching | GeneralMatching:
    if spec.is_general:  # the continuous groups learned on the midpoint's loss
        return general_ste_matching(spec, a, b, data, seed=seed, **kw)
    path = kw.pop("path", "midpoint")
    if path != "midpoint":
        raise ValueError(f"path={path!r} applies to STE with symmetries beyond permutations "
                         "(symmetries='all' and the like); permutation STE trains at the midpoint")
    return ste_matching(spec, a, b, data, seed=seed, progress=progress, **kw)


register(Matcher("weight", _weight, needs_data=False,
                 summary="weight matching: maximise the inner product of the weights"))
register(Matcher("activation", _activation, needs_data=True, takes_traced=True,
                 summary="activation matching: correlate hidden activations on data"))
register(Matcher("ste", _ste, needs_data=True, runs_on_a=True,
                 summary="straight-through estimator: learn the permutation whose midpoint "
                         "has low loss"))

__all__ = ["MATCHERS", "Matcher", "register", "solve_lap", "weight_matching",
           "activation_matching", "ste_matching", "Matching", "WeightMatching",
           "ActivationMatching", "STEMatching", "general_weight_matching", "general_activation_matching", "general_ste_matching",
           "GeneralMatching"]
