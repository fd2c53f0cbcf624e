"""A differentiable forward of either IR in torch, with chosen values computed by the caller.

``forward(graph, feeds, replace, after)`` runs the graph on ``feeds`` and returns its outputs as
torch tensors, so that a loss on them back-propagates into whatever the caller's functions
close over (a learned rotation, a quantizer's parameters):

- ``replace[value] = (input, fn)``: ``value`` is computed as ``fn(input)`` instead of by its
  node (a linear's output from its input, e.g. with rotated and fake-quantized weights);
- ``after[value] = fn``: ``value`` is replaced by ``fn(value)`` once computed.

An FX graph runs through ``torch.fx.Interpreter``; an ONNX graph through a small interpreter of
the standard-domain ops that exported decoders use (listed in ``_OPS``; anything else raises
:class:`RewriteError` naming the op). Values are the names of :class:`GraphView` values, as the
analysis reports them. Float tensors run in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rotaq.errors import RewriteError

Fn = Callable[[torch.Tensor], torch.Tensor]

_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def forward(graph: Any, feeds: dict[str, np.ndarray], replace: dict[str, tuple[str, Fn]],
            after: dict[str, Fn] | None = None,
            cache: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The graph's outputs on ``feeds`` (module doc). ``cache``: a dict kept by the caller
    across calls on an unchanged graph, holding the ONNX constants as tensors (converted once)."""
    after = after or {}
    if graph.ir == "fx":
        return _fx(graph, feeds, replace, after)
    if graph.ir == "onnx":
        return _onnx(graph, feeds, replace, after, {} if cache is None else cache)
    raise RewriteError(f"no differentiable forward for IR {graph.ir!r}")


def _tensor(x: Any) -> torch.Tensor:
    t = torch.from_numpy(np.array(x))  # a copy: graph constants may be read-only
    return t.float() if t.is_floating_point() else t


# ---- FX ------------------------------------------------------------------------------------
def _fx(graph: Any, feeds, replace, after) -> list[torch.Tensor]:
    gm = graph._compiled()
    nodes = {n.name: n for n in gm.graph.nodes}

    class Run(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.name in replace:
                src, fn = replace[n.name]
                out = fn(self.env[nodes[src]])
            else:
                out = super().run_node(n)
            return after[n.name](out) if n.name in after else out

    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    args = [_tensor(feeds[graph.input_names[i]]) for i in range(len(names))]
    out = Run(gm).run(*args)
    flat = out if isinstance(out, (list, tuple)) else [out]
    return [t for t in torch.utils._pytree.tree_flatten(flat)[0] if isinstance(t, torch.Tensor)]


# ---- ONNX ----------------------------------------------------------------------------------
def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _reshape(x, shape, attrs):
    dims = _ints(shape)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x, starts, ends, axes=None, steps=None):
    axes = _ints(axes) or list(range(len(_ints(starts))))
    steps = _ints(steps) or [1] * len(axes)
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(_ints(starts), _ints(ends), axes, steps):
        if st != 1:
            raise RewriteError(f"differentiable forward: Slice with step {st} is not supported")
        n = x.shape[ax]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[ax] = slice(s, e)
    return x[tuple(idx)]


def _reduce_mean(x, axes=None, keepdims=1, noop=0):
    dims = _ints(axes)
    if not dims:
        return x if noop else x.mean(keepdim=bool(keepdims))
    return x.mean(dim=dims, keepdim=bool(keepdims))


def _squeeze(x, axes=None):
    dims = _ints(axes)
    return x.squeeze() if not dims else x.squeeze(tuple(d % x.dim() for d in dims))


def _unsqueeze(x, axes):
    for d in sorted(a % (x.dim() + len(_ints(axes))) for a in _ints(axes)):
        x = x.unsqueeze(d)
    return x


def _expand(x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _shape(x, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _gather(x, idx, axis):
    axis %= x.dim()
    flat = idx.reshape(-1) % x.shape[axis]  # ONNX allows negative indices
    out = torch.index_select(x, axis, flat)
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _fold(fn, ts):
    out = ts[0]
    for t in ts[1:]:
        out = fn(out, t)
    return out


def _gather_nd(x, idx, batch_dims):
    if batch_dims:
        raise RewriteError("differentiable forward: GatherND with batch_dims is not supported")
    return x[tuple(idx[..., j] for j in range(idx.shape[-1]))]


def _cumsum(x, axis, attrs):
    if attrs.get("exclusive", 0) or attrs.get("reverse", 0):
        raise RewriteError("differentiable forward: CumSum exclusive/reverse is not supported")
    return torch.cumsum(x, int(axis.item()))


def _const(value: Any) -> torch.Tensor:
    return _tensor(value.numpy())


_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Add": lambda i, a: i[0] + i[1], "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1], "Div": lambda i, a: i[0] / i[1],
    "Pow": lambda i, a: torch.pow(i[0], i[1]), "Neg": lambda i, a: -i[0],
    "Sqrt": lambda i, a: torch.sqrt(i[0]), "Reciprocal": lambda i, a: 1.0 / i[0],
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]), "Tanh": lambda i, a: torch.tanh(i[0]),
    "Exp": lambda i, a: torch.exp(i[0]), "Erf": lambda i, a: torch.erf(i[0]),
    "Cos": lambda i, a: torch.cos(i[0]), "Sin": lambda i, a: torch.sin(i[0]),
    "MatMul": lambda i, a: torch.matmul(i[0], i[1]),
    "Softmax": lambda i, a: torch.softmax(i[0], dim=a.get("axis", -1)),
    "Reshape": lambda i, a: _reshape(i[0], i[1], a),
    "Transpose": lambda i, a: i[0].permute(a["perm"]) if "perm" in a else i[0].permute(
        *reversed(range(i[0].dim()))),
    "Concat": lambda i, a: torch.cat([t for t in i if t is not None], dim=a["axis"]),
    "Slice": lambda i, a: _slice(*i),
    "Unsqueeze": lambda i, a: _unsqueeze(i[0], i[1]),
    "Squeeze": lambda i, a: _squeeze(*i),
    "Shape": lambda i, a: _shape(i[0], a.get("start", 0), a.get("end")),
    "Expand": lambda i, a: _expand(i[0], i[1]),
    "ReduceMean": lambda i, a: _reduce_mean(i[0], i[1] if len(i) > 1 else None,
                                            a.get("keepdims", 1), a.get("noop_with_empty_axes", 0)),
    "Range": lambda i, a: torch.arange(i[0].item(), i[1].item(), i[2].item(),
                                       dtype=i[0].dtype),
    "Cast": lambda i, a: i[0].to(_DTYPES[a["to"]]),
    "LessOrEqual": lambda i, a: i[0] <= i[1], "Less": lambda i, a: i[0] < i[1],
    "Greater": lambda i, a: i[0] > i[1], "Equal": lambda i, a: i[0] == i[1],
    "And": lambda i, a: i[0] & i[1], "Not": lambda i, a: ~i[0],
    "Where": lambda i, a: torch.where(i[0], i[1], i[2]),
    "Gather": lambda i, a: _gather(i[0], i[1], a.get("axis", 0)),
    "Identity": lambda i, a: i[0],
    "Max": lambda i, a: _fold(torch.maximum, i), "Min": lambda i, a: _fold(torch.minimum, i),
    "IsNaN": lambda i, a: torch.isnan(i[0]),
    "GatherND": lambda i, a: _gather_nd(i[0], i[1], a.get("batch_dims", 0)),
    "CumSum": lambda i, a: _cumsum(i[0], i[1], a),
    "ConstantOfShape": lambda i, a: torch.full(
        _ints(i[0]), float(a["value"].numpy().reshape(-1)[0]) if "value" in a else 0.0,
        dtype=_DTYPES[a["value"].dtype.value] if "value" in a else torch.float32),
    "Trilu": lambda i, a: (torch.triu if a.get("upper", 1) else torch.tril)(
        i[0], int(i[1].item()) if len(i) > 1 and i[1] is not None else 0),
}


def _onnx(graph: Any, feeds, replace, after, cache) -> list[torch.Tensor]:
    g = graph.model.graph
    if not cache:
        cache.update({v.name: _const(v.const_value) for v in g.initializers.values()
                      if v.const_value is not None})
    env: dict[str, torch.Tensor] = dict(cache)
    for v in g.inputs:
        if v.name in feeds:
            env[v.name] = _tensor(feeds[v.name])
    for node in g:
        outs = [o.name for o in node.outputs]
        if outs and outs[0] in replace:
            src, fn = replace[outs[0]]
            env[outs[0]] = fn(env[src])
        else:
            if node.domain not in ("", "ai.onnx") or (node.op_type not in _OPS
                                                       and node.op_type != "Constant"):
                raise RewriteError(f"differentiable forward: op {node.domain or 'ai.onnx'}."
                                   f"{node.op_type} (node '{node.name}') is not supported")
            attrs = {k: a.value for k, a in node.attributes.items()}
            if node.op_type == "Constant":
                env[outs[0]] = _const(attrs["value"])
                continue
            ins = [env[i.name] if i is not None and i.name else None for i in node.inputs]
            res = _OPS[node.op_type](ins, attrs)
            env[outs[0]] = res
        if outs[0] in after:
            env[outs[0]] = after[outs[0]](env[outs[0]])
    return [env[o.name] for o in g.outputs]
