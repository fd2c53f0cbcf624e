"""Chains on the ONNX side: a linear replaced by (or extended with) a :class:`Chain` of standard
ops (Reshape, Transpose, MatMul, ReduceSum, Add, Mul, Gather), all of which stock ONNX Runtime
runs; or a chain inserted on any value for some of its consumers (:func:`insert_chain`).

Emitted nodes carry ``rotaq.role = chain``: the view lifts them as op ``chain``, never as linears.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq.errors import RewriteError
from rotaq.rewriter.chain import Chain, Step
from rotaq.rewriter.onnx_quant import (
    ROLE_KEY,
    _Emitter,
    _insert_after_value,
    _replace,
    default_opset,
)

ROLE = "chain"
_I64 = oir.DataType.INT64


def _track(dims: list | None, s: Step) -> list | None:
    """The value's dims after step ``s`` (entries may be symbolic or None; None: rank unknown)."""
    if dims is None:
        return None
    d = list(dims)
    if s.op in ("matmul", "lmatmul"):
        if s.const.ndim > len(d):
            return [None] * s.const.ndim
        d[-1 if s.op == "matmul" else -2] = s.const.shape[-1 if s.op == "matmul" else -2]
    elif s.op == "gather":
        d[-1] = len(s.arg)
    elif s.op == "split":
        d[-1:] = list(s.arg)
    elif s.op == "merge":
        k = s.arg[0]
        if not all(isinstance(v, int) for v in d[-k:]):
            raise RewriteError(f"chain: cannot merge the axes {d[-k:]} of unknown size")
        d[-k:] = [int(np.prod(d[-k:]))]
    elif s.op == "reshape":
        d = [None if a == -1 else a for a in s.arg]
    elif s.op == "transpose":
        d = [d[i] for i in s.arg]
    elif s.op == "sum":
        del d[s.arg[0]]
    return d


def _emit(g: Any, em: _Emitter, x: oir.Value, chain: Chain, dt: oir.DataType) -> oir.Value:
    needs_rank = chain.flat or any(s.op in ("split", "merge") for s in chain.steps)
    if x.shape is None and needs_rank:
        raise RewriteError(f"chain on {x.name!r}: the input's rank is unknown")
    opset = default_opset(g)
    y = x
    dims = None if x.shape is None else list(x.shape.dims)
    lead = None
    if chain.flat:
        shp = em.value("shape", _I64, [len(x.shape)])
        em.node("Shape", [x], [shp])
        lead = em.value("lead", _I64, [len(x.shape) - 1])
        em.node("Slice", [shp, em.const(np.array([0]), _I64, "start"),
                          em.const(np.array([-1]), _I64, "end")], [lead])
        y = _reshape(em, y, (-1, chain.in_features), dt, "r")
        dims = [None, chain.in_features]
    for s in chain.steps:
        rank = None if dims is None else len(dims)
        dims = _track(dims, s)
        shape = None if chain.flat else dims  # flattened values keep no static shape
        if s.op in ("matmul", "lmatmul"):
            c = em.const(s.const, dt, "factor")
            out = em.value(s.op, dt, shape)
            em.node("MatMul", [y, c] if s.op == "matmul" else [c, y], [out])
        elif s.op in ("add", "mul"):
            out = em.value("bias_add" if s.op == "add" else "scaled", dt, shape)
            hint = "bias" if s.op == "add" else "scale"
            em.node(s.op.capitalize(), [y, em.const(s.const, dt, hint)], [out])
        elif s.op == "gather":
            out = em.value("gathered", dt, shape)
            em.node("Gather", [y, em.const(np.array(s.arg), _I64, "index")], [out],
                    [oir.AttrInt64("axis", -1)])
        elif s.op in ("split", "merge"):  # Reshape [0, .., 0, sizes]: leading dims copied
            keep = rank - (1 if s.op == "split" else s.arg[0])
            out = _reshape(em, y, (0,) * keep + tuple(dims[keep:]), dt, s.op, shape)
        elif s.op == "reshape":
            out = _reshape(em, y, s.arg, dt, "r")
        elif s.op == "transpose":
            out = em.value("t", dt)
            em.node("Transpose", [y], [out], [oir.AttrInt64s("perm", list(s.arg))])
        else:
            out = em.value("sum", dt)
            if opset >= 13:
                em.node("ReduceSum", [y, em.const(np.array([s.arg[0]]), _I64, "axes")], [out],
                        [oir.AttrInt64("keepdims", 0)])
            else:
                em.node("ReduceSum", [y], [out], [oir.AttrInt64s("axes", [s.arg[0]]),
                                                  oir.AttrInt64("keepdims", 0)])
        y = out
    if chain.flat:
        full = em.value("out_shape", _I64, [len(x.shape)])
        em.node("Concat", [lead, em.const(np.array([chain.out_features]), _I64, "m")], [full],
                [oir.AttrInt64("axis", 0)])
        out = em.value("restored", dt)
        em.node("Reshape", [y, full], [out])
        y = out
    return y


def _reshape(em: _Emitter, y: oir.Value, shape: tuple[int, ...], dt: oir.DataType, hint: str,
             dims: list | None = None) -> oir.Value:
    out = em.value(hint, dt, dims)
    em.node("Reshape", [y, em.const(np.array(shape), _I64, "shape")], [out])
    return out


def _check(g: Any, key: str, chain: Chain) -> Any:
    lin = g._linear(key)
    if (chain.in_features, chain.out_features) != (lin.in_features, lin.out_features):
        raise RewriteError(f"chain {chain.in_features}->{chain.out_features} does not fit "
                           f"linear {key!r} ({lin.in_features}->{lin.out_features})")
    return lin


def _dtype(g: Any, lin: Any) -> oir.DataType:
    x = lin.node.inputs[0]
    return x.dtype if x.dtype is not None and x.dtype.is_floating_point() \
        else g._const(lin.weight).dtype


def replace_linear(g: Any, key: str, chain: Chain) -> str:
    """``Linear(x) -> chain(x)`` (the chain carries the bias); the output keeps its name."""
    lin = _check(g, key, chain)
    em = _Emitter(g, {ROLE_KEY: ROLE, "rotaq.chain": f"{chain.kind} of {key}"}, key)
    y = _emit(g, em, lin.node.inputs[0], chain, _dtype(g, lin))
    return _replace(g, lin, _Emitter(g, {}, key), em, y)


def add_branch(g: Any, key: str, chain: Chain) -> str:
    """``Linear(x) -> Linear(x) + chain(x)``; the sum takes the linear's output name."""
    lin = _check(g, key, chain)
    dt = _dtype(g, lin)
    em = _Emitter(g, {ROLE_KEY: ROLE, "rotaq.chain": f"{chain.kind} branch of {key}"}, key)
    branch = _emit(g, em, lin.node.inputs[0], chain, dt)
    final = (lin.bias_add or lin.node).outputs[0]
    name = final.name
    uses = [(u.node, u.idx) for u in final.uses()]
    total = em.value("sum", dt, None if final.shape is None else list(final.shape.dims))
    em.node("Add", [final, branch], [total])
    _insert_after_value(g, final, em.nodes)
    for user, idx in uses:
        user.replace_input_with(idx, total)
    graph = g.model.graph
    for i, o in enumerate(graph.outputs):
        if o is final:
            graph.outputs[i] = total
    final.name = g._fresh(f"{name}_main")
    total.name = name
    g._invalidate()
    return name


def insert_chain(g: Any, value: str, consumers: Sequence[str], chain: Chain,
                 meta: dict[str, str] | None = None, consts: str = "{base}.{hint}") -> str:
    """``x -> chain(x)`` on ``value`` for ``consumers`` only; returns the new value's name.
    ``meta`` replaces the nodes' default tags (``rotaq.role = chain``); ``consts`` is the
    pattern of the new initializers' names."""
    v = g._value(value)
    users = [g._node(k) for k in consumers]
    if not users:
        raise RewriteError("insert_chain: no consumers given")
    for user in users:
        if not any(x is v for x in user.inputs):
            raise RewriteError(f"insert_chain: node {user.name!r} does not read {value!r}")
    if v.dtype is None or not v.dtype.is_floating_point():
        raise RewriteError(f"insert_chain: {value!r} is not a float tensor")
    last = v.shape[-1] if v.shape is not None and len(v.shape) else None
    if isinstance(last, int) and last != chain.in_features:
        raise RewriteError(f"insert_chain: {value!r} has last dim {last}, "
                           f"the chain takes {chain.in_features}")
    em = _Emitter(g, meta or {ROLE_KEY: ROLE, "rotaq.chain": f"{chain.kind} on {value}"}, value,
                  consts)
    out = _emit(g, em, v, chain, v.dtype)
    if v.shape is not None:
        out.shape = oir.Shape([*list(v.shape.dims)[:-1], chain.out_features])
    for user in users:
        for i in [i for i, x in enumerate(user.inputs) if x is v]:
            user.replace_input_with(i, out)
    _insert_after_value(g, v, em.nodes)
    g._invalidate()
    return out.name
