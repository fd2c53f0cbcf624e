"""Attention: fused SDPA / Attention / GroupQueryAttention ops and explicit
matmul-softmax-matmul, with the q/k/v/o projections and head counts read off the graph."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rotaq.rewriter.analysis_graph import (
    Reason,
    _root,
    _scalar_const,
    _upstream_linears,
    closure,
    const_like,
    consumers_of,
    describe,
    passthrough,
)
from rotaq.rewriter.sites import AttentionSite, GNode, GraphView

if TYPE_CHECKING:
    from rotaq.rewriter.analysis import Analysis


def _find_attention(view: GraphView, a: Analysis) -> list[AttentionSite]:
    sites = []
    for n in view.nodes:
        if n.op == "sdpa":
            q, k, v = n.inputs[0], n.inputs[1], n.inputs[2]
            sites.append(_attention_site(view, a, n, "sdpa", q, k, v, n.outputs[0],
                                         q_consumer=n.key, k_consumer=n.key, v_consumer=n.key))
        elif n.op == "softmax":
            site = _explicit_attention(view, a, n)
            if isinstance(site, str):
                a.reasons.append(Reason(n.key, "attention", f"softmax {n.key}: {site}"))
            else:
                sites.append(site)
        elif n.op == "gqa":
            sites.append(_gqa_site(view, a, n))
    return sites


def _gqa_site(view: GraphView, a: Analysis, n: GNode) -> AttentionSite:
    """ORT's GroupQueryAttention: heads, KV heads and head size from the op (head size from
    the packed q|k|v width, see ``onnx_contrib``); q/k/v projections above its inputs (one
    fused projection when q, k and v come packed). No per-head Q/K point is exposed: RoPE, when
    the op applies it (``do_rotary``), happens inside."""
    p = n.params
    q = n.inputs[0]
    k, v = (q, q) if p.get("packed") else (n.inputs[1], n.inputs[2])
    ups = [_upstream_linears(view, x) for x in (q, k, v)]
    projs = [ls[0] if len(ls) == 1 else None for ls in ups]
    heads, kv, hd = int(p["num_heads"]), int(p["num_kv_heads"]), int(p.get("head_dim") or 0)
    if not hd and projs[0]:
        hd = a.linears[projs[0]].out_features // ((heads + 2 * kv) if p.get("packed") else heads)
    scope = view.by_key[projs[0]].scope.rsplit(".", 1)[0] if projs[0] else n.scope
    return AttentionSite(n.key, scope, "gqa", heads, kv, hd, *projs,
                         _downstream_linear(view, n.outputs[0]), "", "", q_consumer=n.key,
                         k_consumer=n.key, v_value=v, v_consumer=n.key)


def _explicit_attention(view: GraphView, a: Analysis, sm: GNode) -> AttentionSite | str:
    """softmax(Q K^T [* scale] [+ mask]) V, or why ``sm`` is not the softmax of one."""
    # softmax -> (dropout/cast)* -> matmul(P, V)
    probs = closure(view, sm.outputs[0])
    for c in consumers_of(view, probs):  # Where(IsNaN(p), 0, p): the exporter's NaN guard
        if c.op == "other" and c.params.get("target") == "Where" and probs[0] in c.inputs:
            probs = closure(view, c.outputs[0])
    pv = [c for c in consumers_of(view, probs) if c.op == "matmul"]
    if len(pv) != 1:
        return f"its output is read by {len(pv)} matmuls, expected one (P V)"
    if view.is_const(pv[0].inputs[1]):
        return f"matmul {pv[0].key} multiplies it by a constant, not by V"
    # scores <- (add mask | mul/div scale | cast)* <- matmul(Q, K^T)
    cur = sm.inputs[0]
    for _ in range(8):
        p = view.producer.get(cur)
        if p is None:
            return f"no Q K^T matmul above it (the scores come from {describe(view, cur)})"
        if p.op == "matmul":
            break
        if not _score_op(p):
            return (f"no Q K^T matmul above it: {describe(view, cur)} is not a mask add, "
                    "scale or cast")
        cur = next((i for i in p.inputs if i and not view.is_const(i)
                    and view.producer.get(i) is not None
                    and (view.producer[i].op == "matmul" or _score_op(view.producer[i]))), "")
    else:
        return "no Q K^T matmul within 8 ops above it"
    qk = view.producer[cur]
    if any(view.is_const(i) for i in qk.inputs[:2]):
        return f"the score matmul {qk.key} reads a constant, not Q and K"
    q, kt = qk.inputs[0], qk.inputs[1]
    k, k_consumer = _untranspose_k(view, qk, kt, (view.shape(q) or (0,))[-1])
    return _attention_site(view, a, sm, "explicit", q, k, pv[0].inputs[1], pv[0].outputs[0],
                           q_consumer=qk.key, k_consumer=k_consumer, v_consumer=pv[0].key,
                           k_has_head_last=bool(k_consumer))


def _before_cache_concat(view: GraphView, site: AttentionSite) -> AttentionSite:
    """In a KV-cache graph K and V reach the attention as Concat(past, new) (then GQA's
    repeat_kv: unsqueeze / expand / reshape): point ``k_value`` / ``v_value`` at the new keys and
    values entering that Concat, with the Concat as their consumer, so that an online transform
    or a fake quantization there is also what the cache stores (``present.*``)."""
    changes = {}
    for val, cons in (("k_value", "k_consumer"), ("v_value", "v_consumer")):
        found = _cache_concat(view, getattr(site, val))
        if found is not None:
            changes[val], changes[cons] = found
    return dataclasses.replace(site, **changes) if changes else site


def _cache_concat(view: GraphView, value: str) -> tuple[str, str] | None:
    """(new value, concat key) when ``value`` is, through token-only ops, a Concat of a graph
    input (the past) and a computed tensor; None otherwise."""
    graph_inputs = set(view.inputs)
    for _ in range(8):
        if not value:
            return None
        p = view.producer.get(value)
        if p is None:
            return None
        if p.op == "concat":
            data = [i for i in p.inputs if i and not const_like(view, i)]
            past = [i for i in data if _root(view, i) in graph_inputs]
            new = [i for i in data if i not in past]
            return (new[0], p.key) if len(past) == 1 and len(new) == 1 else None
        if not passthrough(view, p):
            return None
        value = p.inputs[0]
    return None


def _score_op(n: GNode) -> bool:
    """Ops between the score matmul and the softmax: mask adds, scales, casts, and tanh
    soft-capping (Gemma-2: tanh(s / c) * c)."""
    return n.op in ("add", "mul", "div", "cast", "identity") or (
        n.op == "other" and "tanh" in str(n.params.get("target", "")).lower())


def _untranspose_k(view: GraphView, qk: GNode, kt: str, head_dim: int) -> tuple[str, str]:
    """From K^T (as read by the score matmul) up to K with head_dim last: through scalar scales,
    casts, reshapes (exporters transpose in 3-D) and one transpose. Returns (value, consumer)."""
    value, consumer, seen_t = kt, qk.key, False
    for _ in range(8):
        if seen_t and head_dim > 0 and (view.shape(value) or (0,))[-1] == head_dim:
            return value, consumer
        p = view.producer.get(value)
        if p is None:
            break
        if p.op == "transpose" and not seen_t:
            seen_t = True
        elif not (p.op in ("reshape", "cast", "identity") or _scalar_const(view, p)):
            break
        value = next((i for i in p.inputs if i and not const_like(view, i)), "")
        consumer = p.key
        if not value:
            break
    return kt, ""


def _attention_site(view: GraphView, a: Analysis, n: GNode, kind: str, q: str, k: str, v: str,
                    out: str, q_consumer: str, k_consumer: str, v_consumer: str,
                    k_has_head_last: bool = True) -> AttentionSite:
    qs, ks, vs = (_upstream_linears(view, x) for x in (q, k, v))
    q_proj = qs[0] if len(qs) == 1 else None
    k_proj = ks[0] if len(ks) == 1 else None
    v_proj = vs[0] if len(vs) == 1 else None
    o = _downstream_linear(view, out)
    q_shape = view.shape(q) or ()
    head_dim = q_shape[-1] if len(q_shape) == 4 and q_shape[-1] > 0 else 0
    heads = n.params.get("num_heads")
    kv_heads = n.params.get("num_kv_heads")
    fused = q_proj is not None and q_proj == k_proj == v_proj
    if not heads and head_dim and len(q_shape) == 4 and q_shape[1] > 0:
        heads = q_shape[1]  # [batch, heads, tokens, head_dim], as the attention reads it
    if head_dim == 0 and heads and q_proj and not fused:
        head_dim = a.linears[q_proj].out_features // heads
    if not heads and head_dim and q_proj and not fused:
        heads = a.linears[q_proj].out_features // head_dim
    if not kv_heads and head_dim and k_proj:
        if fused and heads:  # q, k, v in one projection: k and v share what q leaves
            kv_heads = (a.linears[k_proj].out_features - heads * head_dim) // (2 * head_dim)
        elif not fused:
            kv_heads = a.linears[k_proj].out_features // head_dim
    scope = view.by_key[q_proj].scope.rsplit(".", 1)[0] if q_proj else n.scope
    return AttentionSite(
        n.key, scope, kind, int(heads or 0), int(kv_heads or 0), int(head_dim), q_proj, k_proj,
        v_proj, o, q, k if k_has_head_last else "", q_consumer=q_consumer, k_consumer=k_consumer,
        v_value=v, v_consumer=v_consumer)


def _downstream_linear(view: GraphView, value: str) -> str | None:
    todo, seen = [value], set()
    while todo:
        v = todo.pop(0)
        if v in seen:
            continue
        seen.add(v)
        for c in view.consumers.get(v, []):
            if c.op == "linear":
                return c.key
            if c.op in ("transpose", "reshape", "cast", "identity", "expand", "slice"):
                todo.extend(c.outputs)
    return None

