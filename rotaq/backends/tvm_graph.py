"""Shared graph plumbing of the TVM lowerings.

The pattern lowerings (Kronecker transforms, attention, matmuls) are onnxscript rewrite rules
over an ``onnx_ir`` model: :func:`apply_rules`, :func:`init_array` for their constant checks,
:func:`on_proto` to run one on an ``onnx.ModelProto`` in place. GQA folding and causal marking,
which prove a subgraph by running it on probe data, read the proto through one
:class:`ProtoIndex` (initializers, producers, readers) and :func:`static_dims`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ATTN_OP = "RotaqAttention"  # the fused attention node (lowered by tvm_attention)


class ProtoIndex:
    """``proto``'s graph as it is now: build one after the graph changes."""

    def __init__(self, proto: Any) -> None:
        g = proto.graph
        self.inits = {t.name: t for t in g.initializer}
        self.nodes = list(g.node)
        self.producer = {o: nd for nd in self.nodes for o in nd.output}
        self.readers: dict[str, list] = {}
        for nd in self.nodes:
            for i in nd.input:
                self.readers.setdefault(i, []).append(nd)
        self.outputs = {o.name for o in g.output}

    def only_reader(self, value: str, node: Any) -> bool:
        """``node`` is the one reader of ``value``, which is not a graph output."""
        return value not in self.outputs and \
            [id(r) for r in self.readers.get(value, [])] == [id(node)]

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element initializer, else None."""
        arr = self.array(name)
        return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def static_dims(proto: Any) -> dict[str, list[int]]:
    """Value -> its dims, for the inputs, outputs and value_info whose dims are all known."""
    out = {}
    for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    return out


_SAME_VALUES = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten")


def index_bounds(proto: Any) -> dict[str, int]:
    """Graph inputs that index a constant table: input -> rows of the smallest table it indexes
    (``Gather`` over an initializer or ``Constant``, reached through ops that keep the values:
    Cast, (Un)squeeze, Reshape, Identity, Flatten). TVM lowers Gather without bounds checks, so
    an out-of-range token id read past the embedding and crashed the process (SIGSEGV); the
    runtime checks these inputs against the bounds."""
    from onnx import helper

    rows: dict[str, list[int]] = {t.name: list(t.dims) for t in proto.graph.initializer}
    readers: dict[str, list] = {}
    for nd in proto.graph.node:
        if nd.op_type == "Constant" and nd.attribute and nd.attribute[0].name == "value":
            rows[nd.output[0]] = list(nd.attribute[0].t.dims)
        for i in nd.input:
            readers.setdefault(i, []).append(nd)
    ints = {6, 7, 12, 13}  # TensorProto int32, int64, uint32, uint64
    out: dict[str, int] = {}
    for inp in proto.graph.input:
        if inp.type.tensor_type.elem_type not in ints:
            continue
        todo, seen = [inp.name], set()
        while todo:
            v = todo.pop()
            seen.add(v)
            for nd in readers.get(v, []):
                if nd.op_type in _SAME_VALUES and nd.input[0] == v and nd.output[0] not in seen:
                    todo.append(nd.output[0])
                elif nd.op_type == "Gather" and len(nd.input) > 1 and nd.input[1] == v and \
                        nd.input[0] in rows and rows[nd.input[0]]:
                    axis = next((helper.get_attribute_value(a) for a in nd.attribute
                                 if a.name == "axis"), 0)
                    n = rows[nd.input[0]][axis]
                    out[inp.name] = min(out.get(inp.name, n), n)
    return out


def init_array(value: Any) -> np.ndarray | None:
    """The array of an ``onnx_ir`` value that is an initializer, else None (a Constant node's
    output is not one, as for :meth:`ProtoIndex.array`)."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def init_scalar(value: Any) -> float | None:
    """The value of a one-element initializer, else None."""
    arr = init_array(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def apply_rules(model: Any, rules: Sequence[Any]) -> int:
    """Apply onnxscript rewrite ``rules`` to ``model`` (an ``onnx_ir.Model``, in place), node
    by node in graph order; returns the number of rewrites."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet(list(rules)).apply_to_model(model)


def on_proto(proto: Any, lower: Callable[[Any], Any], changed: Callable[[Any], bool] = bool
             ) -> Any:
    """``lower(model)`` on an ``onnx_ir`` view of ``proto``; the result written back into
    ``proto`` when ``changed(result)``. Returns the result."""
    import onnx_ir as ir

    model = ir.serde.deserialize_model(proto)
    out = lower(model)
    if changed(out):
        proto.CopyFrom(ir.serde.serialize_model(model))
    return out
