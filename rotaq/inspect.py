"""``rotaq.inspect``: what the matcher found, as a JSON-ready dict."""

from __future__ import annotations

from typing import Any

from rotaq.loading import load


def inspect(model: Any, explain: bool = False) -> dict[str, Any]:
    """Linears, attention sites (heads, KV heads, head size), norms, residual stream; with
    ``explain``, ``unmatched``: why each candidate that was not matched was not."""
    m = load(model)
    a = m.analysis()
    res = a.residual
    view = a.view

    def name(key: str | None) -> str | None:
        if key is None:
            return None
        return view.by_key[key].scope or key

    out = {
        "model": m.source.get("name", ""),
        "ir": m.ir,
        "pre_norm": res.pre_norm,
        "num_linears": len(a.linears),
        "linears": [{"key": s.key, "name": s.name, "in_features": s.in_features,
                     "out_features": s.out_features, "bias": s.has_bias,
                     "weight_shared": s.weight_shared,
                     "quantized": view.by_key[s.key].params.get("quantized")}
                    for s in a.linears.values()],
        "attention": [{"key": s.key, "name": s.name, "kind": s.kind, "num_heads": s.num_heads,
                       "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                       "q_proj": name(s.q_proj), "k_proj": name(s.k_proj),
                       "v_proj": name(s.v_proj), "o_proj": name(s.o_proj)} for s in a.attention],
        "norms": [{"key": n.key, "name": n.name, "kind": n.kind, "dim": n.dim, "fused": n.fused,
                   "residual_add": bool(view.by_key[n.key].params.get("skip"))}
                  for n in a.norms.values()],
        "embeddings": [{"key": e.key, "name": e.name, "num_embeddings": e.num_embeddings,
                        "dim": e.dim} for e in a.embeddings.values()],
        "experts": [{"key": e.key, "name": e.name, "num_experts": e.num_experts,
                     "in_features": e.in_features, "out_features": e.out_features}
                    for e in a.experts.values()],
        "routers": [name(k) for k in a.linears if k in a.routers],
        "structure": res.structure,
        "block_structure": [_block(b, name) for b in res.blocks],
        "residual": {
            "blocks": len(res.blocks),
            "embedding": name(res.embedding),
            "final_norm": name(res.final_norm),
            "head": [name(h) for h in res.head],
            "post_norms": len(res.post_norms),
            "readers": sum(len(b.readers) for b in res.blocks),
            "writers": sum(len(b.writers) for b in res.blocks),
        },
    }
    if explain:
        from rotaq.rewriter.analysis_explain import explain as why

        out["unmatched"] = [{"key": r.key, "name": name(r.key) if r.key in view.by_key else r.key,
                             "kind": r.kind, "reason": r.reason} for r in why(a)]
    return out


def _block(b: Any, name: Any) -> dict[str, Any]:
    """One residual block: which norm reads the stream, which writes it, where the add is."""
    return {"add": b.add, "norm_before": [name(k) for k in b.norms],
            "norm_after_sublayer": [name(k) for k in b.branch_norms],
            "readers": [name(k) for k in b.readers], "writers": [name(k) for k in b.writers],
            "parallel": b.parallel}
