"""The rounding noise ``e0`` of a low-precision ONNX graph (fp16 / bf16): the max relative output
error of the model in its low dtype (run natively, or emulated with
:func:`~rotaq.rewriter.onnx_dtype.round_through`) against its fp32 copy
(:func:`~rotaq.rewriter.onnx_dtype.convert_float`); a large graph one block at a time."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq.compare import max_rel_error
from rotaq.rewriter.blocks import BlockRunner, blockwise_bytes, run_blockwise, weight_bytes
from rotaq.rewriter.onnx_dtype import LOW, convert_float, low_precision, round_through
from rotaq.rewriter.onnx_run import ort_session

logger = logging.getLogger(__name__)


def rounding_noise(graph: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """``{"dtype", "e0", "method"}``: the max relative error of ``graph`` in its low dtype vs
    its fp32 copy on ``feeds``; None for an fp32 graph (or when either run is not finite). ``method`` is ``native`` when ORT runs
    the graph in that dtype, else ``emulated`` (fp32 copy rounding every op output to it)."""
    low, computes_low = low_precision(graph)
    if low is None:
        return None
    if weight_bytes(graph) > blockwise_bytes():  # one block's fp32 copy at a time
        ref, lp, method = _noise_blockwise(graph, feeds, low, computes_low)
    else:
        high = convert_float(graph.model)
        ref = run_model(high, feeds, ort_session)
        if computes_low and not graph.runs_upcast(feeds):
            lp, method = graph.run(feeds), "native"
        else:
            lp, method = run_model(round_through(high, low), feeds, ort_session), "emulated"
    if not all(np.isfinite(np.asarray(a, np.float64)).all() for a in [*ref, *lp]):
        logger.warning("%s rounding noise not measurable (non-finite outputs)", LOW[low])
        return None
    e0 = max_rel_error(ref, lp)
    logger.info("%s rounding noise e0=%.3g (%s)", LOW[low], e0, method)
    return {"dtype": LOW[low], "e0": e0, "method": method}


def _noise_blockwise(graph: Any, feeds: dict[str, np.ndarray], low: oir.DataType,
                     computes_low: bool) -> tuple[list, list, str]:
    """(fp32 reference, low-precision run, method) of a large graph, block by block: each
    segment converted to fp32 (and, emulated, rounded to ``low``) only while it runs."""
    ref = run_blockwise(graph, feeds, precision="fp32")
    if computes_low:
        with BlockRunner(graph, feeds) as r:
            r.run()
            if not r.exec._upcast:  # ORT ran every segment in the graph's own dtype
                return ref, r.result(), "native"
    return ref, run_blockwise(graph, feeds, precision=f"round:{LOW[low]}"), "emulated"


def run_model(model: oir.Model, feeds: dict[str, np.ndarray], make_session: Any) -> list:
    """Run ``model`` (an fp32 copy) on ``feeds``, float feeds cast to the input dtypes."""
    sess = make_session(model)
    return sess.run(None, cast_feeds(model, feeds))


def cast_feeds(model: oir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    types = {v.name: v.dtype for v in model.graph.inputs}
    for k, v in feeds.items():
        a = np.asarray(v)
        dt = types.get(k)
        floating = np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"
        if dt is not None and dt.is_floating_point() and floating:
            a = a.astype(dt.numpy())
        out[k] = a
    return out
