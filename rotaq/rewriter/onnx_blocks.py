"""ONNX execution of graph segments for :mod:`rotaq.rewriter.blocks`.

A segment is the range of nodes (in the graph's topological order) after the producer of the
previous boundary value up to the producer of its own. It runs as a small sub-model in ONNX
Runtime: its nodes, only the initializers they read, its external inputs as graph inputs (typed
by the arrays fed) and the requested values as outputs. Sessions are cached per (segment,
outputs) and rebuilt when the segment's nodes or weights changed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import onnx
import onnx_ir as oir

from rotaq.rewriter import onnx_store

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


def _weights_to_readers(segs: list[list[oir.Node]]) -> list[list[oir.Node]]:
    """``segs`` with each node that reads only initializers (e.g. the ``Transpose`` of a tied
    embedding for the head) moved to the segment of its first reader: its output (a
    weight-sized value) is then made inside the session that uses it, not computed ahead and
    carried through every segment in between."""
    where = {id(o): k for k, seg in enumerate(segs) for n in seg for o in n.outputs}
    moved: dict[int, list[oir.Node]] = {}
    for k in range(len(segs) - 1, -1, -1):
        keep = []
        for n in reversed(segs[k]):
            target = _first_reader(n, where) if _reads_weights_only(n) else None
            if target is not None and target > k:
                moved.setdefault(target, []).insert(0, n)
                for o in n.outputs:
                    where[id(o)] = target
            else:
                keep.insert(0, n)
        segs[k] = keep
    return [moved.get(k, []) + seg for k, seg in enumerate(segs)]


def _reads_weights_only(n: oir.Node) -> bool:
    ins = [v for v in n.inputs if v is not None]
    return bool(ins) and not _subgraph_nodes(n) and all(
        v.is_initializer() and not v.is_graph_input() for v in ins)


def _first_reader(n: oir.Node, where: dict[int, int]) -> int | None:
    """The first segment reading an output of ``n``; None when a graph output is one."""
    first = None
    for o in n.outputs:
        if o.is_graph_output():
            return None
        for use in o.uses():
            k = next((where[id(u)] for u in use.node.outputs if id(u) in where), None)
            if k is None:
                return None
            first = k if first is None else min(first, k)
    return first


class OnnxSegments:
    """Segments of an ``OnnxGraph`` cut after the producers of ``ends`` (+ a tail)."""

    def __init__(self, graph: Any, ends: list[str]) -> None:
        self.graph = graph
        self.ends = ends
        self._nodes: list[list[oir.Node]] = []
        self._sessions: dict[tuple[int, tuple[str, ...]], tuple[Any, Any, list[str]]] = {}
        self._upcast = bool(getattr(graph, "_upcast", False))
        self.precision: str | None = None  # "fp32" | "round:float16" | "round:bfloat16"
        self._split()

    # ---- structure ----------------------------------------------------------------------
    def _split(self) -> None:
        nodes = list(self.graph.model.graph)
        at = {o.name: i for i, n in enumerate(nodes) for o in n.outputs}
        cuts = [at[v] + 1 for v in self.ends]
        starts = [0, *cuts]
        stops = [*cuts, len(nodes)]
        self._nodes = _weights_to_readers([nodes[a:b] for a, b in zip(starts, stops)])
        self._info: dict[int, tuple[list[str], dict[str, oir.Value], list[oir.Value]]] = {}

    def changed(self, k: int) -> None:
        """Re-read segment ``k`` from the graph (its nodes were edited)."""
        old = self._nodes
        self._split()
        self._info = {}
        for j, nodes in enumerate(self._nodes):  # a segment whose nodes moved runs anew
            if j >= len(old) or [id(n) for n in nodes] != [id(n) for n in old[j]]:
                self.release(j)

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

    def _model(self, k: int, env: dict[str, Any], outputs: list[str],
               supplied: dict[str, np.ndarray] | None = None, widen: bool = False
               ) -> onnx.ModelProto:
        """The sub-model of segment ``k``; with ``supplied``, its large initializers are
        placeholders and their arrays are put in ``supplied`` (handed to ORT as they are);
        ``widen``: fp16/bf16 initializers come as fp32 (one tensor converted at a time)."""
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
        tensors = [_tensor_proto(v, supplied, widen) for v in inits]
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
        from rotaq import dist, runtime
        from rotaq.rewriter.onnx_run import not_implemented, packed_kernels

        self._sessions.pop(key, None)  # the old session's weights go before the new ones come
        supplied: dict[str, np.ndarray] = {}
        # an fp32 copy: each fp16/bf16 weight widened on its own and handed to ORT as an array
        # (no inline copy in a serialized proto); the rest of the graph converted after
        proto = self._model(k, env, outputs, supplied, widen=self._upcast)
        ins = [i.name for i in proto.graph.input]
        # as in onnx_run.ort_session: no pre-packed second copy of float MatMul weights;
        # tensors on disk are referenced by their descriptor under the root (_tensor_proto);
        # supplied arrays: ORT copies them once (no serialized copy beside)
        opts = {"exact": True, "prepack": packed_kernels(self.graph.model),
                "config": {_FOLDER_KEY: os.sep}, "threads": dist.threads()}
        if self._upcast:
            proto = _upcast(proto, self.precision)
        try:
            sess = runtime.ort_session(proto.SerializeToString(), arrays=supplied, **opts)
        except Exception as err:
            if self._upcast or not not_implemented(err):
                raise
            log.info("segment %d: no ORT kernel in the graph's dtype; running an fp32 copy", k)
            self._upcast = True
            supplied = {}
            proto = _upcast(self._model(k, env, outputs, supplied, widen=True))
            sess = runtime.ort_session(proto.SerializeToString(), arrays=supplied, **opts)
        self._sessions[key] = (fp, sess, ins)  # supplied arrays live with the session
        return sess, ins

    def run(self, k: int, env: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        """``outputs`` of segment ``k`` with its external inputs taken from ``env``."""
        if not outputs:
            return {}
        ext = self._analyze(k)[0]
        feeds = {v: np.asarray(env[v]) for v in ext}
        if self.precision or any(a.dtype.name == "bfloat16" for a in feeds.values()):
            self._upcast = True  # ORT takes no bfloat16 arrays as inputs
        if self._upcast:
            feeds = {v: a.astype(np.float32) if a.dtype in (np.float16,) or
                     a.dtype.name == "bfloat16" else a for v, a in feeds.items()}
        sess, ins = self._session(k, feeds, outputs)
        got = sess.run(outputs, {v: feeds[v] for v in ins})
        return dict(zip(outputs, got))


_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_SUPPLIED_BYTES = 1 << 20  # initializers this large are handed to ORT as arrays
_SUPPLIED_TYPES = {oir.DataType.FLOAT, oir.DataType.FLOAT16, oir.DataType.DOUBLE,
                   oir.DataType.INT64, oir.DataType.INT32, oir.DataType.INT8, oir.DataType.UINT8}


def _tensor_proto(v: oir.Value, supplied: dict[str, np.ndarray] | None = None,
                  widen: bool = False) -> onnx.TensorProto:
    """The initializer of ``v`` with its bytes inline (an external tensor is read here: the
    segment's session is built from memory). With ``supplied`` (a dict), a large one is not
    copied into the proto: a tensor on disk (:mod:`rotaq.rewriter.onnx_store`) is referenced
    in its file (ORT maps it: nothing is read ahead), one in memory is put in
    ``supplied[name]`` for ``add_external_initializers`` (ORT's copy is the only one made)."""
    t = v.const_value
    if widen and t.dtype in (oir.DataType.FLOAT16, oir.DataType.BFLOAT16):
        arr = np.ascontiguousarray(np.asarray(t.numpy()).astype(np.float32))  # exact
        if supplied is None or arr.nbytes < _SUPPLIED_BYTES:
            return onnx.numpy_helper.from_array(arr, v.name)
        supplied[v.name] = arr
        return _placeholder(v.name, oir.DataType.FLOAT, t.shape, "rotaq-supplied", 0,
                            arr.nbytes)
    if supplied is not None and t.dtype in _SUPPLIED_TYPES and t.nbytes >= _SUPPLIED_BYTES:
        # the descriptor rotaq holds (the same file even if its path was replaced since)
        fd = f"proc/self/fd/{t.data.fd}" if onnx_store.is_on_disk(t) else ""
        on_disk = bool(fd) and os.path.exists(os.sep + fd)
        arr = None if on_disk else np.ascontiguousarray(t.numpy())
        where = (fd, t.offset) if on_disk else ("rotaq-supplied", 0)
        proto = _placeholder(v.name, t.dtype, t.shape, *where, t.nbytes)
        if arr is not None:
            supplied[v.name] = arr
        return proto
    if isinstance(t, oir.ExternalTensor):
        proto = onnx.TensorProto(name=v.name, data_type=t.dtype.value, dims=list(t.shape.numpy()))
        proto.raw_data = t.tobytes()
        return proto
    proto = oir.serde.serialize_tensor(t)
    proto.name = v.name
    return proto


def _placeholder(name: str, dtype: oir.DataType, shape: Any, location: str, offset: int,
                 length: int) -> onnx.TensorProto:
    """An initializer whose bytes are elsewhere (a file, or an array given to ORT)."""
    proto = onnx.TensorProto(name=name, data_type=dtype.value, dims=[int(d) for d in shape])
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, val
    return proto


def _upcast(proto: onnx.ModelProto, precision: str | None = None) -> onnx.ModelProto:
    """The segment's fp32 copy; ``precision="round:T"``: every op output rounded to T."""
    from rotaq.rewriter.onnx_dtype import LOW, convert_float, round_through

    rounding = bool(precision and precision.startswith("round:"))
    if rounding:  # the segment has no value types of its own: round_through needs them
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception as err:  # noqa: BLE001  (ops unknown to onnx: fewer values rounded)
            log.warning("segment shape inference failed (%s); rounding fewer values", err)
    model = convert_float(oir.serde.deserialize_model(proto))
    if rounding:
        low = {name: dt for dt, name in LOW.items()}[precision.split(":", 1)[1]]
        model = round_through(model, low)
    return oir.serde.serialize_model(model)
