"""Public folds: the exact weight rewrites that rotation passes compose, each taking its
rotation as an argument (a random Hadamard for ``rotate``, a learned matrix for ``spin``).

Notation: a linear computes ``y = x W^T + b`` with ``W [out, in]``. For an orthogonal ``Q``
(``Q Q^T = I``):

- :func:`fold_norms`: ``Linear(RMSNorm_g(x)) = Linear'(RMSNorm_1(x))`` with ``W' = W diag(g)``
  (the norm's scale moves into every linear that reads it; the norm keeps a unit scale).
- :func:`rotate_residual`: the residual stream ``x -> x Q``. ``RMSNorm_1(x Q) = RMSNorm_1(x) Q``
  because ``||x Q|| = ||x||``, so readers take ``W <- W Q`` (they see ``x Q``: ``x Q Q^T W^T``),
  writers ``W <- Q^T W, b <- b Q`` (their output lands on the rotated stream), embeddings
  ``E <- E Q``.
- :func:`rotate_ov`: per head, ``W_v <- (I (x) H)^T W_v`` and ``W_o <- W_o (I (x) H)``: softmax
  mixes tokens, not channels, so ``P (V H) = (P V) H`` and ``H`` cancels inside ``W_o``.
- :func:`online_before`: ``Linear(x) = Linear'(x K)`` with ``W' = W K`` and ``x K`` emitted
  online (``K = A (x) B`` as two small MatMuls): ``x K K^T W^T = x W^T``.
  :func:`online_before_writers` applies it before the chosen stream writers (``down_proj``,
  optionally ``o_proj``).
- :func:`online_qk`: ``q -> q H, k -> k H`` after RoPE leaves ``q k^T`` unchanged.

Weight edits are queued in :class:`WeightEdits` and applied one linear at a time in float64
(memory holds one weight's working copies, never the model's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from rotaq.errors import RewriteError
from rotaq.linalg.hadamard import (
    Rotation,
    apply_kronecker,
    is_hadamard_size,
    kronecker_split,
    normalized_hadamard,
)
from rotaq.rewriter.analysis import Analysis, closure, const_root, consumers_of, first_linears
from rotaq.rewriter.sites import Kronecker

log = logging.getLogger(__name__)


class WeightEdits:
    """Edits of linear weights, each ``(w, b) -> (w, b)`` in float64, recorded per linear and
    applied by :meth:`flush` one linear at a time (setters write fresh tensors, so the order of
    reads does not matter)."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.ops: dict[str, list[Callable]] = {}

    def apply(self, key: str, fn: Callable) -> None:
        self.ops.setdefault(key, []).append(fn)

    def flush(self) -> None:
        for key, fns in self.ops.items():
            w, b = self.graph.get_linear(key)
            for fn in fns:
                w, b = fn(w, b)
            self.graph.set_linear(key, w, b)
        self.ops = {}


def dense_rotation(q: np.ndarray) -> Rotation:
    """A :class:`Rotation` from an orthogonal matrix (a learned rotation), checked in float64."""
    q = np.asarray(q, np.float64)
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"a rotation is a square matrix, got shape {q.shape}")
    err = float(np.abs(q @ q.T - np.eye(len(q))).max())
    if err > 1e-6:
        raise ValueError(f"the rotation is not orthogonal: max |Q Q^T - I| = {err:.3g}")
    return Rotation(None, (), q)


def right_rows(q: Rotation, w: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``w @ Q`` computed in place a block of rows at a time (rows are independent), so a large
    table (embedding, head) gets no temporaries of its own size."""
    if w.shape[0] <= chunk:
        return q.right(w)
    w = np.ascontiguousarray(w)
    for i in range(0, w.shape[0], chunk):
        w[i:i + chunk] = q.right(w[i:i + chunk])
    return w


def residual_rotatable(a: Analysis) -> bool:
    """The residual stream can carry a folded rotation: pre-norm, RMSNorms only, one stream,
    no grouped MoE experts (``rotate``'s residual mode, ``spin``)."""
    rms = all(a.norms[nk].kind == "rms" for b in a.residual.blocks for nk in b.norms)
    return a.pre_norm and rms and a.residual.streams == 1 and not a.experts


def norm_readers(g, a: Analysis) -> dict[str, list[str]]:
    """Each stream norm (block norms, final norm) -> the linears reading its output; refuses a
    norm whose output also feeds something other than linears (nothing to fold into)."""
    res = a.residual
    view = g.view()
    readers = {nk: first_linears(view, a.norms[nk].output) for b in res.blocks for nk in b.norms}
    if res.final_norm:
        readers[res.final_norm] = res.head
    for nk in readers:
        n = a.norms[nk]
        others = [c for c in consumers_of(a.view, closure(a.view, n.output)) if c.op != "linear"]
        if others:
            raise RewriteError(f"rotate: the output of norm '{n.name or nk}' is read by a "
                               f"'{others[0].op}' op, not only by linears; cannot fold it")
    return readers


def fold_norms(g, a: Analysis, readers: dict[str, list[str]], edits: WeightEdits) -> int:
    """``W <- W diag(g)`` for each norm's readers, the norm's scale set to 1; returns how many
    norms had a scale to fold."""
    view = g.view()
    gammas = {}
    for nk in readers:
        n = a.norms[nk]
        if n.scale is not None:
            node, idx = n.scale
            gamma = g.get_const(const_root(view, view.by_key[node].inputs[idx])).reshape(-1)
            gammas[nk] = gamma + n.scale_offset
    for nk, gamma in gammas.items():
        for r in readers[nk]:
            edits.apply(r, lambda wr, br, gamma=gamma: (np.multiply(wr, gamma[None, :], out=wr),
                                                        br))
        node, idx = a.norms[nk].scale
        g.set_const(node, idx, np.ones_like(gamma) - a.norms[nk].scale_offset)
    return len(gammas)


def stream_embeddings(a: Analysis) -> list[str]:
    """Embeddings whose outputs are summed into the stream start (token + position)."""
    first = a.residual.embedding
    keys = [first]
    for key, e in a.embeddings.items():
        if key != first and e.dim == a.embeddings[first].dim:
            keys.append(key)
    return keys


def rotate_residual(g, a: Analysis, q: Rotation, readers: dict[str, list[str]],
                    edits: WeightEdits) -> list[str]:
    """The residual stream ``x -> x Q``: embeddings ``E Q``, readers ``W Q``, writers
    ``Q^T W`` (bias ``b Q``). Returns the writers."""
    for key in stream_embeddings(a):
        g.set_embedding(key, right_rows(q, g.get_embedding(key)))
    for rs in readers.values():
        for r in rs:
            edits.apply(r, lambda wr, br: (right_rows(q, wr), br))
    writers = [wk for b in a.residual.blocks for wk in b.writers]
    for wk in writers:
        edits.apply(wk, lambda ww, bw: (q.left_t(ww), None if bw is None else q.right(bw)))
    return writers


def rotate_ov(a: Analysis, edits: WeightEdits,
              h: np.ndarray | Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Per-head ``W_v <- (I (x) H)^T W_v``, ``W_o <- W_o (I (x) H)`` at every attention whose V
    and O projections are separate linears (or one packed q|k|v projection feeding ORT's
    GroupQueryAttention). ``h``: the [head_dim, head_dim] rotation (default: the normalized
    Hadamard), or one per attention keyed by its o_proj linear (attentions left out are not
    rotated). Folds compose: a second call rotates by ``H H'``. Returns the o_proj keys of the
    attentions rotated."""
    done = []
    for site in a.attention:
        hd = site.head_dim
        if isinstance(h, Mapping):
            hh = h.get(site.o_proj or "")
        else:
            hh = normalized_hadamard(hd) if h is None and is_hadamard_size(hd) else h
        if hh is None or hh.shape != (hd, hd):
            continue
        if _rotate_packed_ov(edits, site, a, hh):
            done.append(site.o_proj)
            continue
        if site.v_proj and site.o_proj and site.v_proj not in (site.q_proj, site.k_proj):
            hv = np.kron(np.eye(a.linears[site.v_proj].out_features // hd), hh)
            ho = np.kron(np.eye(a.linears[site.o_proj].in_features // hd), hh)
            edits.apply(site.v_proj, lambda wv, bv, hv=hv: (
                hv.T @ wv, None if bv is None else bv @ hv))
            edits.apply(site.o_proj, lambda wo, bo, ho=ho: (wo @ ho, bo))
            done.append(site.o_proj)
    return done


def _rotate_packed_ov(edits: WeightEdits, site, a: Analysis, h: np.ndarray) -> bool:
    """V/O rotation through GroupQueryAttention fed one packed q|k|v projection: its rows are
    [q (heads x hd); k (kv x hd); v (kv x hd)], so the v rows take ``(I_kv (x) H)^T W_v`` and
    the o projection ``W_o (I_heads (x) H)``; each query head reads one KV group's V, so its
    output is rotated by the same H."""
    hd = site.head_dim
    if site.kind != "gqa" or not (site.q_proj and site.q_proj == site.k_proj == site.v_proj
                                  and site.o_proj):
        return False
    lo = (site.num_heads + site.num_kv_heads) * hd
    hi = lo + site.num_kv_heads * hd
    if a.linears[site.v_proj].out_features != hi:
        return False
    hv = np.kron(np.eye(site.num_kv_heads), h)

    def packed(wq: np.ndarray, bq: np.ndarray | None) -> tuple:
        wq = wq.copy()
        wq[lo:hi] = hv.T @ wq[lo:hi]
        if bq is not None:
            bq = bq.copy()
            bq[lo:hi] = bq[lo:hi] @ hv
        return wq, bq

    ho = np.kron(np.eye(a.linears[site.o_proj].in_features // hd), h)
    edits.apply(site.v_proj, packed)
    edits.apply(site.o_proj, lambda wo, bo: (wo @ ho, bo))
    return True


def online_before(g, a: Analysis, edits: WeightEdits, keys: list[str]) -> bool:
    """``x -> x K`` emitted once on the input all of ``keys`` read, ``W <- W K`` for each, with
    ``K = A (x) B`` the normalized Hadamard of the input size split in two factors. False (and
    nothing done) when the size has no Hadamard."""
    n = a.linears[keys[0]].in_features
    if not is_hadamard_size(n):
        return False
    fa, fb = kronecker_split(n)
    for key in keys:
        edits.apply(key, lambda wk, bk, fa=fa, fb=fb: (apply_kronecker(wk, fa, fb), bk))
    g.insert_transform(a.linears[keys[0]].input, keys, Kronecker((fa, fb)))
    return True


def online_before_writers(g, a: Analysis, edits: WeightEdits, writers: list[str], *,
                          mlp: bool = True, attention: bool = False) -> int:
    """:func:`online_before` for each stream writer chosen: the MLP's (``down_proj``) when
    ``mlp``, the attention's ``o_proj`` when ``attention`` (QuaRot's online Hadamard across
    heads, on top of the folded per-head one). Returns the count; a size with no Hadamard is
    skipped with a warning."""
    o_projs = {s.o_proj for s in a.attention}
    done = 0
    for wk in (w for w in writers if (attention if w in o_projs else mlp)):
        if online_before(g, a, edits, [wk]):
            done += 1
        else:
            lin = a.linears[wk]
            log.warning("no Hadamard of size %d: no online rotation before %s",
                        lin.in_features, lin.name or wk)
    return done


def online_qk(g, a: Analysis) -> int:
    """Per-head ``q -> q H``, ``k -> k H`` after the positional embedding; returns the
    attentions rotated."""
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


def cache_note(model, stats: dict) -> None:
    """On a KV-cache graph, record in ``stats["kv_cache"]`` what the cache now stores. Values
    rotated per head (``ov_heads_rotated``) or keys rotated online (``qk_rotated``, applied to
    the new keys before their Concat with the past) are the rewritten model's own state, so
    verification then compares the logits of a prefill plus decode steps fed that state, not
    the presents. A pass that calls :func:`rotate_ov` or :func:`online_qk` must call this."""
    from rotaq.decoder_io import is_cache_graph

    if not is_cache_graph(model.graph):
        return
    changed = [what for what, key in (("values", "ov_heads_rotated"), ("keys", "qk_rotated"))
               if stats.get(key)]
    stats["kv_cache"] = f"rotated {' and '.join(changed)}" if changed else "unchanged"


def refuse_fused_rope(a: Analysis) -> None:
    """Online Q/K rotation needs q and k per head after RoPE; GroupQueryAttention keeps that
    inside."""
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
