"""Grouped-query attention without the repeated keys and values (TVM backend, CPU).

Exported GQA feeds attention ``K^T`` and ``V`` after ``repeat_kv``: ``Unsqueeze -> Expand ->
Reshape`` (each KV head copied ``rep`` times), then ``Transpose`` (and a scalar ``Mul``, half of
the ``1/sqrt(d)`` scale) for the keys. On a decode step over ``m`` cached positions those
layout chains copy the whole cache per layer, twice, in TVM's default (untiled, one-thread)
lowering: SmolLM2 at 1152 keys spent 49 of 79 ms per step there. :func:`fold_gqa` makes each
``RotaqAttention`` read the keys and values before the chain (``k0, v0 [B, KVH, m, d]``, the
query before its scalar ``Mul``), with the scalars folded into ``scale`` and ``gqa_rep = rep``;
the kernel maps query head ``h`` to KV head ``h // rep``. A chain is folded only when running
its own ops on random data gives exactly ``c * swap_last(repeat(k0, rep, axis=1))`` (keys) and
``repeat(v0, rep, axis=1)`` (values), so no op sequence is trusted by its names.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rotaq.backends.tvm_graph import ATTN_OP, ProtoIndex, static_dims

log = logging.getLogger(__name__)

_LAYOUT = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Mul"}


def _walk(value: str, producer: dict, consts: set) -> tuple[list, str]:
    """Layout ops (and scalar ``Mul``) producing ``value``, latest first, and their source."""
    chain = []
    node = producer.get(value)
    while node is not None and node.op_type in _LAYOUT and node.input[0] not in consts:
        if any(i not in consts for i in node.input[1:] if i):
            break
        chain.append(node)
        node = producer.get(node.input[0])
    return chain, (chain[-1].input[0] if chain else value)


def _run_chain(proto: Any, chain: list, src: str, out: str, arr: np.ndarray) -> np.ndarray:
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    names = {i for nd in chain for i in nd.input[1:] if i}
    inits = [t for t in proto.graph.initializer if t.name in names]
    g = helper.make_graph(list(reversed(chain)), "chain",
                          [helper.make_tensor_value_info(src, TensorProto.FLOAT, arr.shape)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    opset = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(g, opset_imports=opset)
    return ReferenceEvaluator(model).run(None, {src: arr})[0]


def _scalar_of(proto: Any, chain: list) -> float:
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    c = 1.0
    for nd in chain:
        if nd.op_type == "Mul":
            c *= float(numpy_helper.to_array(inits[nd.input[1]]).reshape(-1)[0])
    return c


def fold_gqa(proto: Any) -> int:
    """Rewire ``RotaqAttention`` nodes past their GQA layout chains (see the module doc);
    nodes left unread are dropped. Returns the number of nodes rewired."""
    from onnx import helper

    shapes = static_dims(proto)
    ix = ProtoIndex(proto)
    consts, producer = set(ix.inits), ix.producer
    rng, count = np.random.default_rng(0), 0
    for node in proto.graph.node:
        if node.op_type != ATTN_OP:
            continue
        q, kt, v = node.input[:3]
        kfull, _ = _walk(kt, producer, consts)
        vfull, _ = _walk(v, producer, consts)
        qchain, q0 = _walk(q, producer, consts)
        qchain = qchain if [n.op_type for n in qchain] == ["Mul"] else []
        q0 = q0 if qchain else q
        # the shortest chains first: the walk may run on past repeat_kv into the projection's
        # own head split, which is not part of it
        kfound = next((r for r in (_check_k(proto, kfull[:i], kt, shapes, rng)
                                   for i in range(1, len(kfull) + 1)) if r), None)
        if kfound is None:
            continue
        k0, ck, rep = kfound
        v0 = next((vfull[i - 1].input[0] for i in range(1, len(vfull) + 1)
                   if _check_v(proto, vfull[:i], v, shapes.get(k0), shapes, rep, rng)), None)
        if v0 is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = attrs["scale"] * ck * (_scalar_of(proto, qchain) if qchain else 1.0)
        node.input[0], node.input[1], node.input[2] = q0, k0, v0
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("scale", float(scale)),
                               helper.make_attribute("has_mask", int(attrs["has_mask"])),
                               helper.make_attribute("gqa_rep", int(rep))])
        count += 1
    if count:
        _drop_unread(proto)
    return count


def _check_k(proto: Any, chain: list, kt: str, shapes: dict, rng: Any
             ) -> tuple[str, float, int] | None:
    """(k0, c, rep) when ``chain`` computes ``c * swap_last(repeat(k0, rep, axis=1))`` from a
    4-D ``k0`` on random data, else None."""
    k0 = chain[-1].input[0]
    ks = shapes.get(k0)
    if not ks or len(ks) != 4:
        return None
    probe = rng.standard_normal(ks).astype(np.float32)
    try:
        got = _run_chain(proto, chain, k0, kt, probe)
    except Exception as err:  # noqa: BLE001 - an op the reference cannot run: no fold
        log.debug("GQA chain from %s not evaluated: %s", k0, err)
        return None
    rep = got.shape[1] // ks[1] if got.ndim == 4 else 0
    c = _scalar_of(proto, chain)
    want = np.swapaxes(np.repeat(probe, max(rep, 1), axis=1), -1, -2)
    ok = rep >= 1 and got.shape == want.shape and np.allclose(got, c * want, rtol=1e-6)
    return (k0, c, rep) if ok else None


def _check_v(proto: Any, chain: list, v: str, kshape: list, shapes: dict, rep: int,
             rng: Any) -> bool:
    """Whether ``chain`` computes ``repeat(v0, rep, axis=1)`` (``v0`` shaped like the keys)."""
    v0 = chain[-1].input[0]
    if shapes.get(v0) != kshape or any(nd.op_type == "Mul" for nd in chain):
        return False
    probe = rng.standard_normal(kshape).astype(np.float32)
    try:
        got = _run_chain(proto, chain, v0, v, probe)
    except Exception:  # noqa: BLE001 - an op the reference cannot run: no fold
        return False
    want = np.repeat(probe, rep, axis=1)
    return got.shape == want.shape and bool(np.array_equal(got, want))


def _drop_unread(proto: Any) -> None:
    """Remove nodes none of whose outputs is read (repeatedly)."""
    while True:
        read = {i for nd in proto.graph.node for i in nd.input} | {
            o.name for o in proto.graph.output}
        keep = [nd for nd in proto.graph.node if any(o in read for o in nd.output)]
        if len(keep) == len(proto.graph.node):
            return
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
