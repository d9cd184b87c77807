"""Example inputs as one value: positional and keyword arguments of ``forward``.

A user may give a model's example inputs as a tensor, a tuple (or list) of
positional inputs, or a dict of keyword inputs (``{"input_ids": ids,
"attention_mask": mask}`` for a Hugging Face model). :func:`as_inputs` turns
any of these into a :class:`ModelInputs`, which knows how to call a model,
move or cast its tensors, and flatten them. Flattening uses torch's pytree
utilities (``torch.utils._pytree``), the same that torch.export uses, rather
than a walker of our own.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from .guard import eval_mode


@contextmanager
def seeded_rng(model: nn.Module, seed: int = 0):
    """Seed torch's random generators (CPU, and the CUDA devices ``model`` is on)
    with ``seed`` for the block, and restore their states after it."""
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers())
                   if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class ModelInputs:
    """``model(*args, **kwargs)``: what a model is called with."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def call(self, model: Callable) -> Any:
        return model(*self.args, **self.kwargs)

    def call_seeded(self, model: nn.Module, seed: int = 0) -> Any:
        """:meth:`call` under :func:`seeded_rng`: two models run this way draw the
        same random numbers (a sampled mask, noise), so a comparison of their
        outputs sees only what their weights compute."""
        with seeded_rng(model, seed):
            return self.call(model)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ModelInputs":
        """A copy with ``fn`` applied to every tensor (nested containers too)."""
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, dict(self.kwargs)))
        return ModelInputs(tuple(args), kwargs)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Tensors moved to ``device``; floating tensors cast to ``dtype``."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t
        return self.map_tensors(move)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]

    def describe(self) -> str:
        """Shapes of the inputs, for error messages: ``[(2, 8)], input_ids=(2, 8)``."""
        def shape(v):
            return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
        parts = [shape(a) for a in self.args] + [f"{k}={shape(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def as_inputs(example_inputs: Any, model: nn.Module | None = None) -> ModelInputs:
    """Normalise example inputs: a tensor, a tuple/list of positional inputs,
    a dict of keyword inputs, or a :class:`ModelInputs`.

    Given the ``model``, a forward that takes ``use_cache`` (Hugging Face
    models) is called with ``use_cache=False`` unless the caller set it: a
    key/value cache is state for generation, not part of what the model
    computes, and it cannot be captured or compared as a tensor output.
    """
    if example_inputs is None:
        raise ValueError("example inputs are needed")
    if isinstance(example_inputs, ModelInputs):
        inputs = example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        inputs = ModelInputs((example_inputs,))
    elif isinstance(example_inputs, (tuple, list)) and not hasattr(example_inputs, "_fields"):
        inputs = ModelInputs(tuple(example_inputs))
    elif isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("keyword inputs need string keys (forward's parameter names)")
        inputs = ModelInputs((), dict(example_inputs))
    else:
        inputs = ModelInputs((example_inputs,))
    if model is not None and "use_cache" not in inputs.kwargs and _takes(model, "use_cache"):
        inputs = ModelInputs(inputs.args, {**inputs.kwargs, "use_cache": False})
    return inputs


def _takes(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def positional(model: nn.Module, inputs: ModelInputs) -> tuple | None:
    """The inputs as positional arguments in forward's order, when every
    keyword names a positional parameter and the parameters skipped between
    them have defaults (which are then passed); None otherwise."""
    if not inputs.kwargs:
        return inputs.args
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in positional_kinds]
    if any(k not in names for k in inputs.kwargs):
        return None
    last = max(names.index(k) for k in inputs.kwargs)
    if last < len(inputs.args) - 1 or any(names.index(k) < len(inputs.args) for k in inputs.kwargs):
        return None
    out = list(inputs.args)
    for p in params[len(inputs.args):last + 1]:
        if p.name in inputs.kwargs:
            out.append(inputs.kwargs[p.name])
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            return None
    return tuple(out)


def select_output(value: Any, key: Any) -> Any:
    """``value[key]`` for a dict, ``ModelOutput`` or sequence; a dataclass's
    field ``key``. Raises ``KeyError`` naming what there is."""
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        if key in value.keys():
            return value[key]
        raise KeyError(f"the model's output has no {key!r}; it has {list(value.keys())}")
    if isinstance(value, (list, tuple)) and isinstance(key, int):
        if -len(value) <= key < len(value):
            return value[key]
        raise KeyError(f"the model's output has {len(value)} entries, not index {key}")
    if hasattr(value, key if isinstance(key, str) else ""):
        return getattr(value, key)
    raise KeyError(f"cannot select {key!r} from a {type(value).__name__} output")


def select_outputs(value: Any, keys: Sequence | None) -> Any:
    """The outputs named by ``keys`` (all of ``value`` when None), as a list."""
    return value if keys is None else [select_output(value, k) for k in keys]


def run_naming_layer(model: nn.Module, inputs: "tuple | ModelInputs"
                     ) -> tuple[str, Exception] | None:
    """Run ``model(*inputs)`` (``inputs.call(model)`` for :class:`ModelInputs`) in eval
    mode without grad; None when it runs, else the qualified name of the innermost module
    that was running ("" for the top level) and the exception. The modules' train/eval modes
    are restored."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []
    failed: list[str] = []

    def enter(module, args):
        running.append(names.get(module, ""))

    def leave(module, args, output):
        running.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names] + \
        [m.register_forward_hook(leave) for m in names]
    try:
        with eval_mode(model), torch.no_grad():
            if isinstance(inputs, ModelInputs):
                inputs.call(model)
            else:
                model(*inputs)
        return None
    except Exception as e:  # noqa: BLE001 - the caller reports it
        failed.extend(running)
        return (failed[-1] if failed else ""), e
    finally:
        for h in hooks:
            h.remove()
