"""ONNX Runtime backend: sessions with rotaq's settings, which kernels ORT really runs, and the
``rotaq compile --backend ort`` artefact.

The rewritten graphs are standard ONNX plus the com.microsoft ops that ship with ORT, so this
module adds to the session factory (:mod:`rotaq.runtime`, re-exported here) a kernel report (the
op types of ORT's optimized graph) and :func:`compile_ort`: ORT's optimized graph saved with the
session settings to run it with, in the artefact layout of :mod:`rotaq.backends.artifact`.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any

import onnx

from rotaq.backends import artifact
from rotaq.runtime import EXACT, ort_session, session_options

__all__ = ["EXACT", "ORT_SETTINGS", "compile_ort", "ort_kernel_report", "ort_session",
           "session_options"]
_DEFAULT_DOMAINS = ("", "ai.onnx")
# the settings recorded in an ORT artefact (what `rotaq bench` / users run it with)
ORT_SETTINGS = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 2,
                "execution_mode": "ORT_SEQUENTIAL", "config": dict(EXACT)}


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
    with tempfile.TemporaryDirectory(prefix="rotaq-opt-", ignore_cleanup_errors=True) as d:
        out = os.path.join(d, "optimized.onnx")
        cfg = {
            "session.optimized_model_external_initializers_file_name": "optimized.onnx.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
            **(config or {}),
        }
        ort_session(path_or_bytes, level, cfg, optimized_path=out)
        proto = onnx.load(out, load_external_data=False)
    counts: collections.Counter = collections.Counter()
    _count(proto.graph, counts)
    return dict(sorted(counts.items()))


def compile_ort(model: Any, out_dir: str) -> dict[str, Any]:
    """Write ORT's optimized form of ``model`` (a Model) and its session settings to
    ``out_dir`` as an artefact folder (atomically); returns the metadata."""
    import onnxruntime as ort

    from rotaq.model import portable_source

    with artifact.work_dir(out_dir, ".rotaq-ort-") as work:
        src = os.path.join(work, "source.onnx")
        model.save(src, tokenizer=False)
        ort_session(src, "all", {
            **ORT_SETTINGS["config"],
            "session.optimized_model_external_initializers_file_name": "model.onnx.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024"},
            optimized_path=os.path.join(work, "model.onnx"))
        for f in os.listdir(work):
            if f.startswith("source.onnx"):
                os.unlink(os.path.join(work, f))
        meta = {**artifact.header("ort", "cpu", "cpu"), "ort_version": ort.__version__,
                "model_file": "model.onnx", "session": ORT_SETTINGS,
                "source": portable_source(model.source, work)}
        artifact.write_metadata(work, meta)
        artifact.replace_dir(work, out_dir)
        return meta
