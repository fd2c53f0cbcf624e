"""Low-rank factorizations of a linear's weight: plain, activation-aware and whitened SVD, rank
selection (ratio, energy, global budget), LQ-LoRA style low-rank + quantized, EoRA compensation.

A linear computes ``y = x W^T`` with ``W [m, n]`` (out, in); calibration inputs are ``X [t, n]``
with Gram matrix ``G = X^T X``. A factorization is ``W ~ a @ b`` with ``a [m, r]``,
``b [r, n]``. Every method solves the low-rank problem on ``W T`` for an input transform ``T``
and maps back: ``W ~ (U_r S_r V_r^T) T^-1``, ``a = U_r sqrt(S_r)``,
``b = sqrt(S_r) V_r^T T^-1``. Methods: ``svd`` (``T = I``), ``asvd`` (``T = diag(s)``,
``s = mean|x|^alpha``), ``whiten`` (``T = S`` with ``S S^T = G``, so that
``||(W - W') X^T||_F = ||(W - W') S||_F``). All arithmetic is float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("svd", "asvd", "whiten")
_MAX_DAMP = 1e-1


def _matrix(w: np.ndarray, name: str = "weight") -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [out, in], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} has non-finite entries")
    return w


def _check_rank(rank: int, m: int, n: int) -> int:
    if int(rank) != rank or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an integer in [1, min(m, n) = {min(m, n)}], got {rank}")
    return int(rank)


def _split(u: np.ndarray, sv: np.ndarray, vt: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    root = np.sqrt(sv[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def truncated_svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``W ~ a @ b`` with ``a = U_r sqrt(S_r)``, ``b = sqrt(S_r) V_r^T`` (Eckart-Young optimal)."""
    w = _matrix(w)
    r = _check_rank(rank, *w.shape)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    return _split(u, sv, vt, r)


# ---------------------------------------------------------------- input transforms


def act_scales(x_abs_mean: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """ASVD channel scales ``s = mean|x|^alpha`` normalized to geometric mean 1.

    NaN and non-positive means are replaced by the smallest positive finite mean (+inf by the
    largest); with no positive finite mean at all every scale is 1.
    """
    v = np.array(x_abs_mean, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("x_abs_mean is empty")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    good = np.isfinite(v) & (v > 0)
    if not np.any(good):
        return np.ones_like(v)
    v[np.isposinf(v)] = v[good].max()
    v[~(np.isfinite(v) & (v > 0))] = v[good].min()
    log_s = alpha * np.log(v)
    return np.exp(log_s - log_s.mean())


@dataclass(frozen=True)
class Whitening:
    """``s @ s.T == G + damping * mean(diag G) * I`` (``method`` "cholesky"), or the clamped
    eigen-form ``Q max(L, floor)^(1/2)`` ("eigen"), or ``I`` for an all-zero G ("identity")."""

    s: np.ndarray
    s_inv: np.ndarray
    damping: float
    method: str


def _check_gram(gram: np.ndarray, n: int | None = None) -> np.ndarray:
    g = _matrix(gram, "gram")
    if g.shape[0] != g.shape[1] or (n is not None and g.shape[0] != n):
        want = f"[{n}, {n}]" if n is not None else "square"
        raise ValueError(f"gram must be {want}, got shape {g.shape}")
    return 0.5 * (g + g.T)


def whiten(gram: np.ndarray, damp: float = 1e-6) -> Whitening:
    """Whitening factor of ``G`` with the way it was obtained (see ``whitening``)."""
    g = _check_gram(gram)
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be finite and >= 0, got {damp}")
    n = g.shape[0]
    eye = np.eye(n)
    if not np.any(g):
        return Whitening(eye, eye.copy(), 0.0, "identity")
    diag_mean = float(np.mean(np.diag(g)))
    scale = diag_mean if diag_mean > 0 else float(np.abs(g).max())
    floor = max(damp, 1e-12) * scale
    tries = [0.0]
    d = damp
    while 0 < d < _MAX_DAMP:
        tries.append(d)
        d *= 10.0
    tries.append(max(damp, _MAX_DAMP))
    for d in tries:
        try:
            low = np.linalg.cholesky(g + (d * scale) * eye)
        except np.linalg.LinAlgError:
            continue
        piv = np.diag(low)
        # Undamped: refuse near-zero pivots (a numerically singular G would blow up S^-1).
        if np.all(np.isfinite(low)) and (d > 0 or float(piv.min()) ** 2 >= floor):
            if d > 0:
                logger.debug("whitening: Cholesky needed damping %g * mean(diag G)", d)
            return Whitening(low, np.linalg.solve(low, eye), d, "cholesky")
    lam, q = np.linalg.eigh(g)
    logger.info(
        "whitening: G indefinite (min eigenvalue %.3g * mean diag); clamping eigenvalues",
        lam.min() / scale,
    )
    root = np.sqrt(np.maximum(lam, floor))
    return Whitening(q * root, q.T / root[:, None], damp, "eigen")


def whitening(gram: np.ndarray, damp: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``(S, S^-1)`` with ``S S^T ~ G``, robust to a G that is not positive definite.

    1. Plain Cholesky ``G = S S^T`` (lower S), accepted when every pivot satisfies
       ``S_ii^2 >= damp * mean(diag G)``; 2. Cholesky of ``G + d mean(diag G) I`` for
       ``d = damp, 10 damp, ...`` up to 1e-1; 3. ``G = Q L Q^T`` with eigenvalues clamped to
       ``max(damp, 1e-12) * mean(diag G)``: ``S = Q L^(1/2)``, ``S^-1 = L^(-1/2) Q^T``. ``S^-1`` of the
       Cholesky factor is a solve against its (well-conditioned by step 1/2) triangle. An all-zero
       G gives ``(I, I)``. ``whiten`` also reports the damping and the path taken.
    """
    wh = whiten(gram, damp)
    return wh.s, wh.s_inv


def transform_for(
    method: str,
    n: int,
    gram: np.ndarray | None = None,
    abs_mean: np.ndarray | None = None,
    alpha: float = 0.5,
    damp: float = 1e-6,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Input transform ``(T, T^-1)`` of a method: "svd" -> ``(None, None)`` (identity, not built),
    "asvd" -> ``diag(act_scales(abs_mean, alpha))`` and its inverse, "whiten" -> ``whitening``."""
    kind, t, t_inv = _transform(method, n, gram, abs_mean, alpha, damp)
    if kind == "diag":
        return np.diag(t), np.diag(t_inv)
    return t, t_inv


def _transform(
    method: str,
    n: int,
    gram: np.ndarray | None,
    abs_mean: np.ndarray | None,
    alpha: float,
    damp: float,
) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """``(kind, T, T^-1)``; kind "none", "diag" (T given as a vector) or "dense"."""
    if method == "svd":
        return "none", None, None
    if method == "asvd":
        if abs_mean is None:
            raise ValueError("method 'asvd' needs abs_mean (per-input-channel mean |x|)")
        s = act_scales(abs_mean, alpha)
        if s.shape != (n,):
            raise ValueError(f"abs_mean must have {n} entries, got {s.shape[0]}")
        return "diag", s, 1.0 / s
    if method == "whiten":
        if gram is None:
            raise ValueError("method 'whiten' needs gram (X^T X of the layer inputs)")
        wh = whiten(_check_gram(gram, n), damp)
        return "dense", wh.s, wh.s_inv
    raise ValueError(f"unknown low-rank method {method!r}; expected one of {METHODS}")


def _apply(w: np.ndarray, kind: str, t: np.ndarray | None) -> np.ndarray:
    if kind == "none":
        return w
    return w * t if kind == "diag" else w @ t


def spectrum(
    w: np.ndarray,
    method: str,
    gram: np.ndarray | None = None,
    abs_mean: np.ndarray | None = None,
    alpha: float = 0.5,
    damp: float = 1e-6,
) -> np.ndarray:
    """Singular values of ``W T`` (descending); for "whiten" the squared tail beyond r is the
    calibration error ``||(W - W_r) X^T||_F^2`` of the rank-r solution (exact when undamped)."""
    w = _matrix(w)
    kind, t, _ = _transform(method, w.shape[1], gram, abs_mean, alpha, damp)
    return np.linalg.svd(_apply(w, kind, t), compute_uv=False)


def lowrank_factors(
    w: np.ndarray,
    rank: int,
    method: str = "svd",
    gram: np.ndarray | None = None,
    abs_mean: np.ndarray | None = None,
    alpha: float = 0.5,
    damp: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """``W ~ a @ b``: ``W T = U S V^T``, ``a = U_r sqrt(S_r)``, ``b = sqrt(S_r) V_r^T T^-1``."""
    w = _matrix(w)
    r = _check_rank(rank, *w.shape)
    kind, t, t_inv = _transform(method, w.shape[1], gram, abs_mean, alpha, damp)
    u, sv, vt = np.linalg.svd(_apply(w, kind, t), full_matrices=False)
    a, b = _split(u, sv, vt, r)
    return a, _apply(b, kind, t_inv)


# ---------------------------------------------------------------- rank selection


def params_dense(m: int, n: int) -> int:
    """Parameters of a dense ``[m, n]`` weight: ``m n``."""
    return m * n


def params_lowrank(m: int, n: int, r: int) -> int:
    """Parameters of ``a [m, r] @ b [r, n]``: ``r (m + n)``."""
    return r * (m + n)


def max_useful_rank(m: int, n: int) -> int:
    """Largest ``r`` with ``r (m + n) < m n`` (0 if no rank saves parameters)."""
    if m < 1 or n < 1:
        raise ValueError(f"dimensions must be positive, got {m} x {n}")
    return (m * n - 1) // (m + n)


def rank_for_ratio(m: int, n: int, keep: float) -> int | None:
    """Largest ``r`` with ``r (m + n) <= keep m n``; None if ``r < 1`` or it saves nothing."""
    if not (math.isfinite(keep) and keep > 0):
        raise ValueError(f"keep must be a positive fraction of the parameters, got {keep}")
    cap = keep * m * n
    r = int(cap // (m + n))
    while (r + 1) * (m + n) <= cap:
        r += 1
    while r > 0 and r * (m + n) > cap:
        r -= 1
    return r if 1 <= r <= max_useful_rank(m, n) else None


def rank_for_energy(sv: np.ndarray, energy: float) -> int:
    """Smallest ``r >= 1`` with ``sum(sv[:r]^2) >= energy * sum(sv^2)`` (sv sorted descending)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s = np.sort(np.abs(np.asarray(sv, dtype=np.float64).reshape(-1)))[::-1]
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("singular values must be a non-empty finite array")
    cum = np.cumsum(s**2)
    idx = int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12), side="left"))
    return max(1, min(idx + 1, s.size))


def _layer_options(
    m: int, n: int, sv: np.ndarray, step: int
) -> tuple[list, np.ndarray, np.ndarray]:
    """Options (ranks, None last) with their costs and relative errors, sorted by cost."""
    e2 = np.asarray(sv, dtype=np.float64).reshape(-1) ** 2
    total = float(e2.sum())
    tail = np.concatenate([np.cumsum(e2[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r} sv_i^2
    ranks: list[int | None] = list(range(step, max_useful_rank(m, n) + 1, step))
    errs = [float(tail[min(r, e2.size)]) / total if total > 0 else 0.0 for r in ranks]
    costs = [params_lowrank(m, n, r) for r in ranks]
    ranks.append(None)
    return ranks, np.array(costs + [m * n], dtype=np.float64), np.array(errs + [0.0])


def _pick(costs: np.ndarray, errs: np.ndarray, lam: float) -> int:
    return int(np.argmin(errs + lam * costs))  # ties -> first = cheapest


def allocate_ranks(
    layers: Sequence[tuple[int, int, np.ndarray]], budget: float, step: int = 8
) -> list[int | None]:
    """Ranks (None = dense) minimizing ``sum e_l(r_l)`` subject to ``sum cost_l <= budget``.

    ``e(r) = sum_{i>=r} sv_i^2 / sum sv_i^2``, cost ``r (m + n)`` or ``m n`` dense; ranks are
    multiples of ``step`` up to ``max_useful_rank``. Lagrangian: each layer minimizes
    ``e + lam * cost`` (absolute parameters, one lam for all layers, so this is the dual of the
    stated problem and every solution it yields is optimal for its own cost); lam is bisected to
    the smallest value meeting the budget, then leftover budget is spent greedily on the upgrade
    with the best error reduction per parameter. The gap to the optimum is at most the error
    drop of the one layer that switches at the final lam.
    """
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer, got {step}")
    opts = [_layer_options(m, n, sv, int(step)) for m, n, sv in layers]
    cheapest = sum(float(c[0]) for _, c, _ in opts)
    if budget < cheapest:
        raise ValueError(
            f"budget {budget:g} is below the cheapest allocation {cheapest:g} "
            f"(every layer at rank {step}, or dense where rank {step} saves nothing)"
        )
    pick = [_pick(c, e, 0.0) for _, c, e in opts]
    if sum(c[i] for (_, c, _), i in zip(opts, pick)) > budget:
        lo, hi = 0.0, 2.0  # lam = 2 > max error drop (1) per parameter: everyone at min cost
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            cost = sum(c[_pick(c, e, mid)] for _, c, e in opts)
            lo, hi = (mid, hi) if cost > budget else (lo, mid)
        pick = [_pick(c, e, hi) for _, c, e in opts]
    left = budget - sum(c[i] for (_, c, _), i in zip(opts, pick))
    while True:  # greedy upgrades with the leftover budget
        best, best_gain = None, 0.0
        for li, (_, c, e) in enumerate(opts):
            dc, de = c - c[pick[li]], e[pick[li]] - e
            ok = (dc > 0) & (dc <= left) & (de > 0)
            if np.any(ok):
                j = int(np.argmax(np.where(ok, de / np.where(ok, dc, 1.0), -1.0)))
                if de[j] / dc[j] > best_gain:
                    best, best_gain = (li, j), de[j] / dc[j]
        if best is None:
            break
        li, j = best
        left -= opts[li][1][j] - opts[li][1][pick[li]]
        pick[li] = j
    return [ranks[i] for (ranks, _, _), i in zip(opts, pick)]


# ---------------------------------------------------------------- low rank + quantized


def lq_decompose(
    w: np.ndarray,
    rank: int,
    quantize: Callable[[np.ndarray], np.ndarray],
    iters: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """LQ-LoRA: ``W ~ Q + a @ b``; from ``L = 0`` repeat ``Q = quantize(W - L)``,
    ``L = best rank-r(W - Q)``. Returns the iterate with the smallest ``||W - Q - L|| / ||W||``
    (``q`` dequantized) and that error for every iteration."""
    w = _matrix(w)
    r = _check_rank(rank, *w.shape)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    ref = float(np.linalg.norm(w)) or 1.0
    low = np.zeros_like(w)
    errors: list[float] = []
    best: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
    for _ in range(iters):
        q = np.asarray(quantize(w - low), dtype=np.float64)
        if q.shape != w.shape:
            raise ValueError(f"quantize returned shape {q.shape}, expected {w.shape}")
        a, b = truncated_svd(w - q, r)
        low = a @ b
        err = float(np.linalg.norm(w - q - low)) / ref
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, q, a, b)
    _, q, a, b = best
    return q, a, b, errors


def eora(
    dw: np.ndarray, gram: np.ndarray, rank: int, damp: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """EoRA: ``a @ b`` minimizing ``||(dW - a b) X^T||_F`` for a quantization error ``dW = W - Q``.

    ``||M X^T||_F = ||M S||_F`` for any ``S S^T = G`` (Cholesky here; EoRA's eigen-form
    ``Q L^(1/2)`` differs by an orthogonal factor), so the optimum is the rank-r SVD of ``dW S``
    mapped back by ``S^-1``; its error is the singular-value tail of ``dW S``.
    """
    return lowrank_factors(dw, rank, "whiten", gram=gram, damp=damp)
