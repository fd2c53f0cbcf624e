"""Emission plumbing shared by the ONNX emitters (:mod:`onnx_chain`, :mod:`onnx_quant`): an
emitter of tagged nodes with fresh names, opset queries and upgrades, and splicing emitted nodes
into the graph (after a value's producer, or in place of a linear).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq.errors import RewriteError

logger = logging.getLogger(__name__)

ROLE_KEY = "rotaq.role"
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Reduce ops whose ``axes`` moved from attribute to input in opset 18 (ReduceSum moved in 13)
_REDUCE_18 = {
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSumSquare",
}


def default_opset(g: Any) -> int:
    imports = g.model.opset_imports
    for d in _DEFAULT_DOMAINS:
        if d in imports:
            return int(imports[d])
    return 1


def require_opset(g: Any, need: int) -> None:
    """Raise the default-domain opset import to ``need``, migrating what changed on the way:
    from < 18, the ``axes`` attribute of Reduce* ops becomes an input and ``Split`` gets
    ``num_outputs``. Models below opset 13 (and GroupNormalization below 21) are refused."""
    imports = g.model.opset_imports
    dom = next((d for d in _DEFAULT_DOMAINS if d in imports), "")
    cur = int(imports.get(dom, 1))
    if cur >= need:
        return
    nodes = [n for n in oir.traversal.RecursiveGraphIterator(g.model.graph)
             if n.domain in _DEFAULT_DOMAINS]
    if cur < 13:
        raise RewriteError(
            f"the model uses opset {cur}; quantized lowering needs opset {need}: convert it first "
            "(onnx.version_converter.convert_version(model, 21))")
    if need >= 21 and any(n.op_type == "GroupNormalization" for n in nodes):
        raise RewriteError(
            f"the model uses opset {cur} with GroupNormalization, whose meaning changed in opset "
            "21: convert it first (onnx.version_converter)")
    if cur < 18 <= need:
        for n in nodes:
            if n.op_type in _REDUCE_18 and "axes" in n.attributes:
                axes = [int(a) for a in n.attributes.pop("axes").value]
                v = g._initializer(np.array(axes, np.int64), oir.DataType.INT64,
                                   f"{n.name}.axes")
                n.resize_inputs(2)
                n.replace_input_with(1, v)
            elif (n.op_type == "Split" and (len(n.inputs) < 2 or n.inputs[1] is None)
                  and "num_outputs" not in n.attributes):
                n.attributes["num_outputs"] = oir.AttrInt64("num_outputs", len(n.outputs))
    imports[dom] = need
    logger.info("raised the default opset import from %d to %d", cur, need)


class _Emitter:
    """Builds tagged nodes with fresh names for one rewrite."""

    def __init__(self, g: Any, meta: dict[str, str], base: str,
                 consts: str = "{base}.{hint}") -> None:
        self.g = g
        self.meta = meta
        self.base = base.replace("/", "_")
        self.consts = consts  # the initializers' name pattern
        self.nodes: list[oir.Node] = []

    def value(self, hint: str, dtype: oir.DataType | None = None, shape: Any = None) -> oir.Value:
        t = oir.TensorType(dtype) if dtype is not None else None
        shp = oir.Shape(list(shape)) if shape is not None else None
        return oir.Value(name=self.g._fresh(f"{self.base}_{hint}"), type=t, shape=shp)

    def const(self, array: np.ndarray, dtype: oir.DataType, hint: str) -> oir.Value:
        name = self.consts.format(base=self.base, hint=hint)
        return self.g._initializer(np.asarray(array), dtype, name)

    def node(self, op: str, inputs: Sequence[oir.Value | None], outputs: Sequence[oir.Value],
             attrs: Sequence[oir.Attr] = (), domain: str = "", name: str | None = None,
             extra: dict[str, str] | None = None) -> oir.Node:
        ins = list(inputs)
        while ins and ins[-1] is None:
            ins.pop()
        n = oir.Node(domain, op, ins, list(attrs), outputs=list(outputs),
                     name=name or self.g._fresh(f"rotaq_{op}_{self.base}"),
                     metadata_props={**self.meta, **(extra or {})})
        self.nodes.append(n)
        return n


def _reduce(em: _Emitter, op: str, x: oir.Value, opset: int, out: oir.Value) -> None:
    if opset >= 18:
        axes = em.const(np.array([-1], np.int64), oir.DataType.INT64, "axes")
        em.node(op, [x, axes], [out], [oir.AttrInt64("keepdims", 1)])
    else:
        em.node(op, [x], [out], [oir.AttrInt64s("axes", [-1]), oir.AttrInt64("keepdims", 1)])


def _insert_after_value(g: Any, x: oir.Value, nodes: list[oir.Node]) -> None:
    if not nodes:
        return
    graph = g.model.graph
    prod = x.producer()
    if prod is not None and prod.graph is graph:
        graph.insert_after(prod, nodes)
    else:
        graph.insert_before(next(iter(graph)), nodes)


def _discard(g: Any, emitters: Sequence[_Emitter]) -> None:
    """Drop the initializers of a rewrite that failed before its nodes were inserted."""
    mine = [n for em in emitters for n in em.nodes]
    ids = {id(n) for n in mine}
    orphans = {id(v): v for n in mine for v in n.inputs
               if v is not None and v.is_initializer()
               and all(id(u.node) in ids for u in v.uses())}
    for n in mine:  # detach: a node never inserted must not stay a user of graph values
        n.resize_inputs(0)
    for v in orphans.values():
        g.model.graph.initializers.pop(v.name, None)


def _replace(g: Any, lin: Any, act_em: _Emitter, em: _Emitter, out: oir.Value) -> str:
    """Put ``em.nodes`` (computing ``out``) in place of the linear, ``act_em.nodes`` right after
    the producer of its input; ``out`` takes the linear's output name."""
    graph = g.model.graph
    old_nodes = [lin.node] + ([lin.bias_add] if lin.bias_add is not None else [])
    final = old_nodes[-1].outputs[0]
    name = final.name
    out.type = final.type if final.type is not None else out.type
    out.shape = final.shape.copy() if final.shape is not None else out.shape
    _insert_after_value(g, lin.node.inputs[0], act_em.nodes)
    graph.insert_before(lin.node, em.nodes)
    final.replace_all_uses_with(out, replace_graph_outputs=True)
    old_w, old_b = lin.node.inputs[1], lin.bias
    graph.remove(old_nodes, safe=True)
    final.name = g._fresh(f"{name}_replaced")
    out.name = name
    g._drop_if_unused(old_w)
    g._drop_if_unused(old_b)
    g._invalidate()
    return name


def consumers_of(g: Any, value: str, consumers: Sequence[str], what: str, rank: bool = False
                 ) -> tuple[oir.Value, list[oir.Node]]:
    """The float value ``value`` (of known rank with ``rank``) and the nodes ``consumers`` that
    read it, or a clear error."""
    v = g._value(value)
    users = [g._node(k) for k in consumers]
    if not users:
        raise RewriteError(f"{what}: no consumers given")
    for user in users:
        if not any(x is v for x in user.inputs):
            raise RewriteError(f"{what}: node {user.name!r} does not read {value!r}")
    if rank and v.shape is None:
        raise RewriteError(f"{what}: rank of {value!r} is unknown")
    if v.dtype is None or not v.dtype.is_floating_point():
        raise RewriteError(f"{what}: {value!r} is not a float tensor")
    return v, users


def rewire(g: Any, v: oir.Value, users: Sequence[oir.Node], out: oir.Value, em: _Emitter) -> str:
    """Make ``users`` read ``out`` (computed by ``em``'s nodes, spliced in after ``v``'s
    producer) instead of ``v``; returns ``out``'s name."""
    for user in users:
        for i in [i for i, x in enumerate(user.inputs) if x is v]:
            user.replace_input_with(i, out)
    _insert_after_value(g, v, em.nodes)
    g._invalidate()
    return out.name
