"""Causal prefill attention without the masked half (TVM backend, CPU).

:func:`mark_causal` gives a ``RotaqAttention`` node the attribute ``causal_off = m - n`` when
its additive mask ``[.., n, m]`` hides (``-inf`` or below ``HIDDEN``, e.g. transformers'
``finfo.min``) every key ``j > i + m - n`` of every query row ``i``: the subgraph computing the
mask is run (ONNX reference evaluator) on several probes of the graph inputs it reads (all ones,
right padding, random 0/1 masks; random floats), and the mask must hide those keys in every
probe, so no op sequence is trusted by its names. Other masks (bidirectional encoders, a mask
fed as an input, a finite fill like -1e9) are left unmarked and keep the general kernel.
:func:`emit_chunks` then runs such attention as chunks of ``CHUNK_ROWS`` query rows, chunk
``t`` over its first ``m - n + (t + 1) * CHUNK_ROWS`` keys only. The skipped keys' softmax
weight is exactly 0 in float32 in every row that sees at least one key; a row that sees none
(a left-padded prompt's pad rows, read by no other row) averages the values of the keys its
chunk keeps instead of all of them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rotaq.backends.tvm_graph import ATTN_OP, ProtoIndex, static_dims

log = logging.getLogger(__name__)

CHUNK_ROWS = 128  # query rows per chunk (a multiple of 64: the chunks' key counts tile by 64)
_PROBES = 4
HIDDEN = -1e30  # a mask value at or below this hides its key: exp(score + HIDDEN - max) == 0


def mark_causal(proto: Any) -> int:
    """Mark causal ``RotaqAttention`` nodes (see the module doc); returns how many."""
    from onnx import helper

    shapes = static_dims(proto)
    count, checked = 0, {}
    for node in proto.graph.node:
        if node.op_type != ATTN_OP or len(node.input) < 4 or not node.input[3]:
            continue
        mask = node.input[3]
        if mask not in checked:
            checked[mask] = _causal_offset(proto, mask, shapes.get(mask))
        off = checked[mask]
        if off is None:
            continue
        node.attribute.append(helper.make_attribute("causal_off", int(off)))
        count += 1
    return count


def _causal_offset(proto: Any, mask: str, shape: list[int] | None) -> int | None:
    if not shape or len(shape) < 2 or shape[-2] < 2:
        return None
    n, m = shape[-2:]
    off = m - n
    if off < 0:
        return None
    try:
        arrays = _run_mask(proto, mask)
    except Exception as err:  # noqa: BLE001 - a subgraph the reference cannot run: no skip
        log.debug("mask %s not evaluated: %s", mask, err)
        return None
    upper = np.triu(np.ones((n, m), bool), off + 1)
    for arr in arrays:
        if arr.shape[-2:] != (n, m) or not (arr[..., upper] <= HIDDEN).all():
            return None
    return off


def _run_mask(proto: Any, mask: str) -> list[np.ndarray]:
    """The mask's value on each probe of the graph inputs its subgraph reads."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    ix = ProtoIndex(proto)
    producer, inits = ix.producer, ix.inits
    inputs = {i.name: i for i in proto.graph.input}
    need, stack, used_inputs = set(), [mask], []
    while stack:
        v = stack.pop()
        nd = producer.get(v)
        if nd is None:
            if v in inputs and v not in used_inputs:
                used_inputs.append(v)
            elif v and v not in inits and v not in inputs:
                raise ValueError(f"{v}: no producer")
            continue
        if id(nd) in need:
            continue
        need.add(id(nd))
        stack.extend(i for i in nd.input if i)
        for attr in nd.attribute:  # subgraphs (If, Loop): not probed
            if attr.g.node or attr.graphs:
                raise ValueError(f"{nd.op_type} with a subgraph")
    nodes = [nd for nd in proto.graph.node if id(nd) in need]
    names = {i for nd in nodes for i in nd.input}
    out = helper.make_tensor_value_info(mask, 1, None)
    g = helper.make_graph(nodes, "mask", [inputs[i] for i in used_inputs], [out],
                          [t for k, t in inits.items() if k in names])
    opset = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    ev = ReferenceEvaluator(helper.make_model(g, opset_imports=opset))
    rng = np.random.default_rng(0)
    return [ev.run(None, {i: _probe(inputs[i], k, rng) for i in used_inputs})[0]
            for k in range(_PROBES)]


def _probe(vi: Any, k: int, rng: Any) -> np.ndarray:
    """Probe ``k`` of a graph input: masks all ones, right-padded, random 0/1; ids ones or
    random; positions ``0..n-1``; floats standard normal."""
    from onnx import helper

    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if not np.issubdtype(dtype, np.integer) and dtype != np.bool_:
        return rng.standard_normal(dims).astype(dtype)
    name = vi.name.lower()
    arr = np.ones(dims, dtype)
    if "mask" in name and dims and dims[-1] > 1:
        if k == 1:
            arr[..., dims[-1] // 2:] = 0
        elif k >= 2:
            arr = rng.integers(0, 2, dims).astype(dtype)
            arr[..., 0] = 1
    elif "position" in name and dims:
        arr = np.broadcast_to(np.arange(dims[-1]), dims).astype(dtype)
    elif k >= 2:
        arr = rng.integers(0, 100, dims).astype(dtype)
    return arr


def chunks(n: int, m: int, off: int | None) -> list[tuple[int, int, int]]:
    """``(row_start, row_end, keys)`` per chunk, or ``[]`` when chunking does not apply."""
    if off is None or n % CHUNK_ROWS or n < 2 * CHUNK_ROWS or off + n != m:
        return []
    return [(r, r + CHUNK_ROWS, off + r + CHUNK_ROWS) for r in range(0, n, CHUNK_ROWS)]


def emit_chunks(bb: Any, args: list, parts: list, kernel: Any, call: Any) -> Any:
    """Per chunk: its query and mask rows, the keys ``[.., d, :keys]`` and values
    ``[.., :keys, d]`` it may see, ``kernel(rows, keys)`` (a PrimFunc); the outputs
    concatenated along the rows. ``args``: ``q [g, n, d], kt [gk, d, m], v [gk, m, d],
    mask [mg, n, m]``."""
    from tvm import relax

    q, kt, v, mask = args
    g, d = (int(x) for x in (q.ty.shape[0], q.ty.shape[2]))
    outs = []
    for start, end, keys in parts:
        sl = relax.op.strided_slice
        a = [bb.normalize(sl(q, axes=[1], begin=[start], end=[end])),
             bb.normalize(sl(kt, axes=[2], begin=[0], end=[keys])),
             bb.normalize(sl(v, axes=[1], begin=[0], end=[keys])),
             bb.normalize(sl(mask, axes=[1, 2], begin=[start, 0], end=[end, keys]))]
        outs.append(call(kernel(end - start, keys), a, (g, end - start, d), "attention"))
    return bb.normalize(relax.op.concat(outs, axis=1))
