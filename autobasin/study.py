"""Barrier studies: many checkpoint pairs, several alignment methods, one tidy table.

The experiments of Git Re-Basin's width and training-time studies are all the
same loop: for each pair of models (two seeds at one width, two checkpoints at
one epoch, ...), align B to A by each method and measure the loss along the
straight line between them. :func:`barrier_study` runs that loop with a progress
bar and returns a :class:`StudyTable`: one :class:`StudyRow` per (pair, method),
which summarises over pairs (mean and spread), prints as markdown, saves as
JSON records, and plots a barrier against whatever the pairs vary in::

    pairs = [({"width": w, "seeds": (s, t)}, models[w, s], models[w, t])
             for w in widths for s, t in itertools.combinations(seeds, 2)]
    table = autobasin.barrier_study(pairs, heldout, methods=("naive", "weight"))
    print(table.to_markdown(by="width"))
    table.plot("width", path="width.png")

A method is ``"naive"`` (no alignment), a matcher name of
:func:`autobasin.auto_rebasin` (``"weight"``, ``"activation"``, ``"ste"``), either with
``"+repair"``, ``"+rescale"`` or ``"+reset_bn"`` to repair every point of the path
(:func:`autobasin.loss_barrier`'s ``repair``), or any name mapped to a callable
``(a, b) -> aligned b``. Models may be given as zero-argument callables that load
them, so a study over many checkpoints holds only one pair at a time.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .barrier import BarrierResult, loss_barrier
from .repair import check_repair_option

__all__ = ["StudyRow", "StudyTable", "barrier_study"]

ModelOrLoader = nn.Module | Callable[[], nn.Module]
Aligner = Callable[[nn.Module, nn.Module], nn.Module]


#: a row's numbers, in the order its record lists them (all but ``seconds`` read from the curve)
NUMBERS = ("barrier", "barrier_linear", "midpoint_loss", "midpoint_accuracy", "loss_a", "loss_b", "seconds")


@dataclass
class StudyRow:
    """One pair aligned by one method, and the loss along the path between them.

    ``key`` says what the pair is (``{"width": 64, "seeds": (0, 1)}``); ``curve`` is
    the path's :class:`~autobasin.barrier.BarrierResult`, whose ``barrier`` (the
    paper's height: highest loss minus the endpoints' mean), ``barrier_linear``
    (the height above the chord between the endpoints' losses) and midpoint values
    the row reads; ``loss_a`` / ``loss_b`` are the endpoints' losses; ``seconds`` is
    the alignment's wall-clock time (0 for ``naive``).
    """

    key: dict[str, Any]
    method: str
    curve: BarrierResult = field(repr=False)
    seconds: float = 0.0

    barrier = property(lambda self: self.curve.barrier)
    barrier_linear = property(lambda self: self.curve.barrier_linear)
    midpoint_loss = property(lambda self: self.curve.midpoint_loss)
    midpoint_accuracy = property(lambda self: self.curve.midpoint_accuracy)
    loss_a = property(lambda self: self.curve.losses[self.curve.lambdas.index(0.0)])
    loss_b = property(lambda self: self.curve.losses[self.curve.lambdas.index(1.0)])

    def __repr__(self) -> str:
        return (f"StudyRow(key={self.key}, method={self.method!r}, barrier={self.barrier:.4g}, "
                f"barrier_linear={self.barrier_linear:.4g}, seconds={self.seconds:.3g})")

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict: the key's entries, the method, the numbers, then the curve."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.key.items()}
        out["method"] = self.method
        out.update({k: getattr(self, k) for k in NUMBERS})
        out["lambdas"], out["losses"] = self.curve.lambdas, self.curve.losses
        out["accuracies"] = self.curve.accuracies
        return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class StudyTable(list):
    """The rows of a :func:`barrier_study`, in the order they were measured."""

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self))

    def summary(self, by: str | Sequence[str], height: str = "barrier") -> list[dict[str, Any]]:
        """Mean, std, min, max and count of ``height`` over the rows that share the
        values of ``by`` (key names) and a method; one dict per (group, method), in
        first-seen order."""
        by = [by] if isinstance(by, str) else list(by)
        groups: dict[tuple, list[StudyRow]] = {}
        for row in self:
            missing = [k for k in by if k not in row.key]
            if missing:
                raise KeyError(f"row {row.key} has no key {missing[0]!r} to group by")
            groups.setdefault((tuple(_hashable(row.key[k]) for k in by), row.method), []).append(row)
        out = []
        for (values, method), rows in groups.items():
            entry = dict(zip(by, values))
            entry["method"] = method
            entry.update(_stats([getattr(r, height) for r in rows]))
            out.append(entry)
        return out

    def to_markdown(self, by: str | Sequence[str], heights: Sequence[str] = ("barrier", "barrier_linear"),
                    digits: int = 4) -> str:
        """A table with one line per value of ``by``, one column per (method,
        height): the mean over pairs, with min–max when there are several."""
        by = [by] if isinstance(by, str) else list(by)
        methods = self.methods()
        cells: dict[tuple, dict[tuple[str, str], dict]] = {}
        for height in heights:
            for entry in self.summary(by, height):
                cells.setdefault(tuple(entry[k] for k in by), {})[(entry["method"], height)] = entry
        names = {"barrier": "barrier", "barrier_linear": "above chord", "midpoint_loss": "midpoint loss"}
        header = [*by, "pairs", *(f"{m} {names.get(h, h)}" for m in methods for h in heights)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(by) + "---:|" * (len(header) - len(by))]
        for values, row in cells.items():
            n = max(e["n"] for e in row.values())
            parts = [str(v) for v in values] + [str(n)]
            for m in methods:
                for h in heights:
                    e = row.get((m, h))
                    if e is None:
                        parts.append("")
                    elif e["n"] > 1:
                        parts.append(f"{e['mean']:.{digits}f} ({e['min']:.{digits}f}–{e['max']:.{digits}f})")
                    else:
                        parts.append(f"{e['mean']:.{digits}f}")
            lines.append("| " + " | ".join(parts) + " |")
        return "\n".join(lines)

    def records(self) -> list[dict[str, Any]]:
        return [row.record() for row in self]

    def save(self, path) -> None:
        """Write :meth:`records` as JSON."""
        with open(path, "w") as f:
            json.dump(self.records(), f, indent=1)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> "StudyTable":
        """The table :meth:`records` (or :meth:`save`, read back with ``json.load``)
        describes: entries that are not a row's fields form the key; a record
        without ``accuracies`` gets None."""
        fields = {"method", *NUMBERS, "lambdas", "losses", "accuracies"}
        table = cls()
        for r in records:
            curve = BarrierResult(lambdas=list(r["lambdas"]), losses=list(r["losses"]),
                                  accuracies=r.get("accuracies"), barrier=r["barrier"],
                                  barrier_linear=r["barrier_linear"], midpoint_loss=r["midpoint_loss"],
                                  midpoint_accuracy=r.get("midpoint_accuracy"))
            table.append(StudyRow(key={k: _hashable(v) for k, v in r.items() if k not in fields},
                                  method=r["method"], curve=curve, seconds=r.get("seconds", 0.0)))
        return table

    def plot(self, x: str, path=None, height: str = "barrier", title: str | None = None,
             logx: bool = True, ax=None):
        """``height`` against key ``x``, one line per method: the mean over pairs,
        with a band from the lowest to the highest pair. Returns the figure (a
        standalone Agg figure unless ``ax`` is given) and saves it to ``path``."""
        fig = None
        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            fig = Figure(figsize=(5.5, 3.8))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
        for method in self.methods():
            entries = [e for e in self.summary(x, height) if e["method"] == method]
            entries.sort(key=lambda e: e[x])
            xs = [e[x] for e in entries]
            line, = ax.plot(xs, [e["mean"] for e in entries], marker="o", markersize=4, label=method)
            if any(e["n"] > 1 for e in entries):
                ax.fill_between(xs, [e["min"] for e in entries], [e["max"] for e in entries],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        xs = sorted({e[x] for e in self.summary(x, height)})
        if logx:
            ax.set_xscale("symlog" if xs[0] <= 0 else "log")
        if len(xs) <= 8:  # few values: a tick at each, written plainly (16, not 1.6 x 10^1)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:g}" for v in xs])
            ax.minorticks_off()
        ax.set_xlabel(x)
        ax.set_ylabel({"barrier": "loss barrier", "barrier_linear": "height above chord"}.get(height, height))
        if title:
            ax.set_title(title)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.grid(alpha=0.3)
        ax.legend()
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
        return fig if fig is not None else ax.figure


def _materialize(model: ModelOrLoader) -> nn.Module:
    return model if isinstance(model, nn.Module) else model()


def _signature(model: nn.Module) -> tuple:
    return (type(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def _parse_method(method: str, aligners: Mapping[str, Aligner]) -> tuple[str, str | None]:
    from .match import MATCHERS

    base, _, repair = method.partition("+")
    if repair:
        check_repair_option(repair)
    if base != "naive" and base not in MATCHERS and base not in aligners:
        raise ValueError(f"unknown method {method!r}: use 'naive', one of {sorted(MATCHERS)} "
                         f"or a name mapped to a callable, optionally with '+repair', "
                         f"'+rescale' or '+reset_bn'")
    return base, repair or None


def barrier_study(pairs: Iterable[tuple[Mapping[str, Any], ModelOrLoader, ModelOrLoader]],
                  data: Iterable, methods: Sequence[str] | Mapping[str, Aligner] = ("naive", "weight"),
                  *, example_inputs=None, match_data: Iterable | None = None,
                  repair_data: Iterable | None = None, lambdas: int | Sequence[float] = 25,
                  loss_fn: Callable | None = None, device: torch.device | str | None = None,
                  seed: int = 0, progress: bool = True, **matcher_kwargs: Any) -> StudyTable:
    """Align each pair by each method and measure the loss barrier on ``data``.

    Args:
        pairs: ``(key, a, b)`` triples; ``key`` is a dict of what identifies the pair
            (its values become table columns), ``a`` and ``b`` are models or
            zero-argument callables returning them (loaded when the pair's turn comes).
        data: evaluation batches (e.g. held-out), as for :func:`autobasin.loss_barrier`.
        methods: names (see the module docstring), or a mapping from names to
            callables ``(a, b) -> aligned b`` (names of built-in methods may be mixed
            in as values: ``{"wm": "weight"}``).
        example_inputs: inputs to trace with; the spec is inferred once per
            architecture (same model type and state_dict shapes) and reused.
        match_data: batches for activation matching and STE (typically training data).
        repair_data: batches for ``+repair`` methods (default ``match_data``).
        seed, matcher_kwargs: passed to :func:`autobasin.auto_rebasin`.

    Returns:
        a :class:`StudyTable`, one row per (pair, method). Every model a built-in
        method aligns is verified by :func:`autobasin.auto_rebasin` to compute what its
        B computes; a custom callable's result is measured as it is given.
    """
    from .api import auto_rebasin

    if isinstance(methods, Mapping):
        named = dict(methods)
    else:
        named = {m: m for m in methods}
    custom = {n: f for n, f in named.items() if callable(f)}
    parsed = {n: (n, None) if callable(f) else _parse_method(f, custom) for n, f in named.items()}
    repair_data = repair_data if repair_data is not None else match_data
    from .match import MATCHERS
    for name, (base, repair) in parsed.items():
        if base in MATCHERS and MATCHERS[base].needs_data and match_data is None:
            raise ValueError(f"method {name!r} needs match_data=<batches>")
        if repair is not None and repair_data is None:
            raise ValueError(f"method {name!r} needs repair_data (or match_data) for {repair!r}")
    pairs = list(pairs)
    specs: dict[tuple, Any] = {}
    table = StudyTable()
    bar = tqdm(total=len(pairs) * len(named), desc="barrier study", disable=not progress)
    for key, a, b in pairs:
        a, b = _materialize(a), _materialize(b)
        aligned: dict[str, tuple[nn.Module, float]] = {}
        for name, (base, repair) in parsed.items():
            bar.set_postfix_str(f"{dict(key)} {name}")
            if base not in aligned:
                t0 = time.perf_counter()
                if base == "naive":
                    aligned[base] = (b, 0.0)
                elif base in custom:
                    aligned[base] = (custom[base](a, b), time.perf_counter() - t0)
                else:
                    sig = _signature(a)
                    result = auto_rebasin(a, b, example_inputs=example_inputs, method=base,
                                          data=match_data, seed=seed, spec=specs.get(sig),
                                          progress=False, device=device, **matcher_kwargs)
                    specs[sig] = result.spec
                    aligned[base] = (result.model, time.perf_counter() - t0)
            model_b, seconds = aligned[base]
            curve = loss_barrier(a, model_b, data, lambdas=lambdas, loss_fn=loss_fn, device=device,
                                 progress=False, repair=repair, repair_data=repair_data)
            table.append(StudyRow(key=dict(key), method=name, curve=curve, seconds=seconds))
            bar.update()
    bar.close()
    return table
