"""Structural matching on a :class:`GraphView`, shared by both IRs.

Finds linears, embeddings, norms (fused ops and the decomposed pow/mean/rsqrt/mul RMSNorm),
attention (fused SDPA/Attention ops and explicit matmul-softmax-matmul) with its projections
and head counts, and the residual stream. Nothing here looks at names: ``scope`` is copied into
sites for reports only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rotaq.rewriter.sites import (
    AttentionSite,
    Block,
    EmbeddingSite,
    ExpertsSite,
    GNode,
    GraphView,
    LinearSite,
    NormSite,
    ResidualStream,
)

_META_OPS = ("_assert", "sym_size", "sym_numel", "guards", "Shape")  # read no values


@dataclass
class Analysis:
    view: GraphView
    linears: dict[str, LinearSite]
    embeddings: dict[str, EmbeddingSite]
    norms: dict[str, NormSite]
    attention: list[AttentionSite]
    residual: ResidualStream
    norm_internal: dict[str, set[str]] = field(default_factory=dict)
    experts: dict[str, ExpertsSite] = field(default_factory=dict)
    routers: set[str] = field(default_factory=set)  # MoE routers: linears feeding a top-k

    @property
    def pre_norm(self) -> bool:
        return self.residual.pre_norm

    def linear_by_output(self, value: str) -> LinearSite | None:
        n = self.view.producer.get(value)
        return self.linears.get(n.key) if n is not None else None


def analyze(view: GraphView) -> Analysis:
    linears = {n.key: LinearSite(n.key, n.scope, n.params["in_features"], n.params["out_features"],
                                 n.inputs[0], n.outputs[0], n.params["has_bias"],
                                 n.params.get("weight_shared", False))
               for n in view.nodes if n.op == "linear"}
    embeddings = {n.key: EmbeddingSite(n.key, n.scope, n.params["num_embeddings"], n.params["dim"],
                                       n.outputs[0]) for n in view.nodes if n.op == "embedding"}
    norms, internal = _find_norms(view)
    a = Analysis(view, linears, embeddings, norms, [], ResidualStream(False, None, None, [], []),
                 internal)
    a.experts = {n.key: ExpertsSite(n.key, n.scope, n.params["num_experts"],
                                    n.params["in_features"], n.params["out_features"],
                                    n.inputs[0], n.outputs[0])
                 for n in view.nodes if n.op == "experts"}
    a.routers = {k for k in linears if _feeds_topk(view, linears[k].output)}
    a.attention = [_before_cache_concat(view, s) for s in _find_attention(view, a)]
    a.residual = _find_residual(view, a)
    return a


def _feeds_topk(view: GraphView, value: str) -> bool:
    """A MoE router: its logits reach a top-k (through casts and a softmax/sigmoid)."""
    todo, seen = [value], 0
    while todo and seen < 8:
        v = todo.pop()
        seen += 1
        for c in view.consumers.get(v, []):
            t = str(c.params.get("target", "")).lower()
            if "topk" in t:
                return True
            if c.op in ("cast", "identity", "softmax") or "sigmoid" in t:
                todo.extend(c.outputs)
    return False


# ---- helpers on the view ---------------------------------------------------------------------
def _is_meta(n: GNode) -> bool:
    return n.op == "other" and any(m in str(n.params.get("target", "")) for m in _META_OPS)


def _scalar_const(view: GraphView, n: GNode) -> bool:
    """True for mul/div of a tensor by a scalar (a constant with <= 1 element)."""
    if n.op not in ("mul", "div"):
        return False
    if len(n.inputs) == 1 and "scalar" in n.params:
        return True
    others = [i for i in n.inputs if const_like(view, i)]
    shp = [view.shape(i) for i in others]
    return len(others) == 1 and shp[0] is not None and (len(shp[0]) == 0 or shp[0] == (1,))


def const_root(view: GraphView, value: str) -> str | None:
    """The constant that ``value`` is (or is a cast / reshape of), else None."""
    for _ in range(8):
        if view.is_const(value):
            return value
        p = view.producer.get(value)
        if p is None or p.op not in ("cast", "identity", "reshape") or not p.inputs:
            return None
        value = p.inputs[0]
    return None


def const_like(view: GraphView, value: str) -> bool:
    return const_root(view, value) is not None


def passthrough(view: GraphView, n: GNode) -> bool:
    """Ops that act on tokens only: the channel (last) axis reaches the output unchanged."""
    if n.op in ("cast", "identity"):
        return True
    if n.op in ("slice", "reshape", "expand") or (
            n.op == "other" and n.params.get("target") in ("Gather", "Squeeze", "Unsqueeze",
                                                           "aten.index.Tensor")):
        si, so = view.shape(n.inputs[0]), view.shape(n.outputs[0])
        return bool(si and so and si[-1] == so[-1] and si[-1] > 0)
    return _scalar_const(view, n)


def closure(view: GraphView, value: str) -> list[str]:
    """``value`` and every value reached from it through passthrough ops."""
    out, todo = [], [value]
    while todo:
        v = todo.pop()
        if v in out:
            continue
        out.append(v)
        for c in view.consumers.get(v, []):
            if passthrough(view, c) and c.inputs and c.inputs[0] == v:
                todo.extend(c.outputs)
    return out


def consumers_of(view: GraphView, values: list[str]) -> list[GNode]:
    seen, out = set(), []
    for v in values:
        for c in view.consumers.get(v, []):
            if c.key not in seen and not _is_meta(c) and not (passthrough(view, c) and c.inputs[0] == v):
                seen.add(c.key)
                out.append(c)
    order = {n.key: i for i, n in enumerate(view.nodes)}
    return sorted(out, key=lambda n: order[n.key])


def first_linears(view: GraphView, value: str) -> list[str]:
    """Linears (and MoE expert groups) reading ``value`` through passthrough ops."""
    return [c.key for c in consumers_of(view, closure(view, value))
            if c.op in ("linear", "experts")]


def _root(view: GraphView, value: str) -> str:
    while True:
        p = view.producer.get(value)
        if p is None or p.op not in ("cast", "identity"):
            return value
        value = p.inputs[0]


def _upstream_linears(view: GraphView, value: str, limit: int = 64) -> list[str]:
    """Nearest linears above ``value`` (BFS over producers, not crossing a linear)."""
    found, seen, todo = [], set(), [value]
    while todo and len(seen) < limit:
        v = todo.pop(0)
        if v in seen or view.is_const(v):
            continue
        seen.add(v)
        p = view.producer.get(v)
        if p is None:
            continue
        if p.op == "linear":
            if p.key not in found:
                found.append(p.key)
            continue
        if p.op in ("embedding", "sdpa", "gqa", "softmax", "layer_norm", "rms_norm") or _is_meta(p):
            continue  # a Shape (meta) output carries no values of what it reads
        todo.extend(i for i in p.inputs if i)
    return found


def _writer(view: GraphView, value: str) -> str | None:
    """The linear whose output reaches ``value`` through passthrough ops only."""
    while True:
        p = view.producer.get(value)
        if p is None:
            return None
        if p.op == "linear":
            return p.key
        if not passthrough(view, p):
            return None
        value = p.inputs[0]


# ---- norms -----------------------------------------------------------------------------------
def _find_norms(view: GraphView) -> tuple[dict[str, NormSite], dict[str, set[str]]]:
    norms: dict[str, NormSite] = {}
    internal: dict[str, set[str]] = {}
    for n in view.nodes:
        if n.op in ("layer_norm", "rms_norm"):
            kind = "layer" if n.op == "layer_norm" else "rms"
            scale = (n.key, 1) if len(n.inputs) > 1 and n.inputs[1] else None
            bias = (n.key, 2) if len(n.inputs) > 2 and n.inputs[2] else None
            norms[n.key] = NormSite(n.key, n.scope, kind, n.params.get("dim", 0), n.inputs[0],
                                    n.outputs[0], scale, bias, True)
            internal[n.key] = {n.key}
        elif n.op == "mean":
            site = _decomposed_rms(view, n)
            if site is not None:
                norms[site[0].key] = site[0]
                internal[site[0].key] = site[1]
    return norms, internal


def _decomposed_rms(view: GraphView, mean: GNode) -> tuple[NormSite, set[str]] | None:
    """x * rsqrt(mean(x^2) + eps) [* g]  (also 1/sqrt, x / sqrt forms)."""
    sq = view.producer.get(mean.inputs[0])
    if sq is None:
        return None
    if sq.op == "pow" and sq.params.get("scalar") == 2.0 or sq.op == "mul" and len(sq.inputs) == 2 and sq.inputs[0] == sq.inputs[1]:
        x = sq.inputs[0]
    else:
        return None
    nodes = {sq.key, mean.key}
    cur = mean
    chain = view.consumers.get(cur.outputs[0], [])
    if len(chain) == 1 and chain[0].op == "add":
        cur = chain[0]
        nodes.add(cur.key)
        chain = view.consumers.get(cur.outputs[0], [])
    if len(chain) != 1:
        return None
    r = chain[0]
    nodes.add(r.key)
    if r.op == "sqrt":
        nxt = view.consumers.get(r.outputs[0], [])
        if len(nxt) == 1 and (nxt[0].op == "reciprocal" or _one_over(nxt[0], r.outputs[0])):
            r = nxt[0]
            nodes.add(r.key)
            mode = "mul"
        elif len(nxt) == 1 and nxt[0].op == "div":
            mode = "div"
        else:
            return None
    elif r.op == "rsqrt":
        mode = "mul"
    else:
        return None
    apply = [c for c in view.consumers.get(r.outputs[0], []) if c.op == mode]
    if len(apply) != 1:
        return None
    t = apply[0]
    other = [i for i in t.inputs if i != r.outputs[0]]
    if len(other) != 1 or _root(view, other[0]) != _root(view, x):
        return None
    nodes.add(t.key)
    out = t.outputs[0]
    scale, offset = None, 0.0
    # optional cast, then a multiply by a constant vector g
    val = out
    for _ in range(3):
        cs = [c for c in view.consumers.get(val, []) if not _is_meta(c)]
        if len(cs) != 1:
            break
        c = cs[0]
        if c.op == "cast":
            val = c.outputs[0]
            continue
        if c.op == "mul" and len(c.inputs) == 2:
            ci = [k for k, i in enumerate(c.inputs) if view.is_const(i)]
            if len(ci) == 1 and (view.shape(c.inputs[ci[0]]) or (0,))[-1] > 1:
                scale = (c.key, ci[0])
                nodes.add(c.key)
                out = c.outputs[0]
            elif len(ci) == 0:  # x * (w + offset), offset a scalar (Gemma's 1 + w)
                other = [i for i in c.inputs if i != val]
                p = view.producer.get(other[0]) if other else None
                if p is not None and p.op == "add" and "scalar" in p.params:
                    pi = [k for k, i in enumerate(p.inputs) if const_like(view, i)]
                    if len(pi) == 1:
                        scale, offset = (p.key, pi[0]), p.params["scalar"]
                        nodes.update((c.key, p.key))
                        out = c.outputs[0]
        break
    dim = (view.shape(x) or (0,))[-1]
    key = view.producer[out].key
    site = NormSite(key, view.by_key[key].scope, "rms", dim, x, out, scale, None, False, offset)
    return site, nodes


def _one_over(n: GNode, value: str) -> bool:
    """``Div(1, value)``: a reciprocal as TorchScript exports ``torch.rsqrt`` (Optimum)."""
    return (n.op == "div" and len(n.inputs) == 2 and n.inputs[1] == value
            and n.inputs[0] != value and n.params.get("scalar") == 1.0)


# ---- attention -------------------------------------------------------------------------------
def _find_attention(view: GraphView, a: Analysis) -> list[AttentionSite]:
    sites = []
    for n in view.nodes:
        if n.op == "sdpa":
            q, k, v = n.inputs[0], n.inputs[1], n.inputs[2]
            sites.append(_attention_site(view, a, n, "sdpa", q, k, v, n.outputs[0],
                                         q_consumer=n.key, k_consumer=n.key, v_consumer=n.key))
        elif n.op == "softmax":
            site = _explicit_attention(view, a, n)
            if site is not None:
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


def _explicit_attention(view: GraphView, a: Analysis, sm: GNode) -> AttentionSite | None:
    # softmax -> (dropout/cast)* -> matmul(P, V)
    probs = closure(view, sm.outputs[0])
    for c in consumers_of(view, probs):  # Where(IsNaN(p), 0, p): the exporter's NaN guard
        if c.op == "other" and c.params.get("target") == "Where" and probs[0] in c.inputs:
            probs = closure(view, c.outputs[0])
    pv = [c for c in consumers_of(view, probs) if c.op == "matmul"]
    if len(pv) != 1 or view.is_const(pv[0].inputs[1]):
        return None
    # scores <- (add mask | mul/div scale | cast)* <- matmul(Q, K^T)
    cur = sm.inputs[0]
    for _ in range(8):
        p = view.producer.get(cur)
        if p is None:
            return None
        if p.op == "matmul":
            break
        if not _score_op(p):
            return None
        cur = next((i for i in p.inputs if i and not view.is_const(i)
                    and view.producer.get(i) is not None
                    and (view.producer[i].op == "matmul" or _score_op(view.producer[i]))), "")
    else:
        return None
    qk = view.producer[cur]
    if any(view.is_const(i) for i in qk.inputs[:2]):
        return None
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


# ---- residual stream -------------------------------------------------------------------------
def _norm_by_output(a: Analysis) -> dict[str, str]:
    return {n.output: k for k, n in a.norms.items()}


def _branch(view: GraphView, a: Analysis, n: GNode, stream: list[str]
            ) -> tuple[list[str], list[str]] | None:
    """If ``n`` adds a sublayer's output into the stream, (writer linears, branch norms).

    The sublayer's output reaches the add through passthrough ops, through a norm applied to
    the sublayer's output (sandwich / post-sublayer norms: Gemma-2/3, OLMo-2), and through adds
    of several sublayers (parallel attention + MLP: GPT-J, GPT-NeoX, Phi, Falcon).
    """
    if n.op != "add" or len(n.inputs) != 2 or any(const_like(view, i) for i in n.inputs):
        return None
    ins = [i for i in n.inputs if i in stream]
    if len(ins) != 1:
        return None
    other = n.inputs[1] if n.inputs[0] in stream else n.inputs[0]
    return _tail(view, a, other, set(stream))


def _tail(view: GraphView, a: Analysis, value: str, stream: set[str]
          ) -> tuple[list[str], list[str]] | None:
    by_out = _norm_by_output(a)
    writers: list[str] = []
    norms: list[str] = []
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        for _ in range(64):
            if v in stream or v in seen or view.is_const(v):
                return None
            seen.add(v)
            p = view.producer.get(v)
            if p is None:
                return None
            if p.op == "linear":
                writers.append(p.key)
                break
            if v in by_out:
                norms.append(by_out[v])
                v = a.norms[by_out[v]].input
                continue
            if p.op == "add" and len(p.inputs) == 2 and not any(view.is_const(i) for i in p.inputs):
                todo.extend(p.inputs)
                break
            if p.op == "experts":  # MoE: the experts' down projections write the stream
                writers.append(p.key)
                break
            if passthrough(view, p):
                v = p.inputs[0]
                continue
            carry = _channel_input(view, p, v)
            if carry is None:
                return None
            v = carry
        else:
            return None
    order = {nd.key: i for i, nd in enumerate(view.nodes)}
    return sorted(writers, key=order.get), norms


def _channel_input(view: GraphView, n: GNode, out: str) -> str | None:
    """For token-axis ops in a MoE combine (gather, routing-weight scale, sum over the top-k
    axis): the one input that carries the output's channel axis, if exactly one does."""
    if n.op not in ("mul", "reshape", "other") or n.op == "other" and not any(
            t in str(n.params.get("target", "")) for t in ("index", "sum", "Gather", "ReduceSum",
                                                         "scatter", "Scatter")):
        return None
    dim = (view.shape(out) or (0,))[-1]
    if dim <= 1:
        return None
    carry = [i for i in n.inputs if i and not view.is_const(i)
             and (view.shape(i) or (0,))[-1] == dim]
    return carry[0] if len(carry) == 1 else None


def _stream_norms(a: Analysis, cons: list[GNode]) -> list[str]:
    keys = {c.key for c in cons}
    return [k for k, s in a.norm_internal.items() if keys & s and a.norms[k].input in
            {i for c in cons for i in c.inputs}]


def _find_residual(view: GraphView, a: Analysis) -> ResidualStream:
    """Every residual stream, walked block by block from its start: an embedding, or (for
    encoders that start from a convolution or patch projection) the stream input of the first
    residual add no stream holds yet. Encoder-decoders have two streams; their blocks are listed
    encoder first, ``streams`` counts them."""
    res = ResidualStream(False, None, None, [], [])
    starts = [e.output for e in a.embeddings.values()]
    last_head: list[str] = []
    done: set[str] = set()
    walked = 0
    while True:
        start = next((v for v in starts if v not in done), None)
        if start is None:
            start = _first_free_add(view, a, {b.add for b in res.blocks})
            if start is None:
                break
        done.add(start)
        part = _walk(view, a, start)
        if not part.blocks or part.blocks[0].add in {b.add for b in res.blocks}:
            continue
        walked += 1
        if res.embedding is None:
            res.embedding = next((k for k, e in a.embeddings.items() if e.output == start), None)
        res.blocks.extend(part.blocks)
        res.post_norms.extend(part.post_norms)
        res.final_norm = part.final_norm
        last_head = part.head
    res.streams = walked
    res.head = _heads_from_outputs(view)
    if not res.head:  # an output the walk up cannot cross (e.g. a custom op): the stream's end
        res.head = last_head or (first_linears(view, a.norms[res.final_norm].output)
                                 if res.final_norm else [])
    return _finish(view, a, res)


def _first_free_add(view: GraphView, a: Analysis, taken: set[str]) -> str | None:
    """The stream input of the first residual add (in graph order) outside ``taken``."""
    for n in view.nodes:
        if n.op != "add" or n.key in taken or len(n.inputs) != 2 or any(
                const_like(view, i) for i in n.inputs):
            continue
        sides = [i for i, o in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0]))
                 if (t := _tail(view, a, o, set(closure(view, i)))) and t[0]
                 and _depends(view, o, i) and not _depends(view, i, o)]
        if len(sides) == 1:
            return sides[0]
    return None


def _depends(view: GraphView, value: str, target: str, limit: int = 4096) -> bool:
    """Is ``value`` computed from ``target`` (a residual branch is computed from its stream)?"""
    todo, seen = [value], set()
    while todo and len(seen) < limit:
        v = todo.pop()
        if v == target:
            return True
        if v in seen:
            continue
        seen.add(v)
        p = view.producer.get(v)
        if p is not None:
            todo.extend(i for i in p.inputs if i and not view.is_const(i))
    return False


def _walk(view: GraphView, a: Analysis, v: str) -> ResidualStream:
    res = ResidualStream(False, None, None, [], [])
    for _ in range(10_000):
        stream = closure(view, v)
        cons = consumers_of(view, stream)
        adds = [(c, b) for c in cons for b in [_branch(view, a, c, stream)] if b and b[0]]
        norm_keys = _stream_norms(a, cons)
        if adds:
            add, (writers, bnorms) = adds[0]
            readers = [r for nk in norm_keys for r in first_linears(view, a.norms[nk].output)]
            readers += [c.key for c in cons if c.op == "linear" and c.key not in readers]
            res.blocks.append(Block(norm_keys[0] if norm_keys else None, readers, writers,
                                    add.key, norms=norm_keys, branch_norms=bnorms))
            v = add.outputs[0]
            after = consumers_of(view, closure(view, v))
            after_norms = _stream_norms(a, after)
            if after_norms and not any(c.op == "linear" for c in after) and not any(
                    _branch(view, a, c, closure(view, v)) for c in after):
                nk2 = after_norms[0]
                if _continues(view, a, a.norms[nk2].output):
                    res.post_norms.append(nk2)
                    v = a.norms[nk2].output
            continue
        if norm_keys:
            nk = norm_keys[0]
            if _continues(view, a, a.norms[nk].output):
                res.post_norms.append(nk)
                v = a.norms[nk].output
                continue
            res.final_norm = nk
            res.head = first_linears(view, a.norms[nk].output)
            break
        combine = [c for c in cons if c.op == "add" and len(c.inputs) == 2
                   and not _upstream_linears(view, next((i for i in c.inputs
                                                         if i not in stream), v))]
        if combine:
            v = combine[0].outputs[0]
            continue
        res.head = [c.key for c in cons if c.op == "linear"]
        break
    return res


def _finish(view: GraphView, a: Analysis, res: ResidualStream) -> ResidualStream:
    """The final norm is the norm the head reads (found from the graph output, never by
    position); pre-norm means every block reads the stream through a norm and writes it back
    without one."""
    by_out = _norm_by_output(a)
    found = None
    for h in res.head:
        v = view.by_key[h].inputs[0]
        for _ in range(16):
            if v in by_out:
                found = by_out[v]
                break
            p = view.producer.get(v)
            if p is None or not passthrough(view, p):
                break
            v = p.inputs[0]
        if found:
            break
    if res.head:  # a head that reads the stream without a norm: no final norm to fold
        res.final_norm = found
    blocks = res.blocks
    res.pre_norm = bool(blocks) and not res.post_norms and all(
        b.norm and not b.branch_norms for b in blocks)
    return res


def _heads_from_outputs(view: GraphView) -> list[str]:
    """Linears whose outputs reach a graph output through elementwise ops on one tensor only
    (casts, reshapes, slices, scalar scales, tanh soft-capping): the model's heads."""
    heads: list[str] = []
    for out in view.outputs:
        v = out
        for _ in range(32):
            p = view.producer.get(v)
            if p is None:
                break
            if p.op == "linear":
                if p.key not in heads:
                    heads.append(p.key)
                break
            live = [i for i in p.inputs if i and not const_like(view, i)]
            tanh = p.op == "other" and "tanh" in str(p.params.get("target", "")).lower()
            bias = p.op in ("add", "sub") and len(live) == 1  # a logits bias (BART)
            if not (passthrough(view, p) or p.op == "transpose" or tanh or bias) or not live:
                break
            v = p.inputs[0] if p.inputs[0] in live else live[0]
    return heads


def _continues(view: GraphView, a: Analysis, value: str) -> bool:
    """Does the stream go on after this norm (a residual add reads its output downstream)?"""
    stream = closure(view, value)
    for c in view.nodes:
        if c.op == "add" and _branch(view, a, c, stream):
            return True
    return False
