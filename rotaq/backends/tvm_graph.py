"""One index of an ONNX proto for the TVM lowerings that rewrite it (attention, Kronecker
transforms, GQA folding, causal marking): initializers, producers, readers, static shapes."""

from __future__ import annotations

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


def drop_nodes(proto: Any, drop: set[int]) -> None:
    """Remove the nodes whose ``id`` is in ``drop``, keeping the order of the others."""
    if drop:
        keep = [nd for nd in proto.graph.node if id(nd) not in drop]
        del proto.graph.node[:]
        proto.graph.node.extend(keep)


def static_dims(proto: Any) -> dict[str, list[int]]:
    """Value -> its dims, for the inputs, outputs and value_info whose dims are all known."""
    out = {}
    for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    return out
