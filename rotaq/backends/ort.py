"""ONNX Runtime backend: sessions with rotaq's settings, and which kernels ORT really runs.

The rewritten graphs are standard ONNX plus the com.microsoft ops that ship with ORT, so this
module adds to the session factory (:mod:`rotaq.runtime`, re-exported here) a kernel report: the
op types of ORT's optimized graph.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Any

import onnx

from rotaq.runtime import EXACT, ort_session, session_options

__all__ = ["EXACT", "ort_kernel_report", "ort_session", "session_options"]
_DEFAULT_DOMAINS = ("", "ai.onnx")


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
