"""Running ONNX models in ONNX Runtime (CPU) for rotaq: sessions, and ops it cannot run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import onnx_ir as oir

from rotaq import runtime
from rotaq.errors import RotaqError

logger = logging.getLogger(__name__)

_FILE_SESSION_BYTES = 100 * 2**20  # weights on disk or above this: a session from a file
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                "ai.onnx.preview.training", "com.microsoft.experimental"}


def _unregistered(model: oir.Model) -> list[oir.Node]:
    """Nodes of domains ONNX Runtime does not implement (and no model-local function defines)."""
    local = {(f.domain, f.name) for f in model.functions.values()}
    return [n for n in oir.traversal.RecursiveGraphIterator(model.graph)
            if n.domain not in _ORT_DOMAINS and (n.domain, n.op_type) not in local]


def ort_session(model: oir.Model):
    """An ORT CPU session for ``model`` (:func:`rotaq.runtime.ort_session`, exact): from its
    serialized proto when small, else through a temporary file with external data written
    tensor by tensor (no proto of the whole model in memory beside ORT's own copy of the
    weights). A node ORT cannot run raises :class:`RotaqError` naming it."""
    # no pre-packed second copy of float MatMul weights: these sessions verify and calibrate
    # (short runs), and the copy would double the weights' memory. Graphs with quantized or
    # contrib kernels keep it: ORT's int8 / MatMulNBits kernels compute differently unpacked
    # (accuracy_level 4 needs the packed path), and verification must run what users run.
    try:
        return runtime.ort_session(model, exact=True, prepack=packed_kernels(model),
                                   file_above=_FILE_SESSION_BYTES)
    except Exception as err:
        text = str(err)
        unknown = _unregistered(model)
        if unknown and ("not a registered" in text or "No Op registered" in text):
            ops = sorted({f"{n.op_type} (domain '{n.domain}')" for n in unknown})
            raise RotaqError(
                f"ONNX Runtime cannot run op {', '.join(ops)} (node {unknown[0].name!r}), so "
                "rotaq cannot verify a rewrite of this model; pass --no-verify "
                "(verify=False) to rewrite it unverified (refused if the op lies between "
                "rewritten layers)"
            ) from err
        raise


_INT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DequantizeLinear",
            "QuantizeLinear", "DynamicQuantizeLinear"}


def packed_kernels(model: oir.Model) -> bool:
    """Whether ``model`` holds a quantized or contrib-domain op (kernels that pre-pack)."""
    return any(n.domain not in ("", "ai.onnx") or n.op_type in _INT_OPS for n in model.graph)


def _reach(start: Sequence[oir.Node], step: Any) -> set[int]:
    """ids of the nodes reachable from ``start`` (excluded) through ``step(node)``."""
    seen: set[int] = set()
    todo = [m for n in start for m in step(n) if m is not None]
    while todo:
        n = todo.pop()
        if id(n) not in seen:
            seen.add(id(n))
            todo.extend(m for m in step(n) if m is not None)
    return seen


def not_implemented(err: BaseException) -> bool:
    return type(err).__name__ == "NotImplemented" or "NOT_IMPLEMENTED" in str(err)


def check_unverified(graph: Any) -> None:
    """Refuse an ``OnnxGraph`` holding a node ORT cannot run (custom domain) between two matched
    sites (linear, embedding, norm): a rewrite would change what it reads, unverified. A node
    before or after every site sees the original values, so the rewrite stays exact there."""
    unknown = _unregistered(graph.model)
    if not unknown:
        return
    sites = [graph._node(n.key) for n in graph.view().nodes
             if n.op in ("linear", "embedding", "layer_norm", "rms_norm")]
    after = _reach(sites, lambda n: [u.node for o in n.outputs for u in o.uses()])
    before = _reach(sites, lambda n: [v.producer() for v in n.inputs if v is not None])
    inside = [n for n in unknown if id(n) in after and id(n) in before]
    if inside:
        n = inside[0]
        raise RotaqError(
            f"op {n.op_type} (domain '{n.domain}', node {n.name!r}) lies between layers "
            "rotaq rewrites and ONNX Runtime cannot run it: rotaq can neither verify nor "
            "safely rewrite around it")
    logger.warning("not verified: %d node(s) ORT cannot run (%s), all outside the "
                   "rewritten layers", len(unknown), unknown[0].op_type)
