"""Exact rotation pass (QuaRot style), on any IR through the site interface.

Residual mode (pre-norm RMSNorm models), with Q a random Hadamard matrix, d x d:

- norm folding: ``Linear(RMSNorm_g(x)) -> Linear(RMSNorm_1(x))`` with ``W <- W diag(g)``;
- residual stream: ``x -> x Q``. RMSNorm_1(x Q) = RMSNorm_1(x) Q because ||xQ|| = ||x||, so
  readers take ``W <- W Q``, writers ``W <- Q^T W, b <- Q^T b``, embeddings ``E <- E Q`` and the
  head ``W <- W Q``;
- V/O per head: ``W_v <- (I (x) H)^T W_v`` and ``W_o <- W_o (I (x) H)`` with H the head_dim
  Hadamard (softmax mixes tokens, not channels, so the per-head rotation passes through);
- online Hadamard before each MLP writer (down projection): ``Linear(x) -> Linear(x K)`` with
  ``W <- W K``, K = A (x) B emitted as Reshape + two small MatMuls;
- optional online per-head rotation of Q and K after the positional embedding:
  ``q -> q H, k -> k H`` leaves q k^T unchanged.

Online mode (post-norm / LayerNorm models): every linear with a Hadamard-sized input gets
``Linear(x) -> Linear(x K)`` with ``W <- W K``, linears sharing an input share one transform.

All folds are computed in float64 and written back once per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from rotaq.errors import RewriteError
from rotaq.linalg.hadamard import (
    apply_kronecker,
    is_hadamard_size,
    kronecker_split,
    normalized_hadamard,
    random_rotation,
)
from rotaq.model import Model
from rotaq.passes.base import Pass, PassResult
from rotaq.rewriter.analysis import (
    Analysis,
    closure,
    const_root,
    consumers_of,
    first_linears,
)
from rotaq.rewriter.sites import Kronecker

log = logging.getLogger(__name__)


class _Weights:
    """Edits of linear weights, each ``(w, b) -> (w, b)`` in float64, recorded per linear and
    applied on :meth:`flush` one linear at a time: memory holds one weight's working copies,
    never the model's (setters write fresh tensors, so the order of reads does not matter)."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.ops: dict[str, list] = {}

    def apply(self, key: str, fn) -> None:
        self.ops.setdefault(key, []).append(fn)

    def flush(self) -> None:
        for key, fns in self.ops.items():
            w, b = self.graph.get_linear(key)
            for fn in fns:
                w, b = fn(w, b)
            self.graph.set_linear(key, w, b)
        self.ops = {}


def _right(q, w: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``w @ Q`` computed in place a block of rows at a time (rows are independent), so a large
    table (embedding, head) gets no temporaries of its own size."""
    if w.shape[0] <= chunk:
        return q.right(w)
    w = np.ascontiguousarray(w)
    for i in range(0, w.shape[0], chunk):
        w[i:i + chunk] = q.right(w[i:i + chunk])
    return w


def _cache_note(model: Model, stats: dict) -> None:
    """On a KV-cache graph, say what the cache now stores (``kv_cache``): per-head rotated
    values (V/O rotation) and keys (online Q/K rotation, applied to the new keys before their
    Concat with the past) are the rewritten model's own state, so verification compares the
    logits of a prefill plus decode steps fed that state, not the presents."""
    from rotaq.rewriter.kv_capture import is_cache_graph

    if not is_cache_graph(model.graph):
        return
    changed = [what for what, key in (("values", "ov_heads_rotated"), ("keys", "qk_rotated"))
               if stats.get(key)]
    stats["kv_cache"] = f"rotated {' and '.join(changed)}" if changed else "unchanged"


def _online_reason(a: Analysis) -> str:
    """Why the residual stream cannot carry a folded rotation, in the model's own terms."""
    res = a.residual
    kind = res.structure
    if a.experts:
        e = next(iter(a.experts.values()))
        return (f"MoE experts '{e.name or e.key}' are one grouped weight, which the residual "
                "rotation does not fold into")
    if not res.blocks:
        return "no residual stream was found (no residual add fed by a linear)"
    if res.streams > 1:
        return (f"the model has {res.streams} residual streams (encoder-decoder: the decoder's "
                "cross-attention reads the encoder's stream), and one rotation of one stream "
                "is what residual mode folds")
    if kind.startswith(("sandwich", "post-sublayer")):
        b = next(b for b in res.blocks if b.branch_norms)
        n = a.norms[b.branch_norms[0]]
        return (f"the model is {kind}-norm: norm '{n.name or n.key}' scales a sublayer's output "
                "before the residual add, so a rotation of the stream cannot be folded into "
                "its writer")
    if res.post_norms:
        n = a.norms[res.post_norms[0]]
        return (f"the model is post-norm: norm '{n.name or n.key}' is applied to the stream "
                "after the residual add")
    lns = [nk for b in res.blocks for nk in b.norms if a.norms[nk].kind == "layer"]
    if lns:
        n = a.norms[lns[0]]
        return (f"LayerNorm '{n.name or n.key}' subtracts the mean, which does not commute "
                "with a rotation of the residual stream")
    b = next((b for b in res.blocks if not b.norm), None)
    if b is not None:
        return f"block at '{b.add}' reads the stream without a norm"
    return f"the model is {kind}"


@dataclass(frozen=True)
class Rotate(Pass):
    """Fold Hadamard rotations into the weights; emit the online ones as Kronecker subgraphs."""

    name: ClassVar[str] = "rotate"
    exact: ClassVar[bool] = True
    mode: Literal["auto", "residual", "online"] = "auto"
    seed: int = 0
    online_down: bool = True
    rotate_ov: bool = True
    rotate_qk: bool = False
    online_head: bool = False  # online mode: also rotate the head's input

    def requires(self) -> tuple[str, ...]:
        return ("before:quantize",)  # no linear at all: nothing to do, modified=False

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        mode = self.mode
        reason = ""
        if mode == "auto":
            rms = all(a.norms[nk].kind == "rms" for b in a.residual.blocks for nk in b.norms)
            one = a.residual.streams == 1
            mode = "residual" if a.pre_norm and rms and one and not a.experts else "online"
            reason = _online_reason(a) if mode == "online" else ""
        if mode == "residual":
            stats = self._residual(model, a)
        else:
            stats = self._online(model, a)
        stats["mode"] = mode
        stats["structure"] = a.residual.structure
        if reason:
            stats["mode_reason"] = reason
        _cache_note(model, stats)
        # online mode may find no linear of a Hadamard size: the base class then reports
        # modified=False (the graph was not edited)
        return PassResult(model, True, stats)

    # ---- residual-stream rotation ---------------------------------------------------------
    def _residual(self, model: Model, a: Analysis) -> dict:
        g = model.graph
        res = a.residual
        if self.rotate_qk:
            _refuse_fused_rope(a)
        if a.experts:
            e = next(iter(a.experts.values()))
            raise RewriteError(f"rotate: mode=residual cannot fold a rotation into MoE experts "
                               f"'{e.name or e.key}' ({e.num_experts} experts in one grouped "
                               "weight); use mode=online (experts stay unrotated)")
        if not res.pre_norm or res.streams > 1:
            raise RewriteError(f"rotate: mode=residual needs a pre-norm residual stream; "
                               f"{_online_reason(a)}; use mode=online")
        stream_norms = [nk for b in res.blocks for nk in b.norms] + (
            [res.final_norm] if res.final_norm else [])
        for nk in stream_norms:
            n = a.norms[nk]
            if n.kind != "rms":
                raise RewriteError(
                    f"rotate: LayerNorm '{n.name or n.key}' subtracts the mean, which does not "
                    "commute with a rotation of the residual stream; use mode=online")
        d = a.embeddings[res.embedding].dim
        q = random_rotation(d, self.seed)
        w = _Weights(g)
        readers_of = {nk: first_linears(g.view(), a.norms[nk].output)
                      for b in res.blocks for nk in b.norms}
        if res.final_norm:
            readers_of[res.final_norm] = res.head
        # 1. fold norm scales into the readers (all read from one view, then written)
        view = g.view()
        gammas = {}
        for nk, readers in readers_of.items():
            self._check_only_linears(a, nk, readers)
            n = a.norms[nk]
            if n.scale is not None:
                node, idx = n.scale
                gamma = g.get_const(const_root(view, view.by_key[node].inputs[idx])).reshape(-1)
                gammas[nk] = gamma + n.scale_offset
        for nk, gamma in gammas.items():
            for r in readers_of[nk]:
                w.apply(r, lambda wr, br, gamma=gamma: (np.multiply(wr, gamma[None, :], out=wr),
                                                        br))
            node, idx = a.norms[nk].scale
            g.set_const(node, idx, np.ones_like(gamma) - a.norms[nk].scale_offset)
        folded = len(gammas)
        # 2. rotate the stream
        for key in self._stream_embeddings(a):
            g.set_embedding(key, _right(q, g.get_embedding(key)))
        for nk, readers in readers_of.items():
            for r in readers:
                w.apply(r, lambda wr, br: (_right(q, wr), br))
        writers = [wk for b in res.blocks for wk in b.writers]
        for wk in writers:
            w.apply(wk, lambda ww, bw: (q.left_t(ww), None if bw is None else q.right(bw)))
        # 3. per-head V/O rotation
        ov = 0
        if self.rotate_ov:
            for site in a.attention:
                if _rotate_packed_ov(w, site, a):
                    ov += 1
                    continue
                if site.v_proj and site.o_proj and site.v_proj not in (site.q_proj, site.k_proj) \
                        and is_hadamard_size(site.head_dim):
                    h = normalized_hadamard(site.head_dim)
                    hv = np.kron(np.eye(a.linears[site.v_proj].out_features // site.head_dim), h)
                    ho = np.kron(np.eye(a.linears[site.o_proj].in_features // site.head_dim), h)
                    w.apply(site.v_proj, lambda wv, bv, hv=hv: (
                        hv.T @ wv, None if bv is None else bv @ hv))
                    w.apply(site.o_proj, lambda wo, bo, ho=ho: (wo @ ho, bo))
                    ov += 1
        # 4. online Hadamard before MLP writers (down projections)
        o_projs = {s.o_proj for s in a.attention}
        online = 0
        if self.online_down:
            for wk in writers:
                if wk in o_projs:
                    continue
                lin = a.linears[wk]
                if not is_hadamard_size(lin.in_features):
                    log.warning("no Hadamard of size %d: no online rotation before %s",
                                lin.in_features, lin.name or wk)
                    continue
                fa, fb = kronecker_split(lin.in_features)
                w.apply(wk, lambda ww, bw, fa=fa, fb=fb: (apply_kronecker(ww, fa, fb), bw))
                g.insert_transform(lin.input, [wk], Kronecker((fa, fb)))
                online += 1
        w.flush()
        # 5. optional online Q/K rotation (after RoPE)
        qk = self._online_qk(g, a) if self.rotate_qk else 0
        return {"dim": d, "norms_folded": folded, "writers": len(writers),
                "readers": sum(len(r) for r in readers_of.values()), "ov_heads_rotated": ov,
                "online_hadamards": online, "qk_rotated": qk}

    def _stream_embeddings(self, a: Analysis) -> list[str]:
        """Embeddings whose outputs are summed into the stream start (token + position)."""
        first = a.residual.embedding
        keys = [first]
        for key, e in a.embeddings.items():
            if key != first and e.dim == a.embeddings[first].dim:
                keys.append(key)
        return keys

    def _check_only_linears(self, a: Analysis, nk: str, readers: list[str]) -> None:
        n = a.norms[nk]
        others = [c for c in consumers_of(a.view, closure(a.view, n.output)) if c.op != "linear"]
        if others:
            raise RewriteError(f"rotate: the output of norm '{n.name or nk}' is read by a "
                               f"'{others[0].op}' op, not only by linears; cannot fold it")

    def _online_qk(self, g, a: Analysis) -> int:
        count = 0
        for site in a.attention:
            if not site.q_value or not site.k_value or not is_hadamard_size(site.head_dim):
                log.warning("attention %s: no per-head Q/K rotation point found", site.name)
                continue
            h = normalized_hadamard(site.head_dim)
            g.insert_transform(site.q_value, [site.q_consumer], Kronecker((h,)))
            g.insert_transform(site.k_value, [site.k_consumer], Kronecker((h,)))
            count += 1
        return count

    # ---- per-linear online rotation ---------------------------------------------------------
    def _online(self, model: Model, a: Analysis) -> dict:
        g = model.graph
        if self.rotate_qk:
            _refuse_fused_rope(a)
        head = set(a.residual.head)
        groups: dict[str, list[str]] = {}
        for key, lin in a.linears.items():
            if key in head and not self.online_head:
                continue
            groups.setdefault(lin.input, []).append(key)
        w = _Weights(g)
        done = skipped = inserted = 0
        for value, keys in groups.items():
            n = a.linears[keys[0]].in_features
            if not is_hadamard_size(n):
                log.warning("no Hadamard of size %d: %s left unrotated", n, keys)
                skipped += len(keys)
                continue
            fa, fb = kronecker_split(n)
            for key in keys:
                w.apply(key, lambda wk, bk, fa=fa, fb=fb: (apply_kronecker(wk, fa, fb), bk))
            g.insert_transform(value, keys, Kronecker((fa, fb)))
            done += len(keys)
            inserted += 1
        w.flush()
        qk = self._online_qk(g, a) if self.rotate_qk else 0
        return {"linears_rotated": done, "online_hadamards": inserted,
                "skipped": skipped, "qk_rotated": qk}


def _rotate_packed_ov(w: _Weights, site, a: Analysis) -> bool:
    """V/O rotation through ORT's GroupQueryAttention fed one packed q|k|v projection: the
    projection's rows are [q (heads x hd); k (kv x hd); v (kv x hd)], so the v rows take
    ``W_v <- (I_kv (x) H)^T W_v`` and the o projection ``W_o <- W_o (I_heads (x) H)``; each
    query head reads one KV group's V, so its output is rotated by the same H."""
    hd = site.head_dim
    if site.kind != "gqa" or not (site.q_proj and site.q_proj == site.k_proj == site.v_proj
                                  and site.o_proj) or not is_hadamard_size(hd):
        return False
    lo = (site.num_heads + site.num_kv_heads) * hd
    hi = lo + site.num_kv_heads * hd
    if a.linears[site.v_proj].out_features != hi:
        return False
    h = normalized_hadamard(hd)
    hv = np.kron(np.eye(site.num_kv_heads), h)

    def packed(wq: np.ndarray, bq: np.ndarray | None) -> tuple:
        wq = wq.copy()
        wq[lo:hi] = hv.T @ wq[lo:hi]
        if bq is not None:
            bq = bq.copy()
            bq[lo:hi] = bq[lo:hi] @ hv
        return wq, bq

    ho = np.kron(np.eye(a.linears[site.o_proj].in_features // hd), h)
    w.apply(site.v_proj, packed)
    w.apply(site.o_proj, lambda wo, bo: (wo @ ho, bo))
    return True


def _refuse_fused_rope(a: Analysis) -> None:
    """rotate_qk needs q and k per head after RoPE; GroupQueryAttention keeps that inside."""
    for site in a.attention:
        if site.kind != "gqa":
            continue
        n = a.view.by_key[site.key]
        why = ("applies RoPE inside the op (do_rotary=1), so no point after RoPE is exposed"
               if n.params.get("do_rotary") else
               "takes q and k as [batch, seq, heads x head_dim] inputs, where rotaq does not "
               "insert the per-head rotation")
        raise RewriteError(f"rotate: rotate_qk cannot rotate Q/K of GroupQueryAttention node "
                           f"'{site.key}': it {why}; a rotation that commutes with RoPE for "
                           "every position is itself a RoPE-style 2x2-block rotation, which does "
                           "not spread outliers; use rotate_qk=false")
