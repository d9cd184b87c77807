"""Recurrent layers and cells: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, their
cells, and the ATen ops torch.export captures them as.

A recurrent layer's hidden units can be permuted by one P per layer and
direction: the rows of each gate block of ``weight_ih``, ``weight_hh`` and the
biases, and the columns of ``weight_hh``. h (and c) then carry P at every time
step, and a zero initial state is unchanged by it. The gate blocks stay in
place and time is fixed (structural axes). The output features concatenate
the directions' hidden units, which the next layer's ``weight_ih`` columns
follow.

The final states ``h_n`` (and ``c_n``) stack every layer and direction on one
axis: when they are read, or an initial state is given, all layers and
directions share one P, so that the stacked hidden axis carries a single
permutation. That is still a symmetry of the layer, only a smaller one.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from ...trace import op_name_of
from ..context import VALUE_COPIES
from ..registry import rule

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}
aten = torch.ops.aten


def gate_rows(ctx, w_ih, w_hh, b_ih, b_hh, gates: int, x_features: int) -> int:
    """Relate one layer's (or cell's) tensors; return its hidden-unit symbol."""
    ctx.union(w_ih[1], x_features)
    gate, hidden = ctx.refine_product(w_ih[0], [gates, ctx.size[w_hh[1]]])
    ctx.block(gate, "RNN gate blocks", structural=True)
    ctx.union(w_hh[0], w_ih[0])
    ctx.union(w_hh[1], hidden)
    for b in (b_ih, b_hh):
        if b:
            ctx.union(b[0], w_ih[0])
    return hidden


def stack_layers(ctx, x_features: int, num_layers: int, dirs: int, hidden_size: int,
                 weights, gates: int, shared: int | None) -> int:
    """Relate a stacked (and perhaps bidirectional) recurrent layer's tensors;
    ``weights(k, d)`` gives layer ``k``, direction ``d``'s ``(w_ih, w_hh, b_ih,
    b_hh)`` layouts (None for absent biases). Returns the output features'
    symbol: the last layer's hidden units, the directions concatenated. With
    ``shared``, every layer and direction takes that one permutation."""
    prev = x_features
    for k in range(num_layers):
        hidden = []
        for d in range(dirs):
            h = gate_rows(ctx, *weights(k, d), gates, prev)
            if shared is not None:
                ctx.union(h, shared)
            hidden.append(h)
        if dirs == 1:
            prev = hidden[0]
        else:
            prev = ctx.new(dirs * hidden_size)
            for piece, h in zip(ctx.refine_concat(prev, [hidden_size] * dirs), hidden):
                ctx.union(piece, h)
    return prev


def _state_users_only_read_output(ctx) -> bool:
    return all(u.op == "call_function" and u.target is operator.getitem and u.args[0] is ctx.node
               and u.args[1] == 0 for u in ctx.node.users)


@rule(nn.LSTM, nn.GRU, nn.RNN)
def _rnn(ctx):
    m = ctx.module
    if getattr(m, "proj_size", 0):
        raise ValueError("LSTM with proj_size")
    x = ctx.args[0]
    if not ctx.is_tensor(x):
        raise ValueError("packed sequences")
    lay = list(ctx.layout(x))
    batched = len(lay) == 3
    t_axis = 1 if (batched and m.batch_first) else 0
    ctx.block(lay[t_axis], "recurrence over time", structural=True)
    initial = [a for a in ctx.args[1:] + tuple(ctx.kwargs.values())]
    initial = [t for a in initial for t in (a if isinstance(a, (tuple, list)) else [a])
               if ctx.is_tensor(t)]
    shared = ctx.new(m.hidden_size) if initial or not _state_users_only_read_output(ctx) else None
    dirs = 2 if m.bidirectional else 1

    def weights(k, d):
        sfx = f"l{k}" + ("_reverse" if d else "")
        b = [ctx.param(f"bias_ih_{sfx}"), ctx.param(f"bias_hh_{sfx}")] if m.bias else [None, None]
        return ctx.param(f"weight_ih_{sfx}"), ctx.param(f"weight_hh_{sfx}"), *b
    out = lay[:-1] + [stack_layers(ctx, lay[-1], m.num_layers, dirs, m.hidden_size, weights,
                                   _GATES[type(m)], shared)]
    state_meta = ctx.meta()[1]
    if shared is None:
        return [out, ctx.fresh(state_meta, blocked="final RNN state")]
    batch = [lay[0 if m.batch_first else 1]] if batched else []

    def state():  # (layers x directions, [batch,] hidden)
        return [ctx.new(m.num_layers * dirs, "RNN layers x directions", structural=True),
                *batch, shared]
    states = [state(), state()] if isinstance(m, nn.LSTM) else state()
    for given, lay_s in zip(initial, states if isinstance(m, nn.LSTM) else [states]):
        for a, s in zip(ctx.layout(given), lay_s):
            ctx.union(a, s)
    return [out, states]


def cell_rule(ctx, x, states: list, w_ih, w_hh, b_ih, b_hh, gates: int, n_out: int):
    """One step of an LSTM / GRU / Elman cell: ``(x, states) -> n_out`` states."""
    lx = list(ctx.layout(x))
    hidden = gate_rows(ctx, w_ih, w_hh, b_ih, b_hh, gates, lx[-1])
    out = lx[:-1] + [hidden]
    for s in states:
        if ctx.is_tensor(s):
            for a, b in zip(ctx.layout(s), out):
                ctx.union(a, b)
    return out if n_out == 1 else [list(out) for _ in range(n_out)]


@rule(nn.LSTMCell, nn.GRUCell, nn.RNNCell)
def _cell_module(ctx):
    m = ctx.module
    hx = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("hx")
    states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    b = [ctx.param("bias_ih"), ctx.param("bias_hh")] if m.bias else [None, None]
    n_out = 2 if isinstance(m, nn.LSTMCell) else 1
    return cell_rule(ctx, ctx.args[0], states, ctx.param("weight_ih"), ctx.param("weight_hh"), *b,
                     _GATES[type(m)], n_out)


_CELL_OPS = {"lstm_cell": (4, 2), "gru_cell": (3, 1), "rnn_tanh_cell": (1, 1), "rnn_relu_cell": (1, 1)}


@rule(*[getattr(aten, n) for n in _CELL_OPS if hasattr(aten, n)])
def _cell_op(ctx):
    """``aten.lstm_cell(x, [h, c], w_ih, w_hh, b_ih, b_hh)`` and the others
    (``hx`` a tensor for them)."""
    gates, n_out = _CELL_OPS[ctx.op_name]
    hx = ctx.args[1]
    states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    w = [ctx.layout(a) if ctx.is_tensor(a) else None for a in ctx.args[2:6]]
    w += [None] * (4 - len(w))
    return cell_rule(ctx, ctx.args[0], states, *w, gates, n_out)


_ZERO_FACTORIES = {"zeros", "new_zeros", "zeros_like"}
_SAME_VALUES = VALUE_COPIES | {"expand", "view", "reshape", "unsqueeze", "_unsafe_view"}


def _is_zeros(ctx, node) -> bool:
    """Is ``node`` all zeros whatever the inputs (a default initial state)?"""
    for _ in range(8):
        t = ctx.constant(node)
        if t is not None:
            return bool((t == 0).all())
        if getattr(node, "op", None) != "call_function":
            return False
        name = op_name_of(node.target)
        if name in _ZERO_FACTORIES:
            return True
        if name not in _SAME_VALUES:
            return False
        node = node.args[0]
    return False


_LAYER_OPS = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@rule(*[getattr(aten, n) for n in _LAYER_OPS if hasattr(aten, n)])
def _layer_op(ctx):
    """``aten.lstm(x, [h0, c0], params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)`` and the GRU / Elman ops (``hx`` one tensor):
    what torch.export records for ``nn.LSTM`` and the others, with ``params``
    flat, ``[w_ih, w_hh, b_ih, b_hh]`` per layer and direction. As the module
    rule; an initial state made of zeros counts as none."""
    gates = _LAYER_OPS[ctx.op_name]
    x, hx, params = ctx.args[0], ctx.args[1], list(ctx.args[2])
    has_biases, num_layers, bidirectional, batch_first = (
        ctx.value(ctx.args[3]), ctx.value(ctx.args[4]), ctx.value(ctx.args[7]), ctx.value(ctx.args[8]))
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != num_layers * dirs * per:
        raise ValueError("recurrent layer with projections or an unknown parameter layout")
    lay = list(ctx.layout(x))
    batched = len(lay) == 3
    ctx.block(lay[1 if (batched and batch_first) else 0], "recurrence over time", structural=True)
    states_in = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    given = [s for s in states_in if ctx.is_tensor(s) and not _is_zeros(ctx, s)]
    reads_state = any(not (u.op == "call_function" and u.target is operator.getitem
                           and (u.args[1] == 0 or not u.users)) for u in ctx.node.users)
    hidden_size = ctx.shape(params[1])[1]
    shared = ctx.new(hidden_size) if given or reads_state else None

    def weights(k, d):
        w = [ctx.layout(p) for p in params[(k * dirs + d) * per:(k * dirs + d + 1) * per]]
        return (w[0], w[1], *(w[2:4] if has_biases else [None, None]))
    out = lay[:-1] + [stack_layers(ctx, lay[-1], num_layers, dirs, hidden_size, weights, gates,
                                   shared)]
    metas = ctx.meta()
    if shared is None:
        return [out] + [ctx.fresh(m, blocked="final RNN state") for m in metas[1:]]
    states = []
    for s_in, m in zip(states_in, metas[1:]):
        st = [ctx.new(m.shape[0], "RNN layers x directions", structural=True)]
        st += [lay[0 if batch_first else 1]] if batched else []
        st.append(shared)
        if ctx.is_tensor(s_in) and not _is_zeros(ctx, s_in):
            for a, s in zip(ctx.layout(s_in), st):
                ctx.union(a, s)
        states.append(st)
    return [out] + states
