"""Norms: fused LayerNorm / RMSNorm ops, and RMSNorm decomposed into pow/mean/rsqrt/mul."""

from __future__ import annotations

from rotaq.rewriter.analysis_graph import Reason, _is_meta, _root, const_like, describe
from rotaq.rewriter.sites import GNode, GraphView, NormSite


def _find_norms(view: GraphView, why: list[Reason]
                ) -> tuple[dict[str, NormSite], dict[str, set[str]]]:
    """Every norm; for a ``mean`` that does not start an RMSNorm, the reason goes to ``why``."""
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
            if isinstance(site, str):
                why.append(Reason(n.key, "norm", f"{n.key} (mean): {site}"))
            else:
                norms[site[0].key] = site[0]
                internal[site[0].key] = site[1]
    return norms, internal


def _decomposed_rms(view: GraphView, mean: GNode) -> tuple[NormSite, set[str]] | str:
    """x * rsqrt(mean(x^2) + eps) [* g]  (also 1/sqrt, x / sqrt forms); else why not."""
    sq = view.producer.get(mean.inputs[0])
    if sq is None or not (sq.op == "pow" and sq.params.get("scalar") == 2.0 or sq.op == "mul"
                          and len(sq.inputs) == 2 and sq.inputs[0] == sq.inputs[1]):
        return f"averages {describe(view, mean.inputs[0])}, not x^2 or x*x (no RMSNorm)"
    x = sq.inputs[0]
    nodes = {sq.key, mean.key}
    cur = mean
    chain = view.consumers.get(cur.outputs[0], [])
    if len(chain) == 1 and chain[0].op == "add":
        cur = chain[0]
        nodes.add(cur.key)
        chain = view.consumers.get(cur.outputs[0], [])
    if len(chain) != 1:
        return f"mean(x^2) is read by {len(chain)} nodes, expected one sqrt/rsqrt (after +eps)"
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
            return f"sqrt {r.key} is not followed by one reciprocal, 1/sqrt or division"
    elif r.op == "rsqrt":
        mode = "mul"
    else:
        return f"mean(x^2) [+ eps] is read by {r.op} {r.key}, not by a sqrt or rsqrt"
    apply = [c for c in view.consumers.get(r.outputs[0], []) if c.op == mode]
    if len(apply) != 1:
        return f"the 1/RMS of {r.key} is applied by {len(apply)} '{mode}' nodes, expected one"
    t = apply[0]
    other = [i for i in t.inputs if i != r.outputs[0]]
    if len(other) != 1 or _root(view, other[0]) != _root(view, x):
        return (f"{mode} {t.key} scales {describe(view, other[0]) if other else 'nothing'}, "
                f"not the x whose mean square was taken ({describe(view, x)})")
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

