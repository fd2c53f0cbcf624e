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

from rotaq.errors import RewriteError
from rotaq.linalg.hadamard import random_rotation
from rotaq.model import Model
from rotaq.passes import folds
from rotaq.passes.base import Pass, PassResult
from rotaq.rewriter.analysis import Analysis

log = logging.getLogger(__name__)


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
    online_o: bool = False  # residual mode: also an online Hadamard before each o_proj
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
            mode = "residual" if folds.residual_rotatable(a) else "online"
            reason = _online_reason(a) if mode == "online" else ""
        if mode == "residual":
            stats = self._residual(model, a)
        else:
            stats = self._online(model, a)
        stats["mode"] = mode
        stats["structure"] = a.residual.structure
        if reason:
            stats["mode_reason"] = reason
        folds.cache_note(model, stats)
        # online mode may find no linear of a Hadamard size: the base class then reports
        # modified=False (the graph was not edited)
        return PassResult(model, True, stats)

    # ---- residual-stream rotation ---------------------------------------------------------
    def _residual(self, model: Model, a: Analysis) -> dict:
        g = model.graph
        res = a.residual
        if self.rotate_qk:
            folds.refuse_fused_rope(a)
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
        edits = folds.WeightEdits(g)
        readers = folds.norm_readers(g, a)
        folded = folds.fold_norms(g, a, readers, edits)
        writers = folds.rotate_residual(g, a, random_rotation(d, self.seed), readers, edits)
        ov = folds.rotate_ov(a, edits) if self.rotate_ov else []
        online = folds.online_before_writers(g, a, edits, writers, mlp=self.online_down,
                                             attention=self.online_o)
        edits.flush()
        qk = folds.online_qk(g, a) if self.rotate_qk else 0
        return {"dim": d, "norms_folded": folded, "writers": len(writers),
                "readers": sum(len(r) for r in readers.values()), "ov_heads_rotated": len(ov),
                "online_hadamards": online, "qk_rotated": qk}

    # ---- per-linear online rotation ---------------------------------------------------------
    def _online(self, model: Model, a: Analysis) -> dict:
        g = model.graph
        if self.rotate_qk:
            folds.refuse_fused_rope(a)
        head = set(a.residual.head)
        groups: dict[str, list[str]] = {}
        for key, lin in a.linears.items():
            if key in head and not self.online_head:
                continue
            groups.setdefault(lin.input, []).append(key)
        edits = folds.WeightEdits(g)
        done = skipped = inserted = 0
        for keys in groups.values():
            if not folds.online_before(g, a, edits, keys):
                log.warning("no Hadamard of size %d: %s left unrotated",
                            a.linears[keys[0]].in_features, keys)
                skipped += len(keys)
                continue
            done += len(keys)
            inserted += 1
        edits.flush()
        qk = folds.online_qk(g, a) if self.rotate_qk else 0
        return {"linears_rotated": done, "online_hadamards": inserted,
                "skipped": skipped, "qk_rotated": qk}
