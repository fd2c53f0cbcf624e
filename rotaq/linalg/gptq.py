"""GPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's error
back into the columns not yet quantized so that ``||X W^T - X Wq^T||`` stays small.

With ``H = 2 X^T X / n`` (``[in, in]``) and ``U`` the upper Cholesky factor of ``H^-1``
(``H^-1 = U^T U``), column ``j`` is rounded to ``q_j`` and the rest is updated by
``W[:, k] -= (w_j - q_j) / U[j, j] * U[j, k]`` for ``k > j`` (lazily, in blocks).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from rotaq.linalg.formats import (
    QFormat,
    QuantizedWeight,
    decode,
    encode,
    group_params,
    nvfp4_global_scale,
)

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 5


def hessian_from_inputs(x: np.ndarray) -> np.ndarray:
    """``2 X^T X / n`` in float64 for inputs ``x [..., in]`` flattened to ``X [n, in]``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or x.size == 0:
        raise ValueError(f"need a non-empty input array [..., in], got shape {x.shape}")
    xm = x.reshape(-1, x.shape[-1])
    return 2.0 * (xm.T @ xm) / xm.shape[0]


class HessianAccumulator:
    """Streaming ``2 X^T X / n`` over calibration batches: ``add(x)`` then read ``value``."""

    def __init__(self, in_features: int | None = None) -> None:
        self.in_features = in_features
        self.n_samples = 0
        self._h: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        """Fold the tokens of ``x [..., in]`` into the running mean."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim < 1:
            raise ValueError("inputs must have a channel axis")
        xm = x.reshape(-1, x.shape[-1])
        if self.in_features is None:
            self.in_features = xm.shape[1]
        if xm.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input channels, got {xm.shape[1]}")
        m = xm.shape[0]
        if m == 0:
            return
        if self._h is None:
            self._h = np.zeros((self.in_features, self.in_features))
        total = self.n_samples + m
        self._h *= self.n_samples / total
        self._h += (2.0 / total) * (xm.T @ xm)
        self.n_samples = total

    @property
    def value(self) -> np.ndarray:
        """A copy of the current ``2 X^T X / n``; ValueError before any token was added."""
        if self._h is None:
            raise ValueError("HessianAccumulator has no samples yet")
        return self._h.copy()


def _inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``(H + d mean(diag H) I)^-1 = U^T U``; d grows x10 until H is PD.

    Computed in ``h``'s own memory (``h``, C-ordered, is overwritten): LAPACK potrf, potri,
    potrf on one triangle in place, so an [in, in] Hessian costs one array, not the five
    (identity, damped copy, factor, inverse, factor) of a plain cho_solve; the other triangle
    keeps H for a retry with a larger d."""
    n = h.shape[0]
    diag = np.diag(h).copy()
    mean_diag = float(np.mean(diag))
    idx = np.diag_indices(n)
    d = damp
    for attempt in range(_DAMP_RETRIES + 1):
        if attempt:
            _rows(h, lambda i, blk, src: np.copyto(blk, src, where=_upper_mask(blk, i, 1)))
        h[idx] = diag + d * mean_diag
        if not _inverse_upper_inplace(h):
            nxt = d * 10.0 if d > 0 else 0.01
            if attempt < _DAMP_RETRIES:
                logger.warning(
                    "GPTQ: Hessian not positive definite with damp=%g; retrying with damp=%g",
                    d,
                    nxt,
                )
            d = nxt
            continue
        _rows(h, lambda i, blk, src: np.copyto(blk, 0.0, where=~_upper_mask(blk, i, 0)))
        if not np.all(np.isfinite(h)):
            raise np.linalg.LinAlgError("GPTQ: non-finite inverse Cholesky factor")
        return h
    raise np.linalg.LinAlgError(
        f"GPTQ: Hessian not positive definite even with damp={d / 10:g} ({_DAMP_RETRIES} retries)"
    )


def _upper_mask(blk: np.ndarray, i: int, k: int) -> np.ndarray:
    """Where column - row >= k in rows ``i..`` of the full matrix (``blk`` = those rows)."""
    return np.arange(blk.shape[1])[None, :] - np.arange(i, i + blk.shape[0])[:, None] >= k


def _rows(a: np.ndarray, fn, step: int = 256) -> None:
    """``fn(i, a[i:i+step], a[:, i:i+step].T)`` over row blocks (no full-size temporaries)."""
    for i in range(0, a.shape[0], step):
        fn(i, a[i:i + step], a[:, i:i + step].T)


def _inverse_upper_inplace(a: np.ndarray) -> bool:
    """The upper triangle of ``a`` (C order; its upper triangle and diagonal hold a symmetric
    PD matrix M) <- upper ``U`` with ``M^-1 = U^T U``, in place; the strict lower triangle is
    left as it was. False when M is not positive definite."""
    from scipy.linalg import lapack

    f = a.T  # the same memory in Fortran order: its lower triangle is a's upper one
    c, info = lapack.dpotrf(f, lower=1, overwrite_a=1, clean=0)  # M = L L^T
    if info != 0:
        return False
    c, info = lapack.dpotri(c, lower=1, overwrite_c=1)  # lower triangle of M^-1
    if info != 0:
        return False
    c, info = lapack.dpotrf(c, lower=1, overwrite_a=1, clean=0)  # M^-1 = L2 L2^T, U = L2^T
    return info == 0 and np.shares_memory(c, a)
def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    fmt: QFormat,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    static_groups: bool = True,
) -> QuantizedWeight:
    """GPTQ-quantize ``w [out, in]`` with Hessian ``H [in, in]``; codes/scales in column order.

    ``H += damp * mean(diag H) I``; inputs with ``diag H == 0`` are dead: their weight column is
    zeroed and their diagonal set to 1. ``act_order`` visits columns by descending ``diag H``.
    Group scales are static (from the original weight, before any update) when
    ``static_groups`` or per-channel; otherwise (needs ``act_order=False``) each group's scale
    is taken from the updated weight when its first column is reached. Either way groups are
    contiguous in the original column order, so ``dequantize()`` is a plain group-wise dequant.
    """
    wk = np.array(w, dtype=np.float64, copy=True)
    if wk.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {wk.shape}")
    out, n = wk.shape
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.shape != (n, n):
        raise ValueError(f"hessian must be [{n}, {n}] for a weight {wk.shape}, got {h.shape}")
    if not (np.all(np.isfinite(h)) and np.all(np.isfinite(wk))):
        raise ValueError("weight and hessian must be finite")
    if damp < 0 or block_size < 1:
        raise ValueError(f"need damp >= 0 and block_size >= 1, got {damp}, {block_size}")
    gs = fmt.resolve_group_size(n)
    dynamic = gs < n and not static_groups
    if dynamic and act_order:
        raise ValueError(
            "act_order with group_size < in_features needs static_groups=True "
            "(permuted dynamic groups are not a plain group-wise layout)"
        )
    t0 = time.perf_counter()

    dead = np.diag(h) <= 0.0
    if dead.any():
        logger.debug("GPTQ: %d of %d inputs are dead (diag H == 0)", int(dead.sum()), n)
        h[dead, dead] = 1.0
        wk[:, dead] = 0.0
    gscale = nvfp4_global_scale(wk) if fmt.kind == "nvfp4" else None
    scale, zero = group_params(wk.reshape(out, n // gs, gs), fmt, gscale)

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    wk = wk[:, perm]
    if act_order:
        h = h[np.ix_(perm, perm)]  # the copy is freed by the reassignment
    u = _inverse_cholesky_upper(h, damp)  # in h's memory
    del h

    codes = np.empty((out, n), dtype=np.int32 if fmt.kind == "int" else np.float64)
    loss = 0.0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = wk[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = perm[col] // gs
            if dynamic and perm[col] % gs == 0:
                # Current values of the whole group: earlier blocks are folded into wk, this
                # block's errors so far are not yet.
                cur = wk[:, col : col + gs] - err1[:, :i] @ u[i1:col, col : col + gs]
                sg, zg = group_params(cur, fmt, gscale)
                scale[:, g] = sg
                if zero is not None:
                    zero[:, g] = zg
            zg = None if zero is None else zero[:, g]
            c = encode(w1[:, i], scale[:, g], zg, fmt)
            e = (w1[:, i] - decode(c, scale[:, g], zg)) / u1[i, i]
            codes[:, col] = c
            loss += 0.5 * float(e @ e)
            w1[:, i + 1 :] -= np.outer(e, u1[i, i + 1 :])
            err1[:, i] = e
        wk[:, i2:] -= err1 @ u[i1:i2, i2:]

    codes_orig = np.empty_like(codes)
    codes_orig[:, perm] = codes
    logger.debug(
        "GPTQ %dx%d %s%d g%d: proxy loss %.4g in %.2fs",
        out,
        n,
        fmt.kind,
        fmt.bits,
        gs,
        loss,
        time.perf_counter() - t0,
    )
    return QuantizedWeight(codes_orig, scale, zero, fmt, gscale)
