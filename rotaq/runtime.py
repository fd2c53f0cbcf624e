"""The one place rotaq builds an ONNX Runtime session (CPU).

Every session in rotaq (verification and calibration runs of the rewriter, benchmarks, kernel
reports, ``rotaq compile --backend ort``) comes from :func:`ort_session`, so the settings live
here: the optimization level, threads, ``EXACT`` (ORT computes what the graph says), no
pre-packed second copy of the weights when asked, and whether the model goes to ORT as serialized
bytes or as a file with external data (large models: no proto of the whole model in memory).
Neutral ground: the rewriter and the backends both import it; it imports neither.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
# ORT fuses a weight-only DequantizeLinear -> MatMul into MatMulNBits with accuracy_level 4
# (int8 activations) by default; rotaq's own runs compute what the graph says.
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
NO_PREPACKING = {"session.disable_prepacking": "1"}
IN_MEMORY_BYTES = 1_800_000_000  # protobuf cannot serialize 2 GB
PROVIDERS = ["CPUExecutionProvider"]


def session_options(level: str = "all", config: dict[str, str] | None = None,
                    threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` at ``level`` (disable/basic/extended/layout/all) with
    session config entries (e.g. :data:`EXACT`); ``threads`` sets intra-op threads (one inter-op
    thread, sequential execution)."""
    import onnxruntime as ort

    if level not in LEVELS:
        raise ValueError(f"level must be one of {tuple(LEVELS)}, got {level!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for k, val in (config or {}).items():
        opts.add_session_config_entry(k, str(val))
    return opts


def model_source(model: Any, file_above: int = IN_MEMORY_BYTES) -> tuple[str | bytes, Any]:
    """(a path or serialized bytes, a TemporaryDirectory to clean up after the session is built,
    or None) for ``model``: a path, bytes, ``onnx.ModelProto``, ``onnx_ir.Model`` or anything
    with an ``onnx_ir.Model`` as ``.model`` (OnnxGraph). An onnx_ir model with ``file_above``
    bytes of weights or more is written to a temporary file with external data, tensor by
    tensor."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), None
    import onnx
    import onnx_ir as oir

    if hasattr(model, "model") and isinstance(model.model, oir.Model):  # OnnxGraph
        model = model.model
    if isinstance(model, oir.Model):
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                   if v.const_value is not None)
        if size < min(file_above, IN_MEMORY_BYTES):
            return oir.serde.serialize_model(model).SerializeToString(), None
        tmp = tempfile.TemporaryDirectory(prefix="rotaq-ort-", ignore_cleanup_errors=True)
        p = os.path.join(tmp.name, "model.onnx")
        oir.save(model, p, external_data="model.onnx.data")
        return p, tmp
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), None
    raise TypeError(f"cannot run a {type(model).__name__} with ONNX Runtime")


def ort_session(model: Any, level: str = "all", config: dict[str, str] | None = None,
                threads: int | None = None, *, exact: bool = False, prepack: bool = True,
                optimized_path: str | None = None, arrays: dict[str, Any] | None = None,
                file_above: int = IN_MEMORY_BYTES) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` of ``model`` (see :func:`model_source`).

    ``exact``: add :data:`EXACT`; ``prepack=False``: no pre-packed second copy of the weights
    (:data:`NO_PREPACKING`); ``optimized_path``: ORT writes its optimized graph there;
    ``arrays``: initializers handed to ORT as numpy arrays (ORT copies them once; the session
    keeps them alive as ``session.rotaq_arrays``); ``file_above``: weight bytes from which an
    onnx_ir model goes to ORT as a file."""
    import onnxruntime as ort

    cfg = {**(EXACT if exact else {}), **(NO_PREPACKING if not prepack else {}), **(config or {})}
    opts = session_options(level, cfg, threads)
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    keep = []
    if arrays:
        keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        opts.add_external_initializers(list(arrays), keep)
    src, tmp = model_source(model, file_above)
    try:
        sess = ort.InferenceSession(src, opts, providers=PROVIDERS)
    finally:
        if tmp is not None:
            tmp.cleanup()
    sess.rotaq_arrays = (arrays, keep)  # the arrays live as long as the session
    return sess
