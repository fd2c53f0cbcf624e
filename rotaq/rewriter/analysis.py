"""Structural matching on a :class:`GraphView`, shared by both IRs.

Finds linears, embeddings, norms (fused ops and the decomposed pow/mean/rsqrt/mul RMSNorm),
attention (fused SDPA/Attention ops and explicit matmul-softmax-matmul) with its projections
and head counts, and the residual stream. Nothing here looks at names: ``scope`` is copied into
sites for reports only. The parts live in ``analysis_graph`` (view helpers), ``analysis_norms``,
``analysis_attention`` and ``analysis_residual``; ``analysis_explain`` says why a candidate
was not matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rotaq.rewriter.analysis_attention import _before_cache_concat, _find_attention
from rotaq.rewriter.analysis_graph import (  # noqa: F401  (re-exported: passes use them)
    Reason,
    _upstream_linears,
    _writer,
    closure,
    const_like,
    const_root,
    consumers_of,
    first_linears,
    passthrough,
)
from rotaq.rewriter.analysis_norms import _find_norms
from rotaq.rewriter.analysis_residual import _find_residual
from rotaq.rewriter.sites import (
    AttentionSite,
    EmbeddingSite,
    ExpertsSite,
    GraphView,
    LinearSite,
    NormSite,
    ResidualStream,
)


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
    # why candidates were not matched, recorded where a match fails (``explain`` adds the rest)
    reasons: list[Reason] = field(default_factory=list)

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
    why: list[Reason] = []
    norms, internal = _find_norms(view, why)
    a = Analysis(view, linears, embeddings, norms, [], ResidualStream(False, None, None, [], []),
                 internal, reasons=why)
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
