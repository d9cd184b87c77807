"""Fold normalisation gains into the layers that read them: an equivalent model
whose residual stream admits orthogonal maps.

An RMS norm ``g * x / rms(x)`` admits only permutations of its axis, because of
the gain ``g`` (an entrywise product); without it, any orthogonal map ``R``
passes (``rms(R x) = rms(x)``). When the norm's output is read only by linear
layers, ``W (g * n + b) = (W diag(g)) n + W b``: the gain (and a LayerNorm's
bias) move into those layers, and the norm becomes :class:`GainlessRMSNorm`.
A LayerNorm also centres its input, which only maps fixing the all-ones
direction keep; with ``center=True`` every writer into its stream (the
members of the stream's group on the side of the stream's values: embedding
rows, output rows and biases of the layers adding to it) has its mean along
the stream removed, so the stream is centred wherever a norm reads it, and
the LayerNorm equals an RMS norm with the same epsilon.

A LayerScale (a module computing ``x * gamma`` over the last axis right after a
linear layer, whose output nothing else takes) is folded into that layer's rows
first, so the stream's writers are plain linear layers that centring reaches.

Which layers read a norm's output is seen by running the model once with
hooks (the output tensor handed to a module's forward); gains and biases are
measured on that run (``y = g * n(x) + b`` fitted channel by channel and
checked), so variants such as Gemma's ``(1 + w)`` need no special case.
Everything ends with a check by function: the folded model must compute what
the model computes on the example inputs (else :class:`FoldError`, naming the
norms). A norm whose output reaches anything but linear layers, whose reader
shares its weight with another layer (a tied head), or whose form is not
``g * n(x) + b`` is left as it is, with a warning naming it.
"""
from __future__ import annotations

import copy
import re
import warnings

import torch
from torch import nn

from .guard import eval_mode
from .inputs import as_inputs
from .permute import relative_error

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


class FoldError(RuntimeError):
    """Folding changed what the model computes."""


class GainlessRMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, computed in float32 at
    least (as Hugging Face's RMS norms do), returned in the input's dtype."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x):
        dtype = x.dtype
        y = x.to(torch.promote_types(dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def _norm_kind(module: nn.Module) -> str | None:
    """"rms" / "layer" for a norm over the last axis with a 1-D gain, else None."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layer"
    if isinstance(module, nn.RMSNorm) and len(module.normalized_shape) == 1:
        return "rms"
    name = type(module).__name__
    if _eps(module) is None:
        return None
    if re.search(r"RMSNorm$", name):
        return "rms"
    if re.search(r"LayerNorm$", name):
        return "layer"
    return None


def _eps(module: nn.Module) -> float | None:
    for n in _EPS_NAMES:
        v = getattr(module, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    if isinstance(module, nn.RMSNorm):
        return float(module.eps) if module.eps is not None else torch.finfo(torch.float32).eps
    return None


def _normalised(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    x = x.double()
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _fit_affine(x: torch.Tensor, y: torch.Tensor, kind: str, eps: float):
    """``(g, b)`` with ``y = g * n(x) + b`` channel by channel, or None when that
    form does not hold (relative residual above 1e-4)."""
    n = _normalised(x, kind, eps).reshape(-1, x.shape[-1])
    yy = y.double().reshape(-1, y.shape[-1])
    nm, ym = n.mean(0), yy.mean(0)
    nc, yc = n - nm, yy - ym
    g = (nc * yc).sum(0) / (nc * nc).sum(0).clamp_min(1e-300)
    b = ym - g * nm
    fit = g * n + b
    if float((fit - yy).norm()) > 1e-4 * float(yy.norm()) + 1e-12:
        return None
    return g, b


def _readers(model: nn.Module, inputs, norms: dict[str, nn.Module]):
    """Run once; per norm: its calls' (input, output) and the leaf modules handed
    its output or a view of it (a tensor sharing its storage: the outputs are
    kept alive while the model runs, so their storage is not reused)."""
    seen: dict[str, list] = {n: [] for n in norms}
    live: dict[int, str] = {}  # storage of a norm's output -> the norm (views share it)
    readers: dict[str, set[str]] = {n: set() for n in norms}
    hooks = []
    names = {id(m): n for n, m in model.named_modules()}

    def on_norm(name):
        def hook(_m, args, out):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen[name].append((args[0].detach(), out))
                live[out.untyped_storage().data_ptr()] = name
        return hook

    def on_call(m, args, kwargs):
        if next(m.children(), None) is not None:
            return  # a container: what it does with the tensor its children show
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in live:
                readers[live[a.untyped_storage().data_ptr()]].add(names.get(id(m), "?"))

    for n, m in norms.items():
        hooks.append(m.register_forward_hook(on_norm(n)))
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(on_call, with_kwargs=True))
    _run_hooked(model, inputs, hooks)
    return {n: (seen[n], sorted(readers[n])) for n in norms}


def _run_hooked(model: nn.Module, inputs, hooks: list) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no grad), then remove ``hooks``."""
    try:
        with torch.no_grad(), eval_mode(model):
            inputs.call_seeded(model)
    finally:
        for h in hooks:
            h.remove()


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def fold_norms(model: nn.Module, example_inputs, center: bool = True, untie: bool = False,
               rtol: float = 1e-5) -> nn.Module:
    """An equivalent copy of ``model`` whose norms carry no gain (see the module
    docstring); ``model`` is untouched.

    Args:
        model: a model whose norms (``nn.LayerNorm``, ``nn.RMSNorm``, and any
            module named ``...RMSNorm`` / ``...LayerNorm`` with a 1-D ``weight``
            and an ``eps`` / ``variance_epsilon``) normalise the last axis.
        example_inputs: what the model is called with (tensor, tuple or dict);
            the norms' readers are seen, and the result checked, on them.
        center: also turn LayerNorms into RMS norms by centring the writers of
            their streams (inferring the model's spec to find them).
        untie: give a reader that shares its weight (an output head tied to the
            embedding) its own copy, so the final norm can fold into it; without
            it such a norm is left as it is. Likewise a stream's writer shared with
            another layer (the same tied embedding, for ``center``): with ``untie``
            the other layer gets its own copy and the stream is centred; without
            it the LayerNorms of that stream fold their gains but keep centring
            (``nn.LayerNorm`` without affine; the stream then admits permutations,
            not orthogonal maps).
        rtol: the largest relative error of the outputs allowed.

    Returns the folded copy (its state_dict lacks the folded norms' and layer
    scales' tensors; a reader that had no bias gains one when the norm had one);
    ``folded_norms`` and ``folded_scales`` name what was folded. Fold both models
    before aligning them: ``auto_rebasin(fold_norms(a, x), fold_norms(b, x), x,
    symmetries="all")``.
    """
    inputs = as_inputs(example_inputs, model)
    new = copy.deepcopy(model).eval()
    scales = _fold_layer_scales(new, inputs)
    norms = {n: m for n, m in new.named_modules() if _norm_kind(m) is not None}
    modules = dict(new.named_modules())
    shared = {}
    for _, p in new.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    skipped: dict[str, str] = {}
    folded: dict[str, tuple[str, float]] = {}
    for name, (calls, readers) in _readers(new, inputs, norms).items():
        m = norms[name]
        kind, eps = _norm_kind(m), _eps(m)
        if not calls:
            skipped[name] = "not called on the example inputs"
            continue
        if not readers or any(not _is_linear(modules[r]) for r in readers):
            skipped[name] = (f"its output reaches {', '.join(readers) or 'no module'}"
                             " (only linear layers can take its gain)")
            continue
        width = m.weight.shape[-1] if getattr(m, "weight", None) is not None else None
        wide = [r for r in readers if width is not None and modules[r].weight.shape[
            0 if not isinstance(modules[r], nn.Linear) else 1] != width]
        if wide:  # a view merged several normalised vectors into one input (a patch merger)
            skipped[name] = (f"its output reaches {', '.join(wide)} reshaped to another width "
                             "(only a reader of the normalised vectors can take the gain)")
            continue
        tied = [r for r in readers if shared[id(modules[r].weight)] > 1]
        if tied and not untie:
            skipped[name] = "a reader shares its weight with another layer (a tied head; " \
                            "untie=True gives it its own copy)"
            continue
        for r in tied:
            modules[r].weight = nn.Parameter(modules[r].weight.detach().clone())
        # the form is measured, not assumed from the name (T5's "LayerNorm" is an RMS norm)
        forms = (kind,) if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) else \
            (kind, "rms" if kind == "layer" else "layer")
        fits = None
        for form in forms:
            fits = [_fit_affine(x, y, form, eps) for x, y in calls]
            if all(f is not None for f in fits):
                kind = form
                break
        if fits is None or any(f is None for f in fits):
            skipped[name] = f"its output is not gain * {kind} norm + bias"
            continue
        g, b = fits[0]
        has_bias = isinstance(getattr(m, "bias", None), nn.Parameter)
        with torch.no_grad():
            for r in readers:
                lin = modules[r]
                w = lin.weight.double()
                conv1d = not isinstance(lin, nn.Linear)  # Hugging Face's Conv1D: (in, out)
                extra = (b @ w) if conv1d else (w @ b)
                lin.weight.copy_((w * g[:, None]) if conv1d else (w * g[None, :]))
                if lin.bias is None and (has_bias or bool(b.abs().max() > 0)):
                    lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[1 if conv1d else 0],
                                                        dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
                if lin.bias is not None:
                    lin.bias.add_(extra.to(lin.bias.dtype))
        folded[name] = (kind, eps)
    layer_norms = [n for n, (k, _) in folded.items() if k == "layer"]
    uncentred = dict.fromkeys(layer_norms, "center=False")
    if layer_norms and center:
        uncentred = _center_streams(new, new, inputs, layer_norms, untie)
        skipped.update({n: f"its gain is folded, but it still centres: {why}"
                        for n, why in uncentred.items()})
    for n, (k, eps) in folded.items():
        if n in uncentred:  # a LayerNorm that keeps its centring (no gain)
            _set_module(new, n, nn.LayerNorm(norms[n].weight.shape[0], eps=eps,
                                             elementwise_affine=False))
        else:
            _set_module(new, n, GainlessRMSNorm(eps))
    if skipped:
        warnings.warn("fold_norms did not fold these norms (or not fully): " + "; ".join(
            f"{n}: {why}" for n, why in list(skipped.items())[:5])
            + (f" (+{len(skipped) - 5} more)" if len(skipped) > 5 else ""), stacklevel=2)
    with torch.no_grad(), eval_mode(model, new):
        try:
            err = relative_error(inputs.call_seeded(model), inputs.call_seeded(new))
        except Exception as e:  # noqa: BLE001 - forward reads what folding removed
            raise FoldError(f"the folded model does not run: {type(e).__name__}: {e} (its "
                            f"forward reads something of the norms {', '.join(list(folded)[:3])} "
                            "that folding removed)") from e
    if not err <= rtol:
        raise FoldError(f"folding the norms {', '.join(list(folded)[:5])} changed the outputs: "
                        f"relative error {err:.3g} > {rtol:g} (a reader of a norm's output the "
                        "hooks could not see, a stream written by something other than "
                        "parameters, or a post-norm residual)")
    new.folded_norms = sorted(folded)
    new.folded_scales = scales
    return new


def _fold_layer_scales(model: nn.Module, inputs) -> list[str]:
    """Fold each LayerScale (a module computing ``x * gamma`` with one 1-D parameter
    over the last axis) into the linear layer whose output it scales, and replace
    it by ``nn.Identity``: the layer's rows and bias take ``gamma``. Seen on one
    run with hooks: the scale's input must be (a view of) a leaf linear layer's
    output, and nothing else may take that output. Returns the folded names."""
    cands = {}
    for n, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        if next(m.children(), None) is None and len(own) == 1 and own[0][1].dim() == 1 \
                and not _is_linear(m) and _norm_kind(m) is None:
            cands[n] = (m, own[0][0])
    if not cands:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, str] = {}      # storage of a linear layer's output -> the layer
    takers: dict[int, set[str]] = {}   # storage -> leaf modules handed it
    seen: dict[str, tuple] = {}
    keep = []
    hooks = []

    def on_linear(m, _args, out):
        if isinstance(out, torch.Tensor):
            keep.append(out)
            produced[out.untyped_storage().data_ptr()] = names[id(m)]

    def on_call(m, args, kwargs):
        if next(m.children(), None) is not None:
            return
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                keep.append(a)  # alive until the run ends: its storage is not reused
                takers.setdefault(a.untyped_storage().data_ptr(), set()).add(names[id(m)])

    def on_scale(name):
        def hook(_m, args, out):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen.setdefault(name, (args[0].detach(), out.detach()))
        return hook
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(on_call, with_kwargs=True))
        if _is_linear(m):
            hooks.append(m.register_forward_hook(on_linear))
    for n, (m, _) in cands.items():
        hooks.append(m.register_forward_hook(on_scale(n)))
    _run_hooked(model, inputs, hooks)
    modules = dict(model.named_modules())
    folded = []
    with torch.no_grad():
        for n, (m, pname) in cands.items():
            if n not in seen:
                continue
            x, y = seen[n]
            gamma = getattr(m, pname)
            if x.shape != y.shape or x.shape[-1] != gamma.shape[0] or \
                    not torch.allclose(y, x * gamma, rtol=1e-5, atol=1e-6):
                continue  # not x * gamma over the last axis
            src = produced.get(x.untyped_storage().data_ptr())
            if src is None or takers.get(x.untyped_storage().data_ptr(), set()) != {n}:
                continue  # not a linear layer's output, or another module takes it too
            lin = modules[src]
            conv1d = not isinstance(lin, nn.Linear)
            g = gamma.detach().to(lin.weight.dtype)
            lin.weight.mul_(g[None, :] if conv1d else g[:, None])
            if lin.bias is not None:
                lin.bias.mul_(g)
            _set_module(model, n, nn.Identity())
            folded.append(n)
    return folded


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _center_streams(new: nn.Module, original: nn.Module, inputs, layer_norms: list[str],
                    untie: bool) -> dict[str, str]:
    """Remove, from every writer of the streams the LayerNorms read, its mean
    along the stream (see the module docstring).

    A writer whose parameter another layer shares (GPT-2's embedding, which is
    also its output head) cannot be centred for one use alone: with ``untie`` the
    other holders get their own copy first; without it that stream is left
    uncentred. Returns ``{norm: why}`` for the LayerNorms whose stream was not
    centred (they must keep centring their input)."""
    from .infer import trace_model  # the spec finds the streams and their writers
    from .spec import Member
    traced = trace_model(original, inputs, symmetries="all")
    sym, state = traced.sym, traced.table
    # each stream: the class of the LayerNorm's gain axis, and the gain's orientation
    anchors, norms_of = {}, {}
    for n in layer_norms:
        s = state.syms.get(f"{n}.weight")
        if not s:
            raise FoldError(f"cannot centre the stream of {n}: its gain is not in the graph")
        leaves = list(sym.leaves(s[0]))
        if len(leaves) != 1:
            raise FoldError(f"cannot centre the stream of {n}: its axis is structured")
        root, *_, dual = leaves[0]
        anchors[root] = dual
        norms_of.setdefault(root, []).append(n)
    skip = {f"{n}.{t}" for n in layer_norms for t in ("weight", "bias")}
    params = dict(new.state_dict(keep_vars=True))
    writers: dict[int, list[tuple[str, Member]]] = {}   # stream -> members to centre
    for name in traced.model_state_names:
        syms = state.syms.get(name)
        if not syms or name in skip or name not in params or not params[name].is_floating_point():
            continue
        for axis, s in enumerate(syms):
            for root, offset, shape, strides, dim, dual in sym.leaves(s):
                if root in anchors and dual == anchors[root] and root not in sym.blocked:
                    writers.setdefault(root, []).append(
                        (name, Member(name, axis, offset, tuple(shape), tuple(strides), dim)))
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # parameter -> (module, attribute)
    for mod in new.modules():
        for attr, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((mod, attr))
    uncentred: dict[str, str] = {}
    with torch.no_grad():
        for root, members in writers.items():
            tied = sorted({name for name, _ in members if len(holders.get(id(params[name]), [])) > 1})
            if tied and not untie:
                for n in norms_of[root]:
                    uncentred[n] = (f"its stream's writer {tied[0]!r} shares its weight with another "
                                    "layer (a tied head), which centring would change; untie=True "
                                    "gives that layer its own copy")
                continue
            for name in tied:  # the other holders keep the uncentred values
                p = params[name]
                for mod, attr in holders[id(p)][1:]:
                    setattr(mod, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            for name, m in members:
                t = params[name]
                rows = m.gather(t.detach().double())
                t.copy_(m.scatter(t.detach().double(), rows - rows.mean(0, keepdim=True)))
    return uncentred
