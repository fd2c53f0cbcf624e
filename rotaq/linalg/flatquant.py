"""Learned Kronecker-factored transforms around a quantized linear group (FlatQuant style).

For linears ``y_j = x W_j^T`` sharing an input ``x [T, n]``, ``n = a b``, pick an invertible
``P = diag(d) (P1 (x) P2)`` (P1 [a, a], P2 [b, b], d > 0 per channel) and rewrite

    x -> x~ = x P (online),   W_j -> W~_j = W_j P^{-T} = W_j diag(d)^{-1} (P1^{-T} (x) P2^{-T})

which is exact in float: ``x~ W~_j^T = x P P^{-1} W_j^T``. P is calibrated to minimise the
quantized group's relative output error

    L(P) = mean_j ||Q_a(x P) Q_w(W_j P^{-T})^T - x W_j^T||_F^2 / ||x W_j^T||_F^2

with straight-through rounding (Adam on P1, P2 and log d; the best iterate is kept), starting
from the identity, so the result is never worse than the input model on the calibration data.
``Q_w``: round-to-nearest int, per output channel or groups along the input (a ragged last group
is zero-padded, as the quantize pass does); ``Q_a``: per-token symmetric int with a clip ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KronTransform:
    p1: np.ndarray
    p2: np.ndarray
    scale: np.ndarray | None  # d, or None when not learned
    loss_init: float
    loss_final: float

    def dense(self) -> np.ndarray:
        p = np.kron(self.p1, self.p2)
        return p if self.scale is None else self.scale[:, None] * p

    def fold(self, w: np.ndarray) -> np.ndarray:
        """``W P^{-T}`` (float64), through the factors' inverses."""
        inv1, inv2 = np.linalg.inv(self.p1), np.linalg.inv(self.p2)
        a, b = self.p1.shape[0], self.p2.shape[0]
        m = w.shape[0]
        wk = w.reshape(m, a, b)
        if self.scale is not None:
            wk = wk / self.scale.reshape(1, a, b)
        # W K^{-T}: row w (as [a, b]) -> inv1 @ w @ inv2^T ... transposed appropriately:
        # (w K^{-T})[i] = vec(P1^{-1} W_i P2^{-T}) for K = P1 (x) P2 with row-major vec
        out = np.einsum("ik,mkl,jl->mij", inv1, wk, inv2)
        return out.reshape(m, a * b)


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest per output channel (``group <= 0``) or per input group, STE."""
    m, n = w.shape
    g = n if group <= 0 else group
    pad = (-n) % g
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    wg = wp.reshape(m, -1, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = wg.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        q = torch.clamp(torch.round(wg / s), -qmax - 1, qmax) * s
    else:
        qmax = 2 ** bits - 1
        lo = wg.amin(-1, keepdim=True).clamp_max(0)
        hi = wg.amax(-1, keepdim=True).clamp_min(0)
        s = (hi - lo).clamp_min(1e-12) / qmax
        z = torch.round(-lo / s)
        q = (torch.clamp(torch.round(wg / s) + z, 0, qmax) - z) * s
    return _ste(wg, q).reshape(m, -1)[:, :n]


def fake_quant_tokens(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Symmetric per-token (row) quantization with a clip ratio, STE."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) * clip).clamp_min(1e-12) / qmax
    return _ste(x, torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s)


def calibrate_kron(x: np.ndarray, weights: list[np.ndarray], split: tuple[int, int], *,
                   w_bits: int = 4, w_group: int = -1, w_symmetric: bool = True,
                   a_bits: int = 4, a_clip: float = 1.0, smooth: bool = True, iters: int = 50,
                   lr: float = 1e-2, seed: int = 0) -> KronTransform:
    """Learn ``P = diag(d) (P1 (x) P2)`` for the group (see the module doc)."""
    a, b = split
    n = x.shape[-1]
    if a * b != n:
        raise ValueError(f"split {a} x {b} does not give the input size {n}")
    if any(w.shape[1] != n for w in weights):
        raise ValueError("every weight of a group must read the same input size")
    torch.manual_seed(seed)
    dt = torch.float32  # the search runs in float32 (speed); the fold is float64 (``fold``)
    xt = torch.as_tensor(np.asarray(x).reshape(-1, n), dtype=dt)
    ws = [torch.as_tensor(w, dtype=dt) for w in weights]
    refs = [xt @ w.T for w in ws]
    norms = [float((r * r).sum()) or 1.0 for r in refs]
    p1 = torch.eye(a, dtype=dt, requires_grad=True)
    p2 = torch.eye(b, dtype=dt, requires_grad=True)
    logd = torch.zeros(n, dtype=dt, requires_grad=smooth)
    params = [p1, p2] + ([logd] if smooth else [])
    opt = torch.optim.Adam(params, lr=lr)

    def loss_fn() -> torch.Tensor:
        d = torch.exp(logd)
        xk = ((xt * d).reshape(-1, a, b))
        xk = (p1.T @ xk @ p2).reshape(-1, n)  # x diag(d) (P1 (x) P2), row-major vec
        xq = fake_quant_tokens(xk, a_bits, a_clip) if a_bits else xk
        inv1, inv2 = torch.linalg.inv(p1), torch.linalg.inv(p2)
        total = torch.zeros((), dtype=dt)
        for w, ref, nrm in zip(ws, refs, norms):
            wk = (w / d).reshape(-1, a, b)
            wk = (inv1 @ wk @ inv2.T).reshape(-1, n)  # W diag(d)^-1 (P1^-T (x) P2^-T)
            wq = fake_quant_weight(wk, w_bits, w_group, w_symmetric) if w_bits else wk
            err = xq @ wq.T - ref
            total = total + (err * err).sum() / nrm
        return total / len(ws)

    best = None
    init = None
    for _ in range(max(iters, 0) + 1):
        opt.zero_grad()
        loss = loss_fn()
        value = float(loss.detach())
        if init is None:
            init = value
        if not np.isfinite(value):
            break
        if best is None or value < best[0]:
            best = (value, p1.detach().clone(), p2.detach().clone(), logd.detach().clone())
        loss.backward()
        opt.step()
    value, b1, b2, bd = best
    d = torch.exp(bd).double().numpy() if smooth else None
    return KronTransform(b1.double().numpy(), b2.double().numpy(), d, float(init), float(value))
