"""ONNX Runtime backend: sessions with rotaq's settings, and which kernels ORT really runs.

The rewritten graphs are standard ONNX plus the com.microsoft ops that ship with ORT, so this
module only builds sessions: a CPU session for running and verifying a graph in memory, a timed
session for benchmarks (threads set), and a kernel report (op types of ORT's optimized graph).
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any

import onnx
import onnx_ir as oir

_DEFAULT_DOMAINS = ("", "ai.onnx")
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
# ORT fuses a weight-only DequantizeLinear -> MatMul into MatMulNBits with accuracy_level 4
# (int8 activations) by default; rotaq's own runs compute what the graph says.
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session_options(level: str = "all", config: dict[str, str] | None = None,
                    threads: int | None = None):
    """``onnxruntime.SessionOptions`` at ``level`` (disable/basic/extended/layout/all) with
    session config entries (e.g. ``{"session.qdq_matmulnbits_accuracy_level": "0"}``: ORT fuses a
    weight-only ``DequantizeLinear -> MatMul`` into MatMulNBits with accuracy_level 4 by default,
    i.e. int8 activations)."""
    import onnxruntime as ort

    if level not in _LEVELS:
        raise ValueError(f"level must be one of {tuple(_LEVELS)}, got {level!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for k, val in (config or {}).items():
        opts.add_session_config_entry(k, str(val))
    return opts


def _model_source(model: Any) -> tuple[str | bytes, Any]:
    """(path or serialized bytes, a TemporaryDirectory to keep alive or None)."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), None
    if hasattr(model, "model") and isinstance(model.model, oir.Model):  # OnnxGraph
        model = model.model
    if isinstance(model, oir.Model):
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                   if v.const_value is not None)
        if size < 1_800_000_000:
            return oir.serde.serialize_model(model).SerializeToString(), None
        tmp = tempfile.TemporaryDirectory(prefix="rotaq-ort-", ignore_cleanup_errors=True)
        p = os.path.join(tmp.name, "model.onnx")
        oir.save(model, p, external_data="model.onnx.data")
        return p, tmp
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), None
    raise TypeError(f"cannot run a {type(model).__name__} with ONNX Runtime")


def ort_session(model: Any, level: str = "all", config: dict[str, str] | None = None,
                threads: int | None = None):
    """A CPU InferenceSession of ``model`` (path, bytes, ModelProto, onnx_ir.Model, OnnxGraph)."""
    import onnxruntime as ort

    src, tmp = _model_source(model)
    try:
        return ort.InferenceSession(src, session_options(level, config, threads),
                                    providers=["CPUExecutionProvider"])
    finally:
        if tmp is not None:
            tmp.cleanup()


def _count(graph: onnx.GraphProto, counts: collections.Counter) -> None:
    for n in graph.node:
        dom = n.domain if n.domain not in _DEFAULT_DOMAINS else ""
        counts[f"{dom}.{n.op_type}" if dom else n.op_type] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _count(a.g, counts)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _count(sub, counts)


def ort_kernel_report(path_or_bytes: Any, level: str = "all",
                      config: dict[str, str] | None = None) -> dict[str, int]:
    """Op-type counts of the graph ORT (CPU) runs after its optimizations at ``level``: non-default
    domains are prefixed (``com.microsoft.MatMulNBits``). Large initializers of the optimized
    model go to a side file (never loaded back)."""
    import onnxruntime as ort

    src, tmp = _model_source(path_or_bytes)
    try:
        with tempfile.TemporaryDirectory(prefix="rotaq-opt-", ignore_cleanup_errors=True) as d:
            out = os.path.join(d, "optimized.onnx")
            cfg = {
                "session.optimized_model_external_initializers_file_name": "optimized.onnx.data",
                "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
                **(config or {}),
            }
            opts = session_options(level, cfg)
            opts.optimized_model_filepath = out
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
            proto = onnx.load(out, load_external_data=False)
    finally:
        if tmp is not None:
            tmp.cleanup()
    counts: collections.Counter = collections.Counter()
    _count(proto.graph, counts)
    return dict(sorted(counts.items()))
