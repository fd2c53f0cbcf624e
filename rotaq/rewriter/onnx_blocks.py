"""ONNX execution of graph segments for :mod:`rotaq.rewriter.blocks`.

A segment is the range of nodes (in the graph's topological order) after the producer of the
previous boundary value up to the producer of its own. It runs as a small sub-model in ONNX
Runtime: its nodes, only the initializers they read, its external inputs as graph inputs (typed
by the arrays fed) and the requested values as outputs. Sessions are cached per (segment,
outputs) and rebuilt when the segment's nodes or weights changed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_ir as oir

log = logging.getLogger(__name__)


def _scan(nodes: list[oir.Node]) -> tuple[list[str], list[oir.Value]]:
    """(external input names, initializers read) of ``nodes`` (subgraphs included)."""
    inner = [m for n in nodes for m in _subgraph_nodes(n)]
    local: set[int] = set()
    for n in [*nodes, *inner]:
        local.update(id(o) for o in n.outputs)
    for n in inner:
        g = n.graph
        if g is not None:
            local.update(id(v) for v in g.inputs)
            local.update(id(v) for v in g.initializers.values())
    ext: dict[str, None] = {}
    inits: dict[str, oir.Value] = {}
    for n in [*nodes, *inner]:
        for v in n.inputs:
            if v is None or id(v) in local:
                continue
            if v.is_initializer() and not v.is_graph_input():
                inits[v.name] = v
            else:
                ext[v.name] = None
    return list(ext), list(inits.values())


def _subgraph_nodes(n: oir.Node) -> list[oir.Node]:
    out = []
    for attr in n.attributes.values():
        graphs = []
        if attr.type == oir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == oir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            out.extend(oir.traversal.RecursiveGraphIterator(g))
    return out


class OnnxSegments:
    """Segments of an ``OnnxGraph`` cut after the producers of ``ends`` (+ a tail)."""

    def __init__(self, graph: Any, ends: list[str]) -> None:
        self.graph = graph
        self.ends = ends
        self._nodes: list[list[oir.Node]] = []
        self._sessions: dict[tuple[int, tuple[str, ...]], tuple[Any, Any, list[str]]] = {}
        self._upcast = bool(getattr(graph, "_upcast", False))
        self._split()

    # ---- structure ----------------------------------------------------------------------
    def _split(self) -> None:
        nodes = list(self.graph.model.graph)
        at = {o.name: i for i, n in enumerate(nodes) for o in n.outputs}
        cuts = [at[v] + 1 for v in self.ends]
        starts = [0, *cuts]
        stops = [*cuts, len(nodes)]
        self._nodes = [nodes[a:b] for a, b in zip(starts, stops)]
        self._info: dict[int, tuple[list[str], dict[str, oir.Value], list[oir.Value]]] = {}

    def changed(self, k: int) -> None:
        """Re-read segment ``k`` from the graph (its nodes were edited)."""
        nodes = list(self.graph.model.graph)
        wanted = {self.ends[j]: j for j in (k - 1, k) if 0 <= j < len(self.ends)}
        at = {o.name: i for i, n in enumerate(nodes) for o in n.outputs if o.name in wanted}
        first = at[self.ends[k - 1]] + 1 if k > 0 else 0
        last = at[self.ends[k]] + 1 if k < len(self.ends) else len(nodes)
        self._nodes[k] = nodes[first:last]
        self._info.pop(k, None)

    def release(self, k: int) -> None:
        """Drop the sessions of segment ``k`` (it will not run again)."""
        self._sessions = {key: s for key, s in self._sessions.items() if key[0] != k}

    def _analyze(self, k: int) -> tuple[list[str], dict[str, oir.Value], list[oir.Value]]:
        """(external inputs, values produced, initializers read) of segment ``k``."""
        if k not in self._info:
            ext, inits = _scan(self._nodes[k])
            top = {o.name: o for n in self._nodes[k] for o in n.outputs}
            self._info[k] = (ext, top, inits)
        return self._info[k]

    def _pruned(self, k: int, outputs: list[str]) -> tuple[list[oir.Node], list[str],
                                                            list[oir.Value]]:
        """The nodes of segment ``k`` that ``outputs`` need, their external inputs and
        initializers."""
        need = set(outputs)
        kept = []
        for n in reversed(self._nodes[k]):
            if any(o.name in need for o in n.outputs):
                kept.append(n)
                need.update(_scan([n])[0])
        kept.reverse()
        ext, inits = _scan(kept)
        return kept, ext, inits

    def inputs(self, k: int) -> set[str]:
        return set(self._analyze(k)[0])

    def produced(self, k: int) -> set[str]:
        return set(self._analyze(k)[1])

    def input_values(self) -> dict[str, str]:
        return {n: n for n in self.graph.input_names}

    def output_values(self) -> list[str]:
        return list(self.graph.output_names)

    # ---- running ------------------------------------------------------------------------
    def _fingerprint(self, k: int) -> tuple:
        return tuple((id(n), *(id(v.const_value) if v is not None and v.is_initializer()
                               else id(v) for v in n.inputs)) for n in self._nodes[k])

    def _model(self, k: int, env: dict[str, Any], outputs: list[str]) -> onnx.ModelProto:
        vals = self._analyze(k)[1]
        nodes, ext, inits = self._pruned(k, outputs)
        m = self.graph.model
        ins = []
        for name in ext:
            arr = np.asarray(env[name])
            ins.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), None))
        outs = []
        for name in outputs:
            v = vals[name]
            if v.dtype is not None:
                outs.append(onnx.helper.make_tensor_value_info(name, int(v.dtype), None))
            else:
                outs.append(onnx.ValueInfoProto(name=name))
        tensors = [_tensor_proto(v) for v in inits]
        graph = onnx.helper.make_graph([oir.serde.serialize_node(n) for n in nodes],
                                       f"segment_{k}", ins, outs, tensors)
        opsets = [onnx.helper.make_opsetid(d, ver) for d, ver in m.opset_imports.items()]
        proto = onnx.helper.make_model(graph, opset_imports=opsets)
        proto.ir_version = m.ir_version
        for f in m.functions.values():
            proto.functions.append(oir.serde.serialize_function(f))
        return proto

    def _session(self, k: int, env: dict[str, Any], outputs: list[str]):
        key = (k, tuple(outputs))
        fp = self._fingerprint(k)
        hit = self._sessions.get(key)
        if hit is not None and hit[0] == fp:
            return hit[1], hit[2]
        import onnxruntime as ort

        from rotaq.backends.ort import EXACT, session_options
        from rotaq.rewriter.onnx_run import not_implemented

        proto = self._model(k, env, outputs)
        ins = [i.name for i in proto.graph.input]
        from rotaq import dist

        opts = session_options("all", EXACT, threads=dist.threads())
        if self._upcast:
            proto = _upcast(proto)
        try:
            sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
        except Exception as err:
            if self._upcast or not not_implemented(err):
                raise
            log.info("segment %d: no ORT kernel in the graph's dtype; running an fp32 copy", k)
            self._upcast = True
            sess = ort.InferenceSession(_upcast(proto).SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
        self._sessions[key] = (fp, sess, ins)
        return sess, ins

    def run(self, k: int, env: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        """``outputs`` of segment ``k`` with its external inputs taken from ``env``."""
        if not outputs:
            return {}
        ext = self._analyze(k)[0]
        feeds = {v: np.asarray(env[v]) for v in ext}
        if self._upcast:
            feeds = {v: a.astype(np.float32) if a.dtype in (np.float16,) or
                     a.dtype.name == "bfloat16" else a for v, a in feeds.items()}
        sess, ins = self._session(k, feeds, outputs)
        got = sess.run(outputs, {v: feeds[v] for v in ins})
        return dict(zip(outputs, got))


def _tensor_proto(v: oir.Value) -> onnx.TensorProto:
    """The initializer of ``v`` with its bytes inline (an external tensor is read here: the
    segment's session is built from memory)."""
    t = v.const_value
    if isinstance(t, oir.ExternalTensor):
        proto = onnx.TensorProto(name=v.name, data_type=t.dtype.value, dims=list(t.shape.numpy()))
        proto.raw_data = t.tobytes()
        return proto
    proto = oir.serde.serialize_tensor(t)
    proto.name = v.name
    return proto


def _upcast(proto: onnx.ModelProto) -> onnx.ModelProto:
    from rotaq.rewriter.onnx_dtype import convert_float

    return oir.serde.serialize_model(convert_float(oir.serde.deserialize_model(proto)))
