"""torch.fx tracing for any model, with example values on every node.

* timm's notrace modules and functions (``timm.layers._fx``) are honoured: the
  modules become leaves, the functions ``call_function`` nodes.
* A submodule whose forward fx cannot trace (data-dependent control flow, an
  unsupported Python construct) becomes an opaque leaf automatically, with a
  warning naming it; only a failure in the top-level forward is an error.
* :class:`ExampleRecorder` runs the graph on example inputs (an fx Interpreter,
  like ``torch.fx.passes.shape_prop``) and keeps, per node, a light description
  of the value: shapes and dtypes of tensors, plain Python values otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn


class TraceError(RuntimeError):
    """The model's top-level forward cannot be traced by torch.fx."""


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    # the layout in memory (as_strided reads it): steps per axis, when known, and
    # the storage offset of the first entry
    stride: tuple[int, ...] | None = None
    offset: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)


class OutputFields(dict):
    """The description of a Hugging Face ``ModelOutput``: its set fields in
    order, which ``output[i]`` indexes by position (``to_tuple()``)."""


def _is_model_output(value: Any) -> bool:
    # transformers.utils.ModelOutput, known by its methods so that transformers
    # need not be imported
    return isinstance(value, dict) and callable(getattr(value, "to_tuple", None)) and \
        any(c.__name__ == "ModelOutput" for c in type(value).__mro__)


def describe(value: Any) -> Any:
    """Light, picklable description of a runtime value (shapes for tensors)."""
    if isinstance(value, torch.Tensor):
        try:
            stride, offset = tuple(int(v) for v in value.stride()), int(value.storage_offset())
        except Exception:  # noqa: BLE001 - a tensor subclass without strides
            stride, offset = None, 0
        return TensorMeta(tuple(value.shape), value.dtype, stride, offset)
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (list, tuple)):
        return type(value)(describe(v) for v in value) if not hasattr(value, "_fields") \
            else tuple(describe(v) for v in value)
    if isinstance(value, dict):  # Hugging Face ModelOutputs are dicts too
        items = {k: describe(v) for k, v in value.items()}
        return OutputFields(items) if _is_model_output(value) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device,
                          slice, type(Ellipsis))):
        return value
    if any(isinstance(v, torch.Tensor) for v in getattr(value, "__dict__", {}).values()):
        return OPAQUE_VALUE
    return None


class _OpaqueValue:
    """An object holding tensors that inference cannot look into (not a
    tensor, tuple, list, dict or dataclass): whatever uses it fails closed."""

    def __repr__(self) -> str:
        return "<object holding tensors>"


OPAQUE_VALUE = _OpaqueValue()


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm missing or reorganised: nothing to honour
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


class AutoLeafTracer(fx.Tracer):
    """fx Tracer that makes untraceable submodules opaque leaves.

    ``opaque`` holds qualified names or module types the user wants opaque.
    ``inline`` names modules that must be traced through even if they are
    leaves by default (used to look inside a notrace module).
    """

    def __init__(self, opaque: Iterable = (), inline: Iterable[str] = (),
                 extra_autowrap: Iterable = (), skip_autowrap: Iterable = ()):
        leaf_types, functions = _timm_notrace()
        skip = set(skip_autowrap)
        functions = tuple(f for f in (*functions, *extra_autowrap) if f not in skip)
        super().__init__(autowrap_functions=functions)
        self.leaf_types = leaf_types
        self.opaque_names = {o for o in opaque if isinstance(o, str)}
        self.opaque_types = tuple(o for o in opaque if isinstance(o, type))
        self.inline = set(inline)
        self.failed: dict[str, str] = {}
        # nodes recorded while tracing into a module that then failed: the module
        # runs whole as a leaf, so they never run (see prune_unused)
        self.abandoned: set[fx.Node] = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.inline:
            return False
        if qualname in self.opaque_names or qualname in self.failed:
            return True
        if self.opaque_types and isinstance(m, self.opaque_types):
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """Buffers in the state_dict are traced like parameters, so that what
        the model computes from them stays symbolic: fx would otherwise fold
        ``w * (running_var + eps).rsqrt()`` (torchvision's FrozenBatchNorm2d)
        into a constant, and a spec would then hold only for the values it was
        inferred on. Buffers outside the state_dict stay constants."""
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter) \
                and id(attr_val) in self._state_buffers():
            self.proxy_buffer_attributes = True
            try:
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            finally:
                self.proxy_buffer_attributes = False
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _state_buffers(self) -> set[int]:
        if getattr(self, "_state_buffer_ids", None) is None:
            self._state_buffer_ids = {id(t) for t in self.root.state_dict(keep_vars=True).values()
                                      if not isinstance(t, nn.Parameter)}
        return self._state_buffer_ids

    def call_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
        except NameError:
            # a module that is not a submodule of the root (a module-level
            # activation such as Longformer's ``gelu = ACT2FN["gelu"]``): it
            # has no name to call it by, so its body is traced as if written
            # inline; only when it owns no tensors, which would otherwise be
            # read as constants unseen by any rule
            if next(iter(m.state_dict(keep_vars=True).values()), None) is not None:
                raise
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        stack = list(self.module_stack.items())
        last = self.graph._root.prev  # the graph's last node before the attempt
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure makes the module opaque
            self.module_stack.clear()
            self.module_stack.update(stack)
            if not qualname:
                raise
            node = self.graph._root.prev
            while node is not last:
                self.abandoned.add(node)
                node = node.prev
            self.failed[qualname] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            return super().call_module(m, forward, args, kwargs)


# ---------------------------------------------------- tracing with shapes fixed
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "is_meta", "is_sparse", "layout",
               "requires_grad", "is_quantized", "is_nested", "is_mkldnn"}
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point",
                 "is_complex", "is_contiguous", "element_size", "get_device"}
_META_FUNCTIONS = {torch.numel, torch.is_floating_point, torch.is_complex,
                   torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel}
_MISSING = object()


class _ValueProxy(fx.Proxy):
    """A proxy that knows the value its node takes on the example inputs and
    answers questions about shape, dtype and device with plain Python values."""

    def __getattr__(self, k):
        if k in _META_ATTRS:
            v = self.tracer.value_of(self)
            if isinstance(v, torch.Tensor):
                return getattr(v, k)
        return _ValueAttribute(self, k)

    def __len__(self):
        v = self.tracer.value_of(self)
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                raise TypeError("len() of a 0-d tensor")
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
        return super().__len__()

    def __iter__(self):
        v = self.tracer.value_of(self)
        if isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0):
            return iter([self[i] for i in range(len(v))])
        return super().__iter__()

    def __setitem__(self, idx, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, idx, value), {})


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


class ConcreteTracer(AutoLeafTracer):
    """AutoLeafTracer that computes every node's value on example inputs while
    tracing. Shape, dtype and device queries return those values' Python
    values, so control flow on them is specialised to the example; control
    flow on tensor values still fails the trace."""

    def __init__(self, inputs, **kwargs):
        super().__init__(**kwargs)
        self.inputs = list(inputs)
        self.values: dict[fx.Node, object] = {}
        self._evaluating = False
        self._placeholders = 0

    def proxy(self, node):
        return _ValueProxy(node, self)

    def value_of(self, a):
        if isinstance(a, fx.proxy.Attribute):
            return getattr(self.value_of(a.root), a.attr)
        if isinstance(a, fx.Proxy):
            v = self.values.get(a.node, _MISSING)
            if v is _MISSING:
                raise RuntimeError(f"no value for {a.node}")
            return v
        return a

    def _values(self, obj):
        return fx.node.map_aggregate(obj, self.value_of)

    def _evaluate(self, fn):
        was = self._evaluating
        self._evaluating = True
        try:
            with torch.no_grad():
                return fn()
        finally:
            self._evaluating = was

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        if kind == "call_method" and target in _META_METHODS or \
                kind == "call_function" and target in _META_FUNCTIONS:
            a, kw = self._values(tuple(args)), self._values(dict(kwargs))
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            return target(*a, **kw)
        if kind == "call_function" and target is getattr and len(args) == 2 and args[1] in _META_ATTRS:
            v = self.value_of(args[0])
            if isinstance(v, torch.Tensor):
                return getattr(v, args[1])
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            value = self.inputs[self._placeholders]
            self._placeholders += 1
        elif kind == "get_attr":
            value = get_attr(self.root, target)
        elif kind in ("call_function", "call_method", "call_module"):
            a, kw = self._values(tuple(args)), self._values(dict(kwargs))
            if kind == "call_function":
                value = self._evaluate(lambda: target(*a, **kw))
            elif kind == "call_method":
                value = self._evaluate(lambda: getattr(a[0], target)(*a[1:], **kw))
            else:
                mod = self.root.get_submodule(target)
                value = self._evaluate(lambda: mod(*a, **kw))
        else:
            return p
        self.values[p.node] = value
        return p

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def op_name_of(target) -> str:
    """An fx node target's plain name: ``"transpose"`` for ``Tensor.transpose``
    (a method name), ``torch.transpose`` and ``aten.transpose.int`` alike."""
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def get_attr(root: nn.Module, target: str):
    """``root``'s attribute at the dotted path ``target``."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _defaults_after(model: nn.Module, n_given: int | None) -> dict:
    """The forward parameters after the first ``n_given`` that have defaults,
    with those defaults: they are fixed while tracing, as the model runs with
    them. Tracing them as inputs would take ``if mask is not None:`` branches
    the example never runs (timm's Hiera)."""
    if n_given is None:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    fixed = {}
    for p in params[n_given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            return {}  # a required input the example does not give: let fx report it
        fixed[p.name] = p.default
    return fixed


def symbolic_trace(model: nn.Module, opaque: Iterable = (), warn: bool = True,
                   n_inputs: int | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model``; return the GraphModule and the modules made opaque.

    ``n_inputs``: how many positional inputs the model will be run with; the
    defaulted parameters after them are traced with their default values."""
    tracer = AutoLeafTracer(opaque)
    try:
        graph = tracer.trace(model, concrete_args=_defaults_after(model, n_inputs) or None)
    except Exception as e:  # noqa: BLE001
        raise TraceError(
            f"torch.fx cannot trace the top-level forward of {type(model).__name__}: "
            f"{type(e).__name__}: {e}. The failing call is in {type(model).__name__}.forward "
            "itself, not in a submodule, so it cannot be made an opaque leaf. Move the "
            "data-dependent part into a submodule, or wrap the function with "
            "torch.fx.wrap / timm.layers.register_notrace_function.") from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    prune_unused(gm, tracer.abandoned)
    if warn:
        for name, why in tracer.failed.items():
            warnings.warn(f"autobasin: submodule {name!r} ({type(gm.get_submodule(name)).__name__}) "
                          f"cannot be traced by torch.fx and is treated as opaque: {why}",
                          stacklevel=5)
    return gm, dict(tracer.failed)


# ops torch.export leaves in a graph to check shapes and dtypes at run time:
# they compute nothing, so inference drops them
_EXPORT_CHECKS = ("_assert_tensor_metadata", "_assert_scalar", "_assert_async",
                  "sym_constrain_range", "sym_constrain_range_for_size")


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs warnings of its own while it tries (data-dependent
    guards) and prints the partial graph to stderr when it fails; whether it
    fails is reported by its exception, which the caller turns into a
    TraceError, so that output is kept off the user's terminal."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _batched_experts(model: nn.Module):
    """Hugging Face mixtures of experts run their experts one of several ways
    that compute the same function (``config._experts_implementation``); the
    default loops over the experts that received tokens, which torch.export
    cannot capture (the loop depends on the routing). Capture the batched one."""
    changed = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        impl = getattr(cfg, "_experts_implementation", None)
        if impl is not None and impl != "batched_mm" and id(cfg) not in changed:
            changed[id(cfg)] = (cfg, impl)
            cfg._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        for cfg, impl in changed.values():
            cfg._experts_implementation = impl


def export_trace(model: nn.Module, inputs, concrete: bool = True) -> tuple[fx.GraphModule, tuple]:
    """Capture ``model`` with torch.export (non-strict, ATen level).

    Returns a GraphModule whose placeholders are the flattened example inputs
    (in the order of the returned tuple) and whose parameters and buffers are
    ``get_attr`` nodes named by their state_dict names (``ExportedProgram.module()``
    keeps the model's own tensors under their qualified names), with the
    export's run-time guards and shape assertions removed. Where torch.export
    fails and ``concrete`` is true, :func:`concrete_aten_trace` captures the
    graph these inputs run instead, with a warning (and fails where a branch
    depends on the weights).
    """
    import torch.fx._pytree as fx_pytree
    from .guard import eval_mode
    try:
        with eval_mode(model), _batched_experts(model), _quiet_torch_logs(), _plain_outputs(model):
            ep = torch.export.export(model, tuple(inputs.args), dict(inputs.kwargs), strict=False)
    except Exception as e:  # noqa: BLE001 - the ATen graph of these inputs is the way out
        if not concrete:
            raise
        if is_data_dependent(e):
            why = (f"a branch depends on the values of the example inputs "
                   f"({caused_by(e) or 'a data-dependent guard'})")
        else:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        try:
            out = concrete_aten_trace(model, inputs)
            out[0].meta["branches_taken"] = True  # holds for these inputs' branches only
        except Exception as again:  # noqa: BLE001 - report both
            e.add_note(f"the ATen graph on the example inputs could not be traced either: "
                       f"{type(again).__name__}: {(str(again).strip().splitlines() or [''])[0]}")
            raise e from again
        warnings.warn(
            f"torch.export cannot capture {type(model).__name__} for all inputs: {why}. Captured "
            f"the ATen graph these example inputs run instead (every branch as they take it); "
            f"the spec is checked on them", stacklevel=3)
        return out
    gm = ep.module()
    flat = tuple(fx_pytree.tree_flatten_spec((tuple(inputs.args), dict(inputs.kwargs)), gm._in_spec))
    _inline_wrappers(gm)
    for n in reversed(list(gm.graph.nodes)):
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        if (n.op == "call_module" and n.target == "_guards_fn") or \
                (n.op == "call_function" and name in _EXPORT_CHECKS):
            if not n.users:
                gm.graph.erase_node(n)
    gm.meta["in_spec"] = gm._in_spec  # how (args, kwargs) flatten to the placeholders
    gm.meta["out_spec"] = gm._out_spec  # how the flat outputs rebuild forward's result
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs in, flat outputs out
    gm.recompile()
    return gm, flat


def is_data_dependent(error: BaseException) -> bool:
    """Whether torch.export stopped at a branch on the values (not the shapes) of tensors."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException") \
                or "data-dependent" in str(error).split("\n", 1)[0]:
            return True
        error = error.__cause__ or error.__context__
    return False


def caused_by(error: BaseException) -> str | None:
    """The ``file:line in function`` torch.export names as the cause of a failed guard."""
    import re
    found = re.search(r"Caused by: \((.*?)\)", str(error))
    return found.group(1) if found else None


# Python reads of a tensor's values, and of a shape that values decided
_VALUE_READS = {"item", "__bool__", "tolist", "numpy", "__int__", "__float__", "__index__",
                "__complex__", "equal", "is_nonzero", "allclose"}
_SHAPE_READS = {"size", "numel", "nelement", "__len__", "__iter__", "unbind", "shape"}
# ops whose output shape depends on the values of one argument: its position
_VALUE_SHAPED = {"nonzero": 0, "argwhere": 0, "unique": 0, "unique_consecutive": 0,
                 "bincount": 0, "masked_select": 1, "repeat_interleave": 1}
# ops that take only the shape, dtype and device of their tensor argument
_SHAPE_ONLY = {"new_ones", "new_zeros", "new_empty", "new_full", "new_tensor", "zeros_like",
               "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
# ops that take only the shape (or dtype) of their second tensor argument
_LIKE_SECOND = {"expand_as", "view_as", "reshape_as", "type_as"}


def _value_shaped(name: str, args, kwargs, valued) -> bool:
    """Does this call's output shape depend on values in ``valued``?"""
    import torch.utils._pytree as pytree
    if name in _VALUE_SHAPED:
        k = _VALUE_SHAPED[name]
        arg = args[k] if len(args) > k else kwargs.get("repeats" if k == 1 else "input")
        return isinstance(arg, torch.Tensor) and arg in valued
    if name == "where" and len(args) + len(kwargs) == 1:
        return args[0] in valued
    if name == "__getitem__" and len(args) > 1:  # a boolean mask picks a valued number of rows
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool and t in valued
                   for t in pytree.tree_leaves(args[1]))
    return False


class _TensorSet:
    """Tensors by identity (``==`` on tensors compares values), held weakly."""

    def __init__(self, tensors=()):
        self._refs: dict[int, Any] = {}
        self.update(tensors)

    def update(self, tensors) -> None:
        import weakref
        for t in tensors:
            self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class _WeightBranches(torch.overrides.TorchFunctionMode):
    """Runs a forward and records where Python reads values computed from the
    model's parameters or buffers (``if h.mean() > 0``, ``.tolist()`` of a
    router's picks), or a shape such values decided: places where another
    checkpoint could take another branch."""

    def __init__(self, tensors):
        super().__init__()
        self.valued = _TensorSet(tensors)   # computed from parameters / buffers
        self.shaped = _TensorSet()          # shape decided by such values
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch.utils._pytree as pytree
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: Tensor.shape, .dtype, ...
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        valued = any(t in self.valued for t in leaves)
        shaped = any(t in self.shaped for t in leaves)
        if (name in _VALUE_READS and valued) or (name in _SHAPE_READS and shaped):
            self.found.append(f"{name} at {_user_frame()}")
        out = func(*args, **kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in _SHAPE_ONLY:
            valued = any(t in self.valued for t in leaves[1:])  # a fill value, say
        elif name in _LIKE_SECOND and leaves:
            valued = leaves[0] in self.valued  # a mask expanded to the hidden states' shape
        if valued:
            self.valued.update(outs)
        if shaped or _value_shaped(name, args, kwargs, self.valued):
            self.shaped.update(outs)
        return out


def _user_frame() -> str:
    """``file:line in function`` of the innermost caller outside torch and autobasin."""
    import traceback
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/autobasin/" not in path and "<" not in path:
            return f"{'/'.join(path.split('/')[-3:])}:{frame.lineno} in {frame.name}"
    return "?"


def weight_dependent_branches(model: nn.Module, inputs) -> list[str]:
    """Where ``model``'s forward on ``inputs`` reads values (or value-decided shapes)
    computed from its state_dict's tensors (parameters, persistent buffers); empty
    when its control flow depends on the inputs (and the config) alone."""
    from .guard import eval_mode
    # the checkpoint's tensors: non-persistent buffers (a conv's stride kept as a
    # tensor, RoPE frequencies) come from the config, the same for every checkpoint
    mode = _WeightBranches(model.state_dict(keep_vars=True).values())
    with eval_mode(model), _batched_experts(model), _plain_outputs(model), torch.no_grad(), mode:
        inputs.call(model)
    return mode.found


def concrete_aten_trace(model: nn.Module, inputs) -> tuple[fx.GraphModule, tuple]:
    """The ATen graph of ``model`` on these example inputs, control flow resolved.

    For a forward that branches on tensor values (``.item()``, ``if mask.any()``),
    which torch.export cannot capture for every input: the model runs for real
    under torch's ``make_fx`` (pre-dispatch ATen, the op set torch.export emits),
    every branch taken as these inputs take it. Parameters and buffers are inputs
    of the traced function (``torch.func.functional_call``) and become ``get_attr``
    nodes under their state_dict names, so the result looks like
    :func:`export_trace`'s: placeholders are the flat example inputs, with the
    same ``in_spec`` / ``out_spec`` metadata.

    Refused (``TraceError``) when a branch depends on the model's weights
    (:func:`weight_dependent_branches`): another checkpoint could take another
    branch, which the graph would not show. Branches on the inputs alone are
    taken as these inputs take them.
    """
    reads = weight_dependent_branches(model, inputs)
    if reads:
        raise TraceError(f"{type(model).__name__}'s forward branches on values computed from its "
                         f"weights ({reads[0]}{f', and {len(reads) - 1} more' if len(reads) > 1 else ''}):"
                         f" a graph of these example inputs would not hold for another checkpoint")
    import torch.utils._pytree as pytree
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx
    from .guard import eval_mode

    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    names = list(state)
    flat_in, in_spec = pytree.tree_flatten((tuple(inputs.args), dict(inputs.kwargs)))
    out_spec: list = [None]

    def forward(*flat):
        tensors = dict(zip(names, flat[:len(names)]))
        args, kwargs = pytree.tree_unflatten(list(flat[len(names):]), in_spec)
        out = functional_call(model, tensors, tuple(args), kwargs, tie_weights=False, strict=False)
        leaves, out_spec[0] = pytree.tree_flatten(out)
        return leaves

    with eval_mode(model), _batched_experts(model), _plain_outputs(model), torch.no_grad():
        traced = make_fx(forward, tracing_mode="real", pre_dispatch=True, record_module_stack=True,
                         _error_on_data_dependent_ops=False)(*state.values(), *flat_in)
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders[:len(names)]):
        with graph.inserting_before(node):  # (graph.get_attr would look for it in make_fx's module)
            attr = graph.create_node("get_attr", name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    # the model's own tensors under their state_dict names, and the tensors forward
    # created (kept by make_fx as constants)
    attrs = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    root = {name: state[name] if name in state else get_attr(traced, name) for name in attrs}
    gm = fx.GraphModule(root, graph)
    gm.meta["in_spec"] = in_spec
    gm.meta["out_spec"] = out_spec[0]
    gm.recompile()
    return gm, tuple(flat_in)


def _is_generation_cache(x) -> bool:
    """A transformers key/value cache (``transformers.cache_utils.Cache``)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(x).__mro__)


@contextlib.contextmanager
def _plain_outputs(model: nn.Module):
    """While exporting, ``model``'s outputs with every transformers key/value
    cache (returned beside the logits even with ``use_cache=False`` by some
    models) replaced by None: torch.export refuses such objects, and a cache
    is generation state, not what the model computes. Any other object
    pytree cannot flatten is left in place: export refuses it and capture
    fails with its reason, never a spec blind to that output."""
    import functools
    import torch.utils._pytree as pytree
    forward = model.forward

    @functools.wraps(forward)
    def plain(*args, **kwargs):
        out = forward(*args, **kwargs)
        if not any(_is_generation_cache(x) for x in pytree.tree_leaves(out)):
            return out  # as it is: rebuilding a ModelOutput may drop fields
        return pytree.tree_map(lambda x: None if _is_generation_cache(x) else x, out)

    own = model.__dict__.get("forward")  # an instance's own forward (a hook), if any
    model.forward = plain
    try:
        yield
    finally:
        if own is None:
            del model.forward  # the class's forward again
        else:
            model.forward = own


def _inline_wrappers(gm: fx.GraphModule) -> None:
    """Inline torch.export's scope wrappers (``wrap_with_set_grad_enabled``,
    ``wrap_with_autocast``: a region under ``torch.no_grad()`` or autocast kept
    as a call of a sub-GraphModule) into the graph, so rules see the ops inside.

    Grad mode does not change the values a forward computes; the autocast dtype
    does, and is kept by capture, so those regions are inlined only when their
    dtype switch is off (``enabled`` False). A body that reads attributes of
    its own is left as it is (a blocked op with its reason).
    """
    names = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}
    for n in list(gm.graph.nodes):
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name not in names:
            continue
        mods = [i for i, a in enumerate(n.args) if isinstance(a, fx.Node) and a.op == "get_attr"
                and isinstance(getattr(gm, a.target, None), fx.GraphModule)]
        if len(mods) != 1:
            continue
        k = mods[0]
        if name == "wrap_with_autocast" and (k < 3 or n.args[2]):
            continue  # an autocast that is on changes dtypes: keep it whole
        body: fx.GraphModule = getattr(gm, n.args[k].target)
        if any(b.op == "get_attr" for b in body.graph.nodes):
            continue
        placeholders = [b for b in body.graph.nodes if b.op == "placeholder"]
        operands = n.args[k + 1:]
        out = body.graph.output_node().args[0]
        by_item = all(u.op == "call_function" and u.target is operator.getitem for u in n.users)
        if len(placeholders) != len(operands) or (isinstance(out, (tuple, list)) and not by_item):
            continue  # a tuple result used whole: leave the wrapper (blocked, with its reason)
        with gm.graph.inserting_before(n):
            result = gm.graph.graph_copy(body.graph, dict(zip(placeholders, operands)))
        if isinstance(result, (tuple, list)):
            for user in list(n.users):
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
        else:
            n.replace_all_uses_with(result)
        gm.graph.erase_node(n)


def graph_over(model: nn.Module, gm: fx.GraphModule, copy_graph: bool = True) -> fx.GraphModule:
    """``gm``'s graph run over ``model``'s own modules and tensors (another
    instance of the architecture ``gm`` was captured from: B, a permuted copy).
    Attributes the model lacks are constants the capture made (torch.export's
    lifted tensors): they are taken from ``gm``, the same for every model.
    ``copy_graph``: give the new module a copy of the graph (same node names);
    else it shares ``gm``'s nodes, for comparing node by node."""
    import copy
    root: dict[str, Any] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in root:
            try:
                root[n.target] = get_attr(model, n.target)
            except AttributeError:
                root[n.target] = get_attr(gm, n.target)
    return fx.GraphModule(root, copy.deepcopy(gm.graph) if copy_graph else gm.graph)


def _tensors_in(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    return []


def _may_mutate(n: fx.Node) -> bool:
    """Could this node change a tensor in place (so it matters with no users)?"""
    if n.op in ("placeholder", "output", "call_module"):
        return True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if name in ("setitem", "__setitem__") or (name.endswith("_") and not name.endswith("__")):
        return True
    if name.startswith("i") and getattr(n.target, "__module__", "") in ("_operator", "operator"):
        return True  # operator.iadd and friends
    return n.op == "call_function" and n.is_impure()


def prune_unused(gm: fx.GraphModule, abandoned: Iterable[fx.Node] = ()) -> None:
    """Drop unused nodes left by a failed attempt to trace into a submodule.

    fx's own dead-code elimination would also drop in-place writes whose
    result is unused (``x[...] = v``), changing what the graph computes; only
    nodes that cannot mutate anything are removed here, and the ``abandoned``
    ones: recorded inside a module that then failed to trace and runs whole as
    a leaf. Those never run, whatever they are; kept, a submodule call among
    them would get axes of its own (a wrong spec) and an in-place write would
    happen twice.
    """
    abandoned = set(abandoned)
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n.users or n.op in ("placeholder", "output"):
                continue
            if n in abandoned or not _may_mutate(n):
                gm.graph.erase_node(n)
                changed = True
    gm.recompile()


class ExampleRecorder(fx.Interpreter):
    """Run a GraphModule on example inputs and record each node's value.

    ``meta[node]`` is :func:`describe` of the value; ``captured[node]`` holds
    the actual arguments of the nodes in ``capture`` (for looking inside
    opaque calls later). ``probes``: ``{node: (inputs, fn)}``: when ``node``
    has run, ``probed[node] = fn(*values of inputs, value of node)`` (values
    are kept only until every probe that reads them has run).
    """

    def __init__(self, gm: fx.GraphModule, capture: set[fx.Node] = frozenset(),
                 probes: dict | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.meta: dict[fx.Node, Any] = {}
        self.capture = capture
        self.captured: dict[fx.Node, tuple[tuple, dict]] = {}
        self.passthrough: dict[fx.Node, int] = {}
        self.probes = dict(probes or {})
        self.probed: dict[fx.Node, Any] = {}
        self._kept: dict[fx.Node, Any] = {}
        self._readers: dict[fx.Node, int] = {}
        for ins, _ in self.probes.values():
            for a in ins:
                self._readers[a] = self._readers.get(a, 0) + 1

    def _always_passes_through(self, n: fx.Node, index: int, trials: int = 4) -> bool:
        """Seeing a call return its input once proves nothing if it branches
        on values: re-run it on random inputs of the same shapes (means of
        both signs) and keep the shortcut only if it passes through each time."""
        args, kwargs = self.captured[n]
        if any(t.is_meta for t in _tensors_in((args, kwargs))):
            return False  # no values to compare on the meta device: assume it computes
        target = self.fetch_attr(n.target) if n.op == "call_module" else n.target
        if type(target) is nn.Identity:  # its forward is `return input`: nothing to re-run
            return True
        gen = torch.Generator().manual_seed(0)
        for trial in range(trials):
            shift = (-1.0, 1.0, 0.0, 3.0)[trial % 4]
            new_args, new_kwargs = _redraw(args, gen, shift), _redraw(kwargs, gen, shift)
            flat = _tensors_in((new_args, new_kwargs))
            before = [t.clone() for t in flat]
            try:
                with torch.no_grad():
                    out = target(*new_args, **new_kwargs)
            except Exception:  # noqa: BLE001
                return False
            original = _tensors_in((args, kwargs))
            ref = self.env.get(n.all_input_nodes[index])
            k = next((j for j, t in enumerate(original) if t is ref), None)
            if k is None or out is not flat[k]:
                return False
            # handing back the same object after writing into it is no identity
            if any(not torch.equal(t, b) for t, b in zip(flat, before)):
                return False
        return True

    def run_node(self, n: fx.Node) -> Any:
        if n in self.capture:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.captured[n] = (args, kwargs)
        value = super().run_node(n)
        if n in self.capture and isinstance(value, torch.Tensor):
            # an opaque call that hands back one of its inputs unchanged
            for i, a in enumerate(n.all_input_nodes):
                if self.env.get(a) is value and self._always_passes_through(n, i):
                    self.passthrough[n] = i
                    break
        self.meta[n] = describe(value)
        if n in self._readers:
            self._kept[n] = value
        if n in self.probes:
            ins, fn = self.probes[n]
            try:
                self.probed[n] = fn(*(self._kept.get(a) for a in ins), value)
            except Exception:  # noqa: BLE001 - a probe that cannot decide says no
                self.probed[n] = None
            for a in ins:
                self._readers[a] -= 1
                if not self._readers[a]:
                    self._kept.pop(a, None)
        return value


def _redraw(obj, gen, shift):
    """``obj`` with every floating tensor replaced by random values."""
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return (torch.randn(obj.shape, generator=gen) + shift).to(obj.dtype).to(obj.device)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_redraw(o, gen, shift) for o in obj)
    if isinstance(obj, dict):
        return {k: _redraw(v, gen, shift) for k, v in obj.items()}
    return obj


def default_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> tuple:
    """Example inputs for a model that was given none.

    timm models: ``pretrained_cfg['input_size']``. torchvision classification
    models: 3x224x224 (or the model's ``image_size``). Otherwise guessed from
    the first parametrised layer (Linear, Conv, Embedding); an error says what
    to pass when no guess is possible.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")

    def image(c, h, w):
        return (torch.randn(batch, c, h, w, generator=gen).to(device=device, dtype=dtype),)

    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"][-3:]
        return image(c, h, w)
    if type(model).__module__.startswith("torchvision.models"):
        size = getattr(model, "image_size", 224)
        return image(3, size, size)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (torch.randn(batch, m.in_features, generator=gen).to(device=device, dtype=dtype),)
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (batch, 8), generator=gen).to(device),)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)] if type(m) in (
                nn.Conv1d, nn.Conv2d, nn.Conv3d) else 2
            shape = (batch, m.in_channels) + (32,) * spatial
            return (torch.randn(*shape, generator=gen).to(device=device, dtype=dtype),)
        if len(list(m.children())) == 0 and any(True for _ in m.parameters(recurse=False)):
            break
    raise ValueError(f"cannot guess example inputs for {type(model).__name__}: pass "
                     "example_inputs=(tensor, ...) with the shapes forward expects")
