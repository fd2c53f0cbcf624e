"""Structured weight approximations: ``Linear_W(x) -> chain(x)`` with W replaced by

- ``kind="kron"``: a sum of r Kronecker products ``W ~ sum_s A_s (x) B_s`` (Van Loan - Pitsianis:
  rearrange W so each Kronecker product becomes a rank-1 matrix, truncate its SVD), emitted as
  Reshape + MatMul + (Transpose + batched MatMul + ReduceSum) + Reshape;
- ``kind="monarch"``: a Monarch matrix, the product of two block-diagonal factors with a
  permutation between them (block-wise rank-r projection, Frobenius-optimal), emitted as two
  batched GEMMs.

Factor sizes are near-square (576 = 24 x 24, 1536 = 32 x 48). The rank is the largest whose
parameter count is at most ``keep`` of the dense layer's (or ``rank`` if given). Math in
:mod:`rotaq.linalg.kron`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from tqdm import tqdm

from rotaq.errors import RewriteError
from rotaq.linalg import kron as kr
from rotaq.linalg.threads import single_threaded
from rotaq.model import Model
from rotaq.passes.base import Pass, PassResult
from rotaq.passes.options import Selected
from rotaq.rewriter.chain import kron_chain, monarch_chain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Structured(Pass, Selected):
    """Approximate linears by Kronecker sums or Monarch matrices."""

    name: ClassVar[str] = "structured"
    exact: ClassVar[bool] = False
    kind: Literal["kron", "monarch"] = "monarch"
    keep: float = 0.5  # parameter fraction kept per layer
    rank: int = 0  # >0: fixed rank (Kronecker terms / Monarch block rank), capped at full
    unset_options: ClassVar[dict[str, str]] = {"rank": "the rank then comes from keep"}

    def validate(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise RewriteError(f"structured: keep must be in (0, 1], got {self.keep}")
        if self.rank < 0:
            raise RewriteError("structured: rank must be >= 0")

    def requires(self) -> tuple[str, ...]:
        return ("linears", "before:quantize")

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        keys = self.selected(a)
        g = model.graph
        before = after = 0
        errors, ranks, replaced = [], {}, 0
        for k in tqdm(keys, desc=f"structured ({self.kind})", unit="linear", leave=False,
                      disable=len(keys) < 8):
            w, bias = g.get_linear(k)
            m, n = w.shape
            before += w.size
            ms, ns = kr.near_square_split(m), kr.near_square_split(n)
            if 1 in ms or 1 in ns:  # a prime size has no useful split
                log.info("structured: %s (%dx%d) has no factor split; left dense", k, m, n)
                after += w.size
                continue
            full = min(ms[0] * ns[0], ms[1] * ns[1]) if self.kind == "kron" else min(ms[0], ns[1])
            r = min(self.rank, full) if self.rank else kr.rank_for_params(
                self.kind, ms, ns, int(self.keep * m * n))
            with single_threaded():
                if self.kind == "kron":
                    fa, fb = kr.nearest_kronecker(w, ms, ns, rank=r)
                    approx, chain = kr.kron_sum_dense(fa, fb), kron_chain(fa, fb, bias)
                    cost = kr.kron_params(fa, fb)
                else:
                    fl, fr = kr.monarch_project(w, ms, ns, rank=r)
                    approx, chain = kr.monarch_dense(fl, fr), monarch_chain(fl, fr, bias)
                    cost = kr.monarch_params(fl, fr)
            if cost >= w.size and not self.rank:  # an explicit rank is kept even if larger
                after += w.size
                continue
            g.replace_linear(k, chain)
            errors.append(float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-300)))
            ranks[a.linears[k].name or k] = r
            after += cost
            replaced += 1
        stats = {"kind": self.kind, "linears": len(keys), "replaced": replaced,
                 "params_before": int(before), "params_after": int(after),
                 "params_removed_ratio": round(1.0 - after / before, 4),
                 "weight_rel_error_mean": float(np.mean(errors)) if errors else 0.0,
                 "ranks": ranks}
        return PassResult(model, replaced > 0, stats)
