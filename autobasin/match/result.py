"""What a matcher returns: the permutations, and a typed account of how it found them.

A :class:`Matching` *is* the mapping ``{group: LongTensor (n,)}`` (so it goes
straight into :func:`~autobasin.permute.apply_permutation`, :func:`~autobasin.io.save_perms`
or ``dict(...)``), and carries the matcher's figures as attributes. Each matcher has
its subclass with the fields it reports; :meth:`Matching.as_dict` flattens them for
logs and JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch


@dataclass(eq=False)
class Matching(Mapping[str, torch.Tensor]):
    """Permutations by group (``result[group]``, iteration, ``len``) and how they were found.

    ``sweeps``: coordinate-descent sweeps (0 when the matcher did not descend);
    ``converged``: the last sweep changed nothing (or met the tolerance);
    ``seconds``: wall time of the whole call.
    """

    perms: dict[str, torch.Tensor]
    method: str = ""
    sweeps: int = 0
    converged: bool = True
    seconds: float = 0.0

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.perms[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self.perms)

    def __len__(self) -> int:
        return len(self.perms)

    def __repr__(self) -> str:
        figures = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()
                            if isinstance(v, (int, float, str, bool)) and k != "method")
        return f"{type(self).__name__}({len(self)} groups, {figures})"

    def as_dict(self) -> dict[str, Any]:
        """Every field but ``perms`` (nested results as dicts), e.g. for JSON."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "perms":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.as_dict() if isinstance(value, Matching) else value
        return out


@dataclass(eq=False, repr=False)
class WeightMatching(Matching):
    """:func:`~autobasin.match.weight.weight_matching`'s result.

    ``objective``: ``sum_T <A_T, P(B_T)>`` at the end (the paper's objective,
    over the tensors that count, see ``match_buffers``); ``initial_objective``
    at the start of descent, after the initialisation; ``objective_history``
    after each sweep, and ``sweep_seconds`` the time since the call began when
    the initialisation ended (first entry) and when each sweep ended.
    ``starts`` (``init="best"``): ``{"greedy": objective, "identity":
    objective or None when not run}``. ``optimal_by_bound``: the start reached
    the bound ``||A|| ||B||`` no permutation exceeds, so descent was cut short.
    ``init``: ``"greedy"``, ``"identity"`` or ``"given"``; ``init_order``: the
    groups in the order the greedy solved them. Seconds spent initialising,
    forming similarities and solving assignments (the latter two include the
    initialisation's).
    """

    objective: float = 0.0
    initial_objective: float = 0.0
    objective_history: list[float] = field(default_factory=list)
    sweep_seconds: list[float] = field(default_factory=list)
    starts: dict[str, float | None] | None = None
    optimal_by_bound: bool = False
    init: str = "identity"
    init_order: list[str] = field(default_factory=list)
    init_seconds: float = 0.0
    similarity_seconds: float = 0.0
    lap_seconds: float = 0.0


@dataclass(eq=False, repr=False)
class ActivationMatching(Matching):
    """:func:`~autobasin.match.activation.activation_matching`'s result.

    ``activation_groups``: groups matched on activations; ``fallback_groups``:
    those matched by weight matching instead (no usable activation), whose
    result is ``weight_matching``; ``entries``: activation grids used;
    ``nodes``: graph values used, ``group_nodes`` per group; ``levels``: the
    kind of activation each group used (1: input of a parametrised op, 2: its
    output, 3: any other value); ``matched_similarity``: per group, the mean
    similarity of matched units averaged over its entries; ``batches`` and
    ``samples`` read; ``skipped_batches``: batches left out because their shapes
    differ from those a torch.export graph was captured at. ``sweeps``:
    coordinate descent on structured grids.
    """

    activation_groups: int = 0
    fallback_groups: list[str] = field(default_factory=list)
    entries: int = 0
    nodes: list[str] = field(default_factory=list)
    group_nodes: dict[str, list[str]] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    matched_similarity: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    skipped_batches: int = 0
    weight_matching: WeightMatching | None = None


@dataclass(eq=False, repr=False)
class STEMatching(Matching):
    """:func:`~autobasin.match.ste.ste_matching`'s result.

    ``steps`` and ``epochs`` taken; ``loss_history``: the midpoint loss of each
    step's batch; ``eval_history``: ``(step, eval loss)`` of each scored
    candidate (step 0 is weight matching, whose loss is also
    ``weight_matching_eval_loss``); the returned permutation's ``best_eval_loss``
    and ``best_step``; ``perm_changes``: steps whose permutation differed from the
    previous step's; ``eval_samples`` in the evaluation slice.
    """

    steps: int = 0
    epochs: int = 0
    loss_history: list[float] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    weight_matching_eval_loss: float = 0.0
    best_eval_loss: float = 0.0
    best_step: int = 0
    perm_changes: int = 0
    eval_samples: int = 0


def fill_stats(stats: dict | None, result: Matching) -> None:
    """The ``stats=`` argument the matchers kept for compatibility: filled from ``result``."""
    if stats is not None:
        stats.update(result.as_dict())
