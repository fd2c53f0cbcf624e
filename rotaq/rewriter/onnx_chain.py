"""The ONNX chain emitter: a :class:`Chain` as standard ops that stock ONNX Runtime runs (Reshape,
Transpose, MatMul, ReduceSum, Add, Mul, Gather; fake quantizers as Abs / ReduceMax / ReduceMin /
Div / Round / Clip / Mul ...). A linear replaced by (or extended with) a chain, or a chain
inserted on any value for some of its consumers (:func:`insert_chain`: online transforms, fake
quantizers, masks).

Emitted nodes carry ``rotaq.role = chain`` unless the caller tags them otherwise: the view lifts
them as op ``chain``, never as linears.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq import tags
from rotaq.errors import RewriteError
from rotaq.rewriter.chain import TINY, Chain, Step
from rotaq.rewriter.onnx_emit import (
    ROLE_KEY,
    _Emitter,
    _insert,
    _reduce,
    _replace,
    consumers_of,
    default_opset,
    rewire,
)

ROLE = tags.ROLE_CHAIN
TRANSFORM_ROLE = tags.ROLE_TRANSFORM  # what backends/tvm_hadamard.py matches
ROLES = ("chain", "online", "quant")  # insert_chain's roles (the view's op for the nodes)
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


def emit_chain(g: Any, em: _Emitter, x: oir.Value, chain: Chain, dt: oir.DataType) -> oir.Value:
    """``em``'s nodes computing ``chain(x)`` in ``dt``; returns the output value."""
    if x.shape is None and chain.needs_rank:
        raise RewriteError(f"chain on {x.name!r}: the input's rank is unknown")
    opset = default_opset(g)
    y = x
    dims = None if x.shape is None else list(x.shape.dims)
    lead, grid = None, None
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
        if s.op in ("absmax", "minmax"):
            grid = _row_grid(em, y, s, dt, shape, opset)
            continue
        if s.op == "grid":
            out = _grid(em, y, s, grid, dt, shape)
        elif s.op in ("matmul", "lmatmul"):
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
                    {"axis": -1})
        elif s.op in ("split", "merge"):  # Reshape [0, .., 0, sizes]: leading dims copied
            keep = rank - (1 if s.op == "split" else s.arg[0])
            out = _reshape(em, y, (0,) * keep + tuple(dims[keep:]), dt, s.op, shape)
        elif s.op == "reshape":
            out = _reshape(em, y, s.arg, dt, "r")
        elif s.op == "transpose":
            out = em.value("t", dt)
            em.node("Transpose", [y], [out], {"perm": [int(a) for a in s.arg]})
        else:
            out = em.value("sum", dt)
            if opset >= 13:
                em.node("ReduceSum", [y, em.const(np.array([s.arg[0]]), _I64, "axes")], [out],
                        {"keepdims": 0})
            else:
                em.node("ReduceSum", [y], [out], {"axes": [int(s.arg[0])], "keepdims": 0})
        y = out
    if chain.flat:
        full = em.value("out_shape", _I64, [len(x.shape)])
        em.node("Concat", [lead, em.const(np.array([chain.out_features]), _I64, "m")], [full],
                {"axis": 0})
        out = em.value("restored", dt)
        em.node("Reshape", [y, full], [out])
        y = out
    return y


def _row_grid(em: _Emitter, x: oir.Value, s: Step, dt: oir.DataType, shape: list | None,
              opset: int) -> tuple[oir.Value, oir.Value | None]:
    """The per-row ``(scale, zero)`` values of an ``absmax`` / ``minmax`` step."""
    red = None if shape is None else [*shape[:-1], 1]

    def op(name: str, ins: list[oir.Value], hint: str) -> oir.Value:
        out = em.value(hint, dt, red)
        em.node(name, ins, [out])
        return out

    tiny = em.const(np.array(TINY), dt, "tiny")
    if s.op == "absmax":
        ab = em.value("abs", dt, shape)
        em.node("Abs", [x], [ab])
        amax = em.value("amax", dt, red)
        _reduce(em, "ReduceMax", ab, opset, amax)
        scale0 = op("Mul", [amax, em.const(s.const, dt, "ratio")], "scale0")
        return op("Max", [scale0, tiny], "scale"), None
    zero, clip = em.const(np.array(0.0), dt, "zero"), em.const(s.const, dt, "clip")
    xmin, xmax = em.value("xmin", dt, red), em.value("xmax", dt, red)
    _reduce(em, "ReduceMin", x, opset, xmin)
    _reduce(em, "ReduceMax", x, opset, xmax)
    lo = op("Mul", [op("Min", [xmin, zero], "lo0"), clip], "lo")
    hi = op("Mul", [op("Max", [xmax, zero], "hi0"), clip], "hi")
    steps = em.const(np.array(float(s.arg[1])), dt, "steps")
    scale = op("Max", [op("Div", [op("Sub", [hi, lo], "range"), steps], "scale0"), tiny], "scale")
    zr = op("Round", [op("Div", [op("Neg", [lo], "neg_lo"), scale], "zero_f")], "zero_r")
    qmin, qmax = (em.const(np.array(float(a)), dt, h) for a, h in zip(s.arg, ("qmin", "qmax")))
    return scale, op("Clip", [zr, qmin, qmax], "zp")


def _grid(em: _Emitter, x: oir.Value, s: Step, grid: tuple | None, dt: oir.DataType,
          shape: list | None) -> oir.Value:
    """``(Clip(Round(x / s) + z, qmin, qmax) - z) * s``; no Add / Sub when ``z`` is 0."""
    if s.const is not None:
        scale = em.const(np.array(float(s.const[0])), dt, "act_scale")
        zp = em.const(np.array(float(s.const[1])), dt, "act_zp") if s.const[1] else None
    elif grid is not None:
        scale, zp = grid
    else:
        raise RewriteError("chain step 'grid' needs a scale: a constant or absmax / minmax first")

    def op(name: str, ins: list[oir.Value], hint: str) -> oir.Value:
        out = em.value(hint, dt, shape)
        em.node(name, ins, [out])
        return out

    q = op("Round", [op("Div", [x, scale], "scaled")], "q")
    if zp is not None:
        q = op("Add", [q, zp], "q_zp")
    qmin, qmax = (em.const(np.array(float(a)), dt, h) for a, h in zip(s.arg, ("qmin", "qmax")))
    c = op("Clip", [q, qmin, qmax], "clipped")
    if zp is not None:
        c = op("Sub", [c, zp], "centered")
    return op("Mul", [c, scale], "fq")


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
    em = _Emitter(g, {ROLE_KEY: ROLE, tags.CHAIN: f"{chain.kind} of {key}"}, key)
    y = emit_chain(g, em, lin.node.inputs[0], chain, _dtype(g, lin))
    return _replace(g, lin, _Emitter(g, {}, key), em, y)


def add_branch(g: Any, key: str, chain: Chain) -> str:
    """``Linear(x) -> Linear(x) + chain(x)``; the sum takes the linear's output name."""
    lin = _check(g, key, chain)
    dt = _dtype(g, lin)
    em = _Emitter(g, {ROLE_KEY: ROLE, tags.CHAIN: f"{chain.kind} branch of {key}"}, key)
    branch = emit_chain(g, em, lin.node.inputs[0], chain, dt)
    final = (lin.bias_add or lin.node).outputs[0]
    name = final.name
    total = em.value("sum", dt, None if final.shape is None else list(final.shape.dims))
    final.replace_all_uses_with(total, replace_graph_outputs=True)  # before the Add reads it
    em.node("Add", [final, branch], [total])
    _insert(g, em, after=final)
    final.name = g._fresh(f"{name}_main")
    total.name = name
    g._invalidate()
    return name


def insert_chain(g: Any, value: str, consumers: Sequence[str], chain: Chain,
                 role: str = "chain") -> str:
    """``x -> chain(x)`` on ``value`` for ``consumers`` only; returns the new value's name.
    ``role`` tags the nodes: ``"chain"`` (``rotaq.role = chain``), ``"online"`` (an online
    transform: ``rotaq.role = online_transform``, what backends/tvm_hadamard.py lowers) or
    ``"quant"`` (a simulated quantizer)."""
    if role not in ROLES:
        raise RewriteError(f"insert_chain: role must be one of {ROLES}, not {role!r}")
    v, users = consumers_of(g, value, consumers, "insert_chain", chain.needs_rank)
    last = v.shape[-1] if v.shape is not None and len(v.shape) else None
    if isinstance(last, int) and chain.in_features >= 0 and last != chain.in_features:
        raise RewriteError(f"insert_chain: {value!r} has last dim {last}, "
                           f"the chain takes {chain.in_features}")
    if role == "online":
        em = _Emitter(g, {ROLE_KEY: TRANSFORM_ROLE}, value, "rotaq_{hint}_{base}")
    else:
        em = _Emitter(g, {ROLE_KEY: role, tags.CHAIN: f"{chain.kind} on {value}"}, value)
    out = emit_chain(g, em, v, chain, v.dtype)
    if v.shape is not None:
        width = last if chain.out_features < 0 else chain.out_features
        out.shape = oir.Shape([*list(v.shape.dims)[:-1], width])
    return rewire(g, v, users, out, em)

