"""Low-rank pass: ``Linear_W(x) -> Linear_a(Linear_b(x))`` with ``W ~ a b`` (a [m, r], b [r, n]).

Methods (math in :mod:`rotaq.linalg.lowrank`):

- ``svd``: truncated SVD of W (best in ||W - a b||_F);
- ``asvd``: activation-aware, SVD of ``W diag(s)`` with ``s = mean|x|^alpha`` per input channel,
  mapped back by ``diag(s)^-1``;
- ``whiten``: SVD-LLM style, SVD of ``W S`` with ``S S^T = X^T X`` (Cholesky of the calibration
  Gram matrix, damped or eigen-clamped when it is not positive definite), mapped back by
  ``S^-1``: the rank-r result minimizes the calibration output error ||(W - a b) X^T||_F.

Ranks: ``rank`` (fixed), ``rank_by="ratio"`` (every layer keeps ``1 - ratio`` of its
parameters), ``"energy"`` (smallest rank keeping ``energy`` of the spectrum's energy) or
``"budget"`` (a global parameter budget of ``1 - ratio`` of the selected linears' parameters,
allocated across layers by their measured error at each rank). A layer where the rank would not
save parameters is left dense. The replacement is a chain of two MatMuls (``x b^T a^T + bias``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from tqdm import tqdm

from rotaq.errors import RewriteError
from rotaq.linalg import lowrank as lr
from rotaq.linalg.threads import single_threaded
from rotaq.model import Model
from rotaq.passes.base import Pass, PassResult
from rotaq.passes.calib import counts, feeds_for, input_stats, linear_inputs
from rotaq.passes.options import Calibrated, Selected
from rotaq.rewriter.chain import lowrank_chain

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LowRank(Pass, Selected, Calibrated):
    """Replace linears by two thinner ones (truncated, activation-aware or whitened SVD)."""

    name: ClassVar[str] = "lowrank"
    exact: ClassVar[bool] = False
    method: Literal["svd", "asvd", "whiten"] = "whiten"
    rank_by: Literal["ratio", "energy", "budget"] = "budget"
    ratio: float = 0.2  # fraction of the selected linears' parameters to remove
    energy: float = 0.99  # rank_by=energy: spectrum energy kept
    rank: int = 0  # >0: this rank for every layer (overrides rank_by)
    unset_options: ClassVar[dict[str, str]] = {"rank": "ranks then come from rank_by"}
    step: int = 8  # budget ranks are multiples of this
    alpha: float = 0.5  # asvd exponent
    force: bool = False  # replace even where the rank saves nothing (checks, experiments)

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise RewriteError(f"lowrank: ratio must be in (0, 1), got {self.ratio}")
        if not 0.0 < self.energy <= 1.0:
            raise RewriteError(f"lowrank: energy must be in (0, 1], got {self.energy}")
        if self.rank < 0 or self.step < 1:
            raise RewriteError("lowrank: rank must be >= 0 and step >= 1")

    def requires(self) -> tuple[str, ...]:
        return ("linears", "before:quantize")

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        keys = self.selected(a)
        g = model.graph
        inputs = linear_inputs(model, keys)
        stats, calib = {}, {}
        if self.method != "svd":
            feeds = feeds_for(model, self.calib_text, self.calib_tokens, self.calib_window)
            stats = input_stats(model, list(inputs.values()), feeds,
                                gram=self.method == "whiten", desc="lowrank calibration")
            calib = counts(feeds, max((s.count for s in stats.values()), default=0))
        weights = {k: g.get_linear(k) for k in keys}

        def transform_args(k: str) -> dict:
            st = stats.get(inputs[k])
            if st is None:
                return {}
            return {"gram": st.gram if self.method == "whiten" else None,
                    "abs_mean": st.abs_mean if self.method == "asvd" else None,
                    "alpha": self.alpha}

        with single_threaded():
            spectra = {k: lr.spectrum(weights[k][0], self.method, **transform_args(k))
                       for k in tqdm(keys, desc="lowrank spectra", leave=False,
                                     disable=len(keys) < 8)}
        ranks = self._ranks(keys, weights, spectra)
        dense = sum(w.size for w, _ in weights.values())
        after, errors, replaced = 0, [], 0
        for k in tqdm(keys, desc=f"lowrank ({self.method})", unit="linear", leave=False,
                      disable=len(keys) < 8):
            w, bias = weights[k]
            r = ranks[k]
            if r is None:
                after += w.size
                continue
            with single_threaded():
                fa, fb = lr.lowrank_factors(w, r, self.method, **transform_args(k))
            g.replace_linear(k, lowrank_chain(fa, fb, bias))
            sv = spectra[k]
            errors.append(float(np.sum(sv[r:] ** 2) / max(np.sum(sv ** 2), 1e-300)))
            after += fa.size + fb.size
            replaced += 1
        if not replaced:
            log.warning("lowrank: no layer would save parameters at these settings")
        chosen = [r for r in ranks.values() if r is not None]
        out = {"method": self.method, "rank_by": "fixed" if self.rank else self.rank_by,
               "linears": len(keys), "replaced": replaced, "kept_dense": len(keys) - replaced,
               "params_before": int(dense), "params_after": int(after),
               "params_removed_ratio": round(1.0 - after / dense, 4),
               "rank_min": min(chosen, default=0), "rank_max": max(chosen, default=0),
               "rel_error_mean": float(np.mean(errors)) if errors else 0.0,
               **calib, "ranks": {a.linears[k].name or k: ranks[k] for k in keys}}
        return PassResult(model, replaced > 0, out)

    def _ranks(self, keys: list[str], weights: dict, spectra: dict) -> dict[str, int | None]:
        def useful(k: str, r: int | None) -> int | None:
            m, n = weights[k][0].shape
            cap = min(m, n) if self.force else lr.max_useful_rank(m, n)
            return r if r is not None and 1 <= r <= cap else None

        if self.rank:
            return {k: useful(k, min(self.rank, *weights[k][0].shape)) for k in keys}
        if self.rank_by == "ratio":
            return {k: lr.rank_for_ratio(*weights[k][0].shape, 1.0 - self.ratio) for k in keys}
        if self.rank_by == "energy":
            return {k: useful(k, lr.rank_for_energy(spectra[k], self.energy)) for k in keys}
        layers = [(*weights[k][0].shape, spectra[k]) for k in keys]
        budget = int((1.0 - self.ratio) * sum(w.size for w, _ in weights.values()))
        try:
            alloc = lr.allocate_ranks(layers, budget, step=self.step)
        except ValueError as err:
            raise RewriteError(f"lowrank: {err}") from err
        return dict(zip(keys, alloc))
