"""ONNX Runtime contrib ops (``com.microsoft``) lifted into rotaq's :class:`GraphView`.

Graphs written by onnxruntime-genai's model builder (and ORT-optimized Optimum exports) fuse
what rotaq otherwise matches op by op:

- ``SkipSimplifiedLayerNormalization(x, skip, g)`` / ``SkipLayerNormalization(x, skip, g, b)``:
  the residual add fused into the next norm. Outputs: the normed sum (0), mean and inverse std
  (1, 2, unused) and the sum ``s = x + skip`` (3) that carries the residual stream on. Lifted
  as two view nodes, ``add(x, skip) -> s`` (key ``<node>::add``) then ``rms_norm(s, g)`` /
  ``layer_norm(s, g, b)`` (key ``<node>``), so the residual-stream walk sees a plain pre-norm
  block. A node without output 3 (the final norm) gets one, named, on load (ORT computes it).
  The norm's view input 1 (2 for the bias) is node input 2 (3): :func:`node_input_index`.

  Rotation is exact through it (the proof the rotate pass relies on): with Q orthogonal and the
  stream rotated, x -> xQ and skip -> skipQ, so s -> sQ (the add is linear) and
  rms(sQ) = ||sQ|| / sqrt(d) = ||s|| / sqrt(d) = rms(s). With g folded into the readers
  (W <- W diag(g), g <- 1) the node outputs (sQ) / rms(s) = (s / rms(s)) Q, i.e. the unscaled
  norm of s rotated by Q, which readers with W <- W Q map back to what they read before; output
  3 is sQ, the rotated stream, as the next block expects. A bias input (``x + skip + b``) would
  need b <- bQ too: such a node is left opaque (``other``).
- ``GroupQueryAttention``: ``gqa`` with the op's inputs as they are (query or packed q|k|v,
  key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
  ...) and params ``num_heads``, ``num_kv_heads``, ``head_dim``, ``packed``, ``do_rotary``.
- ``MatMulNBits``: a ``linear`` with params ``quantized="MatMulNBits"``, ``bits``,
  ``block_size``: counted as a linear, but its weights are already quantized: reading or writing
  them raises :class:`RewriteError` naming the node (:func:`refuse_quantized`), so no pass folds a
  rotation into it or re-quantizes it.
- ``GatherBlockQuantized`` (the int4 builder's embedding): an ``embedding`` that is refused
  in the same way.
- ``RotaryEmbedding``: ``other`` with ``target="RotaryEmbedding"`` (it mixes pairs of channels
  inside each head; nothing folds through it).

On load, ``Gather(Transpose(W), ids)`` (the builder's tied embedding reading the head's
``[d, vocab]`` weight) gets its own ``[vocab, d]`` constant so it matches as an embedding.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as oir

from rotaq import tags
from rotaq.errors import RewriteError
from rotaq.rewriter.sites import GNode

if TYPE_CHECKING:
    from rotaq.rewriter.onnx import OnnxGraph

logger = logging.getLogger(__name__)

MS = "com.microsoft"
_SKIP_NORMS = {"SkipSimplifiedLayerNormalization": "rms_norm",
               "SkipLayerNormalization": "layer_norm"}
ADD_SUFFIX = "::add"


def _attr(node: oir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _is_ms(node: oir.Node) -> bool:
    return node.domain == MS


# ---- load-time normalization -------------------------------------------------------------------
def prepare(g: OnnxGraph) -> None:
    """Name output 3 of skip norms that lack it; give ``Gather(Transpose(W))`` its own table."""
    graph = g.model.graph
    for n in list(graph):
        if _is_ms(n) and n.op_type in _SKIP_NORMS:
            if len(n.outputs) < 4:
                n.resize_outputs(4)
            for i, o in enumerate(n.outputs):
                if not o.name:
                    o.name = g._fresh(f"{n.name}/output_{i}")
        elif n.op_type == "Gather" and n.domain in ("", "ai.onnx") and _attr(n, "axis", 0) in (0,):
            _untranspose_table(g, n)


def _untranspose_table(g: OnnxGraph, n: oir.Node) -> None:
    src = n.inputs[0]
    t = src.producer() if src is not None else None
    if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx"):
        return
    perm = _attr(t, "perm")
    w = t.inputs[0]
    const = w.const_value if w is not None else None
    if const is None or len(const.shape) != 2 or (perm is not None and list(perm) != [1, 0]):
        return
    if not const.dtype.is_floating_point():
        return
    arr = np.ascontiguousarray(const.numpy().T)
    name = g._fresh(f"{n.name}.table")
    v = oir.val(name, const_value=oir.Tensor(arr, dtype=const.dtype, name=name))
    g.model.graph.register_initializer(v)
    n.replace_input_with(0, v)
    if not list(src.uses()) and not src.is_graph_output():
        g.model.graph.remove(t, safe=True)
    logger.info("embedding %s read a transposed head weight: given its own table", n.name)


# ---- lifting ------------------------------------------------------------------------------------
def lift(g: OnnxGraph, n: oir.Node, scope: str) -> list[GNode] | None:
    """View nodes for a contrib op rotaq understands, else None (the caller lifts it)."""
    if not _is_ms(n) or n.metadata_props.get(tags.ROLE):  # rotaq's own nodes: not here
        return None
    ins = [v.name if v is not None else "" for v in n.inputs]
    outs = [o.name or "" for o in n.outputs]
    t = n.op_type
    if t in _SKIP_NORMS:
        return _skip_norm(g, n, ins, outs, scope)
    if t == "GroupQueryAttention":
        return [GNode(n.name, "gqa", ins, outs, _gqa_params(g, n), scope)]
    if t == "MatMulNBits":
        return _nbits(g, n, ins, outs, scope)
    if t == "GatherBlockQuantized":
        return _gather_quantized(g, n, ins, outs, scope)
    if t == "RotaryEmbedding":
        return [GNode(n.name, "other", ins, outs, {"target": t, "domain": n.domain}, scope)]
    return None


def _skip_norm(g: OnnxGraph, n: oir.Node, ins: list[str], outs: list[str], scope: str
               ) -> list[GNode] | None:
    op = _SKIP_NORMS[n.op_type]
    gamma = n.inputs[2] if len(n.inputs) > 2 else None
    beta = n.inputs[3] if op == "layer_norm" and len(n.inputs) > 3 else None
    bias_at = 3 if op == "rms_norm" else 4
    has_bias = len(n.inputs) > bias_at and n.inputs[bias_at] is not None
    if has_bias or not g._is_const(gamma) or (beta is not None and not g._is_const(beta)):
        return None
    if len(outs) < 4 or not outs[3]:
        return None
    dim = int(g._const(gamma).shape[-1])
    eps = float(_attr(n, "epsilon", 1e-5))
    add = GNode(n.name + ADD_SUFFIX, "add", ins[:2], [outs[3]], {}, scope)
    norm = GNode(n.name, op, [outs[3], ins[2], ins[3] if beta is not None else ""], outs[:1],
                 {"dim": dim, "eps": eps, "skip": True}, scope)
    return [add, norm]


def _width(v: oir.Value | None) -> int | None:
    if v is None or v.shape is None or not len(v.shape):
        return None
    last = v.shape[-1]
    return last if isinstance(last, int) else None


def _gqa_params(g: OnnxGraph, n: oir.Node) -> dict[str, Any]:
    heads, kv = int(_attr(n, "num_heads", 0)), int(_attr(n, "kv_num_heads", 0))
    packed = not (len(n.inputs) > 2 and n.inputs[1] is not None and n.inputs[2] is not None)
    width = _width(n.inputs[0])
    p = n.inputs[0].producer() if n.inputs[0] is not None else None
    if width is None and p is not None and p.op_type == "MatMulNBits":
        width = int(_attr(p, "N", 0)) or None
    elif width is None and p is not None and len(p.inputs) > 1:  # MatMul: weight [in, out]
        w = g._const(p.inputs[1])
        width = int(w.shape[-1]) if w is not None and len(w.shape) == 2 else None
    parts = heads + 2 * kv if packed else heads
    head_dim = width // parts if width and parts else 0
    params = {"num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim, "packed": packed,
              "do_rotary": int(_attr(n, "do_rotary", 0)), "target": n.op_type}
    if _attr(n, "scale") is not None:
        params["scale"] = float(_attr(n, "scale"))
    return params


def _nbits(g: OnnxGraph, n: oir.Node, ins: list[str], outs: list[str], scope: str
           ) -> list[GNode] | None:
    k, nn = _attr(n, "K"), _attr(n, "N")
    if k is None or nn is None or not g._is_const(n.inputs[1]):
        return None
    bias = len(n.inputs) > 5 and n.inputs[5] is not None
    params = {"in_features": int(k), "out_features": int(nn), "has_bias": bias,
              "weight_shared": False, "quantized": "MatMulNBits",
              "bits": int(_attr(n, "bits", 4)), "block_size": int(_attr(n, "block_size", 0))}
    return [GNode(n.name, "linear", ins[:1], outs[:1], params, scope)]


def _gather_quantized(g: OnnxGraph, n: oir.Node, ins: list[str], outs: list[str], scope: str
                      ) -> list[GNode] | None:
    """A block-quantized embedding table (the builder's int4 tied embedding): an embedding
    whose rows are read but never written (see :func:`refuse_quantized`)."""
    scales = g._const(n.inputs[2]) if len(n.inputs) > 2 else None
    if (scales is None or len(scales.shape) != 2 or _attr(n, "gather_axis", 0) != 0
            or _attr(n, "quantize_axis", 1) != 1):
        return None
    block = int(_attr(n, "block_size", 128))
    params = {"num_embeddings": int(scales.shape[0]), "dim": int(scales.shape[1]) * block,
              "weight_shared": True, "quantized": n.op_type, "bits": int(_attr(n, "bits", 4))}
    return [GNode(n.name, "embedding", [ins[1]], outs[:1], params, scope)]


# ---- edits --------------------------------------------------------------------------------------
def node_input_index(n: oir.Node, index: int) -> int:
    """The node input behind view input ``index`` (skip norms: view [s, g, b] = node [_, 2, 3])."""
    if _is_ms(n) and n.op_type in _SKIP_NORMS and index in (1, 2):
        return index + 1
    return index


def refuse_quantized(g: OnnxGraph, key: str) -> None:
    """Raise a clear :class:`RewriteError` when ``key`` names a ``MatMulNBits`` linear."""
    n = g._nodes.get(key) or next((m for m in g.model.graph if m.name == key), None)
    if n is None or not _is_ms(n) or n.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
        return
    what = "linear" if n.op_type == "MatMulNBits" else "embedding"
    raise RewriteError(
        f"{what} {key!r} is a {n.op_type} node ({_attr(n, 'bits', 4)}-bit weights in blocks of "
        f"{_attr(n, 'block_size', 0)}, quantized by another tool): rotaq does not fold rotations "
        "into or re-quantize pre-quantized weights; rewrite the model's fp32 graph instead")
