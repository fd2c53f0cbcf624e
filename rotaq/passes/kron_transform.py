"""Learned Kronecker transforms around linear groups (FlatQuant style), ahead of quantization.

For each group of linears reading one value ``x`` (q/k/v, gate/up, o, down), with ``n = a b``
split near-square (576 = 24 x 24, 1536 = 32 x 48):

    Linear_{W_j}(x) -> Linear_{W_j P^{-T}}(x P),   P = diag(d) (P1 (x) P2)

exact in float; ``x P`` is emitted online as Mul + Reshape + two small MatMuls + Reshape and
``P^{-T}`` is folded into the weights in float64. P is calibrated group by group on captured
inputs to minimise the group's output error under the weight/activation quantizers that the
following ``quantize`` pass will apply (its settings are repeated here: ``w_bits``, ``w_group``,
``w_symmetric``, ``a_bits``, ``a_clip``). Math in :mod:`rotaq.linalg.flatquant`.
Run it after ``rotate`` (P starts at the identity, i.e. at the Hadamard-only model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from rotaq.errors import RewriteError
from rotaq.linalg.flatquant import calibrate_kron
from rotaq.linalg.kron import near_square_split
from rotaq.linalg.threads import single_threaded
from rotaq.model import Model
from rotaq.passes.base import Pass, PassResult
from rotaq.passes.calib import capture_rows, counts, feeds_for
from rotaq.passes.options import Calibrated, Selected
from rotaq.rewriter.sites import Kronecker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KronTransform(Pass, Selected, Calibrated):
    """Calibrated P1 (x) P2 (+ per-channel scale) transforms before quantized linears."""

    name: ClassVar[str] = "kron-transform"
    exact: ClassVar[bool] = True  # exact in float; it only pays off once quantized
    w_bits: int = 4
    w_group: int = -1
    w_symmetric: bool = True
    a_bits: int = 4
    a_clip: float = 1.0
    smooth: bool = True  # learn the per-channel scale d too
    iters: int = 50
    lr: float = 1e-2
    calib_tokens: int = 256  # fewer than the default: the fit is per group, on a few windows
    seed: int = 0

    def validate(self) -> None:
        if self.w_bits not in (0, 2, 3, 4, 8) or self.a_bits not in (0, 2, 3, 4, 8):
            raise RewriteError("kron-transform: w_bits / a_bits must be 0 (off), 2, 3, 4 or 8")
        if self.iters < 0 or self.lr <= 0:
            raise RewriteError("kron-transform: iters must be >= 0 and lr > 0")

    def requires(self) -> tuple[str, ...]:
        return ("linears", "before:quantize")

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        keys = self.selected(a)
        g = model.graph
        view = g.view()
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(view.by_key[k].inputs[0], []).append(k)
        feeds = feeds_for(model, self.calib_text, self.calib_tokens, self.calib_window)
        xs = self._capture(model, list(groups), feeds)
        done, skipped, gains = 0, 0, []
        for value, members in tqdm(groups.items(), desc="kron-transform", unit="group",
                                   leave=False, disable=len(groups) < 4):
            n = a.linears[members[0]].in_features
            split = near_square_split(n)
            if split[0] == 1:
                log.info("kron-transform: input size %d has no Kronecker split; skipped", n)
                skipped += 1
                continue
            weights = [g.get_linear(k) for k in members]
            with single_threaded():
                t = calibrate_kron(xs[value], [w for w, _ in weights], split,
                                   w_bits=self.w_bits, w_group=self.w_group,
                                   w_symmetric=self.w_symmetric, a_bits=self.a_bits,
                                   a_clip=self.a_clip, smooth=self.smooth, iters=self.iters,
                                   lr=self.lr, seed=self.seed)
            if not t.loss_final < t.loss_init:
                skipped += 1
                continue
            for k, (w, b) in zip(members, weights):
                g.set_linear(k, t.fold(w), b)
            g.insert_transform(value, members, Kronecker((t.p1, t.p2), t.scale))
            gains.append(t.loss_init / max(t.loss_final, 1e-300))
            done += 1
        stats = {"groups": len(groups), "transformed": done, "skipped": skipped,
                 **counts(feeds, max((x.shape[0] for x in xs.values()), default=0)),
                 "loss_ratio_mean": float(np.mean(gains)) if gains else 1.0,
                 "loss_ratio_min": float(np.min(gains)) if gains else 1.0}
        return PassResult(model, done > 0, stats)

    @staticmethod
    def _capture(model: Model, values: list[str], feeds) -> dict[str, np.ndarray]:
        """Inputs of every group on the float model (transforms are exact, so one capture
        serves every layer), as float32 [tokens, n], in one block-wise pass."""
        return capture_rows(model, values, feeds, batch=2, desc="kron-transform calibration")
