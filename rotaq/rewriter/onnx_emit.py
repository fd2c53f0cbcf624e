"""Emission plumbing shared by the ONNX emitters (:mod:`onnx_chain`, :mod:`onnx_quant`): an
emitter recording tagged nodes and initializers with fresh names on an onnx-ir ``Tape``, opset
queries and raises (onnxscript's version converter), and splicing emitted nodes into the graph
(after a value's producer, or in place of a linear).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq import tags
from rotaq.errors import RewriteError

logger = logging.getLogger(__name__)

ROLE_KEY = tags.ROLE
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
    """Raise the default-domain opset import to ``need`` with onnxscript's version converter
    (:class:`~onnxscript.version_converter.ConvertVersionPass`, in place: it also drops dead
    nodes and unused opset imports). From opset 13..17 rotaq first migrates to 18 itself
    (:func:`_migrate_to_18`): the converter has no adapters below 18, and its fallback (onnx's C
    converter) rebuilds the graph without node metadata (rotaq's tags, the exporter's scopes).
    Refused: opsets below 13, and a GroupNormalization below 21 whose channels or scale/bias
    sizes are not static (the converter would relabel it without rewriting its scale)."""
    from onnxscript.version_converter import ConvertVersionPass

    cur = default_opset(g)
    if cur >= need:
        return
    if cur < 13:
        raise RewriteError(
            f"the model uses opset {cur}; quantized lowering needs opset {need}: convert it first "
            "(onnx.version_converter.convert_version(model, 21))")
    nodes = [n for n in oir.traversal.RecursiveGraphIterator(g.model.graph) if n.domain == ""]
    if need >= 21 and any(n.op_type == "GroupNormalization" and not _static_groupnorm(n)
                          for n in nodes):
        raise RewriteError(
            f"the model uses opset {cur} with GroupNormalization, whose meaning changed in opset "
            "21, and its channel count is not static: convert it first (onnx.version_converter)")
    _migrate_to_18(g, nodes if cur < 18 else [], max(cur, 18))
    if need > 18 and ConvertVersionPass(need)(g.model).modified:
        g._taken.update(n.name for n in g.model.graph)  # names of nodes the converter made
        g._taken.update(o.name for n in g.model.graph for o in n.outputs)
    g._invalidate()
    logger.info("raised the default opset import from %d to %d", cur, need)


def _static_groupnorm(n: oir.Node) -> bool:
    """Whether onnxscript's 20 -> 21 adapter can rewrite this GroupNormalization."""
    ins = list(n.inputs)
    shapes = [v.shape if v is not None else None for v in ins[:3]]
    return len(shapes) == 3 and None not in shapes and len(shapes[0]) > 1 and all(
        isinstance(d, int) for d in (shapes[0][1], shapes[1][0], shapes[2][0]))


def _migrate_to_18(g: Any, nodes: list[oir.Node], opset: int) -> None:
    """Opset 13..17 -> 18 of ``nodes`` (the graph's) and of the model's functions below 18
    (onnxscript's converter inlines them, so each function imports the model's ``opset``
    after): the ``axes`` attribute of Reduce* ops becomes an input (an initializer, a
    ``Constant`` inside a function), ``Split`` gets ``num_outputs``."""
    local: list[oir.Node] = []  # nodes of functions: no initializers there
    for f in g.model.functions.values():
        if f.opset_imports.get("", 18) < 18:
            local += [n for n in oir.traversal.RecursiveGraphIterator(f) if n.domain == ""]
        if "" in f.opset_imports:
            f.opset_imports[""] = opset
    in_function = {id(n) for n in local}
    for n in [*nodes, *local]:
        if n.op_type in _REDUCE_18 and "axes" in n.attributes:
            axes = [int(a) for a in n.attributes.pop("axes").value]
            if id(n) in in_function:
                tape = oir.tape.Tape()
                v = tape.op("Constant", [], {"value_ints": axes}, name=f"{n.name}.axes")
                n.graph.insert_before(n, tape.nodes)
            else:
                v = g._initializer(np.array(axes, np.int64), oir.DataType.INT64, f"{n.name}.axes")
            n.resize_inputs(2)
            n.replace_input_with(1, v)
        elif (n.op_type == "Split" and (len(n.inputs) < 2 or n.inputs[1] is None)
              and "num_outputs" not in n.attributes):
            n.attributes["num_outputs"] = oir.AttrInt64("num_outputs", len(n.outputs))
    if opset == 18:
        imports = g.model.opset_imports
        imports.pop("ai.onnx", None)
        imports[""] = 18


class _Emitter:
    """Records the tagged nodes and new initializers of one rewrite on an onnx-ir
    :class:`~onnx_ir.tape.Tape`, with fresh names; nothing enters the graph until the rewrite
    inserts them (:func:`_insert`)."""

    def __init__(self, g: Any, meta: dict[str, str], base: str,
                 consts: str = "{base}.{hint}") -> None:
        self.g = g
        self.meta = meta
        self.base = base.replace("/", "_")
        self.consts = consts  # the initializers' name pattern
        self.tape = oir.tape.Tape()

    @property
    def nodes(self) -> Sequence[oir.Node]:
        return self.tape.nodes

    def value(self, hint: str, dtype: oir.DataType | None = None, shape: Any = None) -> oir.Value:
        return oir.val(self.g._fresh(f"{self.base}_{hint}"), dtype,
                       list(shape) if shape is not None else None)

    def const(self, array: np.ndarray, dtype: oir.DataType, hint: str) -> oir.Value:
        """A new initializer (large ones spilled to disk, :mod:`rotaq.rewriter.onnx_store`)."""
        name = self.g._fresh(self.consts.format(base=self.base, hint=hint))
        return self.tape.initializer(self.g._store.tensor(np.asarray(array), dtype, name))

    def node(self, op: str, inputs: Sequence[oir.Value | None], outputs: Sequence[oir.Value],
             attrs: dict[str, Any] | None = None, domain: str = "", name: str | None = None,
             extra: dict[str, str] | None = None) -> oir.Node:
        ins = list(inputs)
        while ins and ins[-1] is None:
            ins.pop()
        self.tape.op_multi_out(op, ins, attrs, outputs=list(outputs), domain=domain,
                               name=name or self.g._fresh(f"rotaq_{op}_{self.base}"),
                               metadata_props={**self.meta, **(extra or {})})
        return self.tape.nodes[-1]


def _reduce(em: _Emitter, op: str, x: oir.Value, opset: int, out: oir.Value) -> None:
    if opset >= 18:
        axes = em.const(np.array([-1], np.int64), oir.DataType.INT64, "axes")
        em.node(op, [x, axes], [out], {"keepdims": 1})
    else:
        em.node(op, [x], [out], {"axes": [-1], "keepdims": 1})


def _insert(g: Any, em: _Emitter, before: oir.Node | None = None,
            after: oir.Value | None = None) -> None:
    """Put ``em``'s initializers in the graph and its nodes before the node ``before``, or right
    after the producer of the value ``after`` (first in the graph for an input or constant)."""
    graph = g.model.graph
    for v in em.tape.initializers:
        graph.register_initializer(v)
    if not em.nodes:
        return
    if before is not None:
        graph.insert_before(before, em.nodes)
        return
    prod = after.producer()
    if prod is not None and prod.graph is graph:
        graph.insert_after(prod, em.nodes)
    else:
        graph.insert_before(next(iter(graph)), em.nodes)


def _discard(emitters: Sequence[_Emitter]) -> None:
    """Forget a rewrite that failed before its nodes were inserted: they stop being users of
    graph values (their initializers were never registered)."""
    for em in emitters:
        for n in em.nodes:
            n.resize_inputs(0)


def _replace(g: Any, lin: Any, act_em: _Emitter, em: _Emitter, out: oir.Value) -> str:
    """Put ``em.nodes`` (computing ``out``) in place of the linear, ``act_em.nodes`` right after
    the producer of its input; ``out`` takes the linear's output name."""
    graph = g.model.graph
    old_nodes = [lin.node] + ([lin.bias_add] if lin.bias_add is not None else [])
    final = old_nodes[-1].outputs[0]
    name = final.name
    out.type = final.type if final.type is not None else out.type
    out.shape = final.shape.copy() if final.shape is not None else out.shape
    _insert(g, act_em, after=lin.node.inputs[0])
    _insert(g, em, before=lin.node)
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
    _insert(g, em, after=v)
    g._invalidate()
    return out.name
