"""The open rule registry.

A rule relates the axes of an op's inputs, parameters and outputs. It is a
function ``rule(ctx) -> layout`` where ``ctx`` is an :class:`~autobasin.infer.engine.Context`
and the returned layout gives the output's axis symbols (a list of symbols for
a tensor, a list of layouts for a tuple, None for a non-tensor).

Keys: an ``nn.Module`` subclass (matched exactly; a subclass is only matched
when ``inherit=True`` and it adds no parameters of its own), a function or
builtin (``torch.cat``, ``operator.add``, ``F.linear``), or a method name as a
string (``"view"``). Register your own op in a few lines::

    from autobasin.infer import rule

    @rule(MyScale)
    def _my_scale(ctx):
        x = ctx.layout(ctx.args[0])
        ctx.union(x[1], ctx.param("scale")[0])
        return x
"""
from __future__ import annotations

from typing import Callable

MODULE_RULES: dict[type, tuple[Callable, bool, frozenset]] = {}
FUNCTION_RULES: dict[object, Callable] = {}
METHOD_RULES: dict[str, Callable] = {}
# ATen op (an OpOverloadPacket such as ``torch.ops.aten.conv2d``) -> the torch
# function whose signature and meaning it shares: the function's rule serves
# it, and ``ctx.target`` is the function (see :func:`alias`)
ALIASES: dict[object, Callable] = {}


def alias(aten_op, fn: Callable) -> None:
    """Let ``aten_op`` (graphs captured by torch.export) use the rule of the
    torch function ``fn``. Only for ops that take the same positional
    arguments with the same meaning; others get rules of their own."""
    ALIASES[aten_op] = fn


ALL = frozenset({"permutation", "sign", "scale", "orthogonal", "invertible", "rotation", "rotary"})
PERMUTATION = frozenset({"permutation"})


def rule(*keys, inherit: bool = False, params: tuple[str, ...] = (), kinds=None):
    """Register a rule for modules, functions or method names.

    ``params`` lists the parameter/buffer names the rule knows for a module;
    with ``inherit=True`` a subclass that owns other parameters is not matched
    (its forward is traced instead), so a rule is never applied to a module it
    does not fully describe.

    ``kinds``: the kinds of symmetry (``spec.KINDS``) the op admits on every
    axis it touches, permutations only unless declared (``ALL`` for a linear
    layer); a rule narrows single axes further with ``ctx.restrict``, and marks
    contractions with ``ctx.union(a, b, dual=True)``. A function registered
    again for more keys keeps the kinds it was declared with.
    """
    def register(fn: Callable) -> Callable:
        if kinds is not None or not hasattr(fn, "kinds"):
            fn.kinds = frozenset(kinds or PERMUTATION) | PERMUTATION
        for key in keys:
            if isinstance(key, str):
                METHOD_RULES[key] = fn
            elif isinstance(key, type):
                MODULE_RULES[key] = (fn, inherit, frozenset(params))
            else:
                FUNCTION_RULES[key] = fn
        return fn
    return register


def module_rule(module, exact_only: bool = False) -> Callable | None:
    hit = MODULE_RULES.get(type(module))
    if hit is not None:
        return hit[0]
    if exact_only:
        return None
    for base in type(module).__mro__[1:]:
        hit = MODULE_RULES.get(base)
        if hit is None:
            continue
        fn, inherit, known = hit
        own = {n for n, _ in module.named_parameters(recurse=False)} | \
              {n for n, _ in module.named_buffers(recurse=False)}
        if inherit and own <= known:
            return fn
        return None
    return None
