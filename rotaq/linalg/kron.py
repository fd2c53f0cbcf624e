"""Kronecker-sum and Monarch approximations of a weight, near-square splits, Kronecker inverses.

Row-major convention throughout: for ``W [m, n]`` with ``m = m1 m2``, ``n = n1 n2``, entry
``W[i1 m2 + i2, j1 n2 + j2]``, and ``kron(A, B)[i1 m2 + i2, j1 n2 + j2] = A[i1, j1] B[i2, j2]``.
All arithmetic is float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rotaq.linalg.hadamard import apply_factors, apply_kronecker

KINDS = ("kron", "monarch")
_MAX_COND = 1e12


def near_square_split(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a b = n``, ``a <= b`` and ``a`` the largest divisor ``<= sqrt(n)``."""
    if int(n) != n or n < 1:
        raise ValueError(f"need a positive integer to split, got {n}")
    n = int(n)
    a = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return a, n // a


def _weight_split(
    w: np.ndarray, m_split: Sequence[int], n_split: Sequence[int]
) -> tuple[np.ndarray, int, int, int, int]:
    """``W`` viewed as ``W4[i1, i2, j1, j2]`` with the checked split sizes."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"weight must be a non-empty 2-D array, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight has non-finite entries")
    (m1, m2), (n1, n2) = _pair(m_split, "m_split"), _pair(n_split, "n_split")
    if m1 * m2 != w.shape[0]:
        raise ValueError(f"m_split {m1} x {m2} does not split the {w.shape[0]} rows of W")
    if n1 * n2 != w.shape[1]:
        raise ValueError(f"n_split {n1} x {n2} does not split the {w.shape[1]} columns of W")
    return w.reshape(m1, m2, n1, n2), m1, m2, n1, n2


def _pair(split: Sequence[int], name: str) -> tuple[int, int]:
    vals = tuple(split)
    if len(vals) != 2 or any(int(v) != v or v < 1 for v in vals):
        raise ValueError(f"{name} must be two positive integers, got {split}")
    return int(vals[0]), int(vals[1])


def _check_rank(rank: int, top: int, what: str) -> int:
    if int(rank) != rank or not 1 <= rank <= top:
        raise ValueError(f"{what} rank must be an integer in [1, {top}], got {rank}")
    return int(rank)


# ---------------------------------------------------------------- Kronecker sums


def _rearrange(w4: np.ndarray) -> np.ndarray:
    """Van Loan - Pitsianis ``R[(i1, j1), (i2, j2)] = W[(i1, i2), (j1, j2)]``."""
    m1, m2, n1, n2 = w4.shape
    return w4.transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_spectrum(w: np.ndarray, m_split: Sequence[int], n_split: Sequence[int]) -> np.ndarray:
    """Singular values of the rearrangement R; ``||W - W_r||_F^2 = sum_{s>=r} sig_s^2``."""
    w4 = _weight_split(w, m_split, n_split)[0]
    return np.linalg.svd(_rearrange(w4), compute_uv=False)


def nearest_kronecker(
    w: np.ndarray, m_split: Sequence[int], n_split: Sequence[int], rank: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Frobenius-nearest ``W ~ sum_s kron(A[s], B[s])``: ``R = U diag(sig) V^T``,
    ``A[s] = sqrt(sig_s) u_s`` as ``[m1, n1]``, ``B[s] = sqrt(sig_s) v_s`` as ``[m2, n2]``.

    Returns ``A [rank, m1, n1]`` and ``B [rank, m2, n2]``; ``rank <= min(m1 n1, m2 n2)``.
    """
    w4, m1, m2, n1, n2 = _weight_split(w, m_split, n_split)
    r = _check_rank(rank, min(m1 * n1, m2 * n2), "Kronecker")
    u, sig, vt = np.linalg.svd(_rearrange(w4), full_matrices=False)
    root = np.sqrt(sig[:r])
    a = (u[:, :r] * root).T.reshape(r, m1, n1)
    b = (root[:, None] * vt[:r]).reshape(r, m2, n2)
    return a, b


def _kron_stack(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if b.ndim == 2:
        b = b[None]
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need A [r, m1, n1] and B [r, m2, n2], got {a.shape} and {b.shape}")
    return a, b


def kron_sum_dense(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_s kron(A[s], B[s])`` as a dense ``[m1 m2, n1 n2]`` array."""
    a, b = _kron_stack(a, b)
    (_, m1, n1), (_, m2, n2) = a.shape, b.shape
    return np.einsum("sik,sjl->ijkl", a, b).reshape(m1 * m2, n1 * n2)


def kron_params(a: np.ndarray, b: np.ndarray) -> int:
    """Parameters of a Kronecker sum: ``r (m1 n1 + m2 n2)``."""
    a, b = _kron_stack(a, b)
    return int(a.size + b.size)


# ---------------------------------------------------------------- Monarch


def monarch_project(
    w: np.ndarray, m_split: Sequence[int], n_split: Sequence[int], rank: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Frobenius-nearest Monarch matrix of block rank ``rank``:
    ``M[(i1, i2), (j1, j2)] = sum_s L[i2, i1, j1 rank + s] R[j1, i2 rank + s, j2]``.

    Each block ``W[(:, i2), (j1, :)]`` (``m1 x n2`` over ``(i1, j2)``) is replaced by its own
    rank-``rank`` truncated SVD; blocks are disjoint, so this is the projection onto the set.
    ``L [m2, m1, n1 rank]``, ``R [n1, m2 rank, n2]``; as a graph: ``x -> [n1, n2]``, block-diagonal
    ``R[j1]`` per row, transpose to ``[m2, n1 rank]``, block-diagonal ``L[i2]``, transpose to
    ``[m1, m2]``. ``rank <= min(m1, n2)``.
    """
    w4, m1, m2, n1, n2 = _weight_split(w, m_split, n_split)
    r = _check_rank(rank, min(m1, n2), "Monarch")
    blocks = w4.transpose(1, 2, 0, 3)  # [i2, j1, i1, j2]
    u, sig, vt = np.linalg.svd(blocks, full_matrices=False)
    root = np.sqrt(sig[..., :r])  # [i2, j1, s]
    us = u[..., :r] * root[..., None, :]  # [i2, j1, i1, s]
    vs = root[..., None] * vt[..., :r, :]  # [i2, j1, s, j2]
    left = us.transpose(0, 2, 1, 3).reshape(m2, m1, n1 * r)
    right = vs.transpose(1, 0, 2, 3).reshape(n1, m2 * r, n2)
    return left, right


def _monarch_dims(left: np.ndarray, right: np.ndarray) -> tuple[int, int, int, int, int]:
    if left.ndim != 3 or right.ndim != 3:
        raise ValueError(
            f"need L [m2, m1, n1 r] and R [n1, m2 r, n2], got {left.shape}, {right.shape}"
        )
    m2, m1, n1r = left.shape
    n1, m2r, n2 = right.shape
    if n1 < 1 or n1r % n1 or m2 < 1 or m2r % m2 or n1r // n1 != m2r // m2 or n1r == 0:
        raise ValueError(f"inconsistent Monarch factors L {left.shape} and R {right.shape}")
    return m1, m2, n1, n2, n1r // n1


def monarch_dense(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Dense ``[m1 m2, n1 n2]`` Monarch matrix from ``(L, R)`` (formula of ``monarch_project``)."""
    left, right = np.asarray(left, dtype=np.float64), np.asarray(right, dtype=np.float64)
    m1, m2, n1, n2, r = _monarch_dims(left, right)
    l4 = left.reshape(m2, m1, n1, r)  # [i2, i1, j1, s]
    r4 = right.reshape(n1, m2, r, n2)  # [j1, i2, s, j2]
    return np.einsum("baks,kbsd->abkd", l4, r4).reshape(m1 * m2, n1 * n2)


def monarch_params(left: np.ndarray, right: np.ndarray) -> int:
    """Parameters of a Monarch pair: ``r m2 n1 (m1 + n2)``."""
    _monarch_dims(np.asarray(left), np.asarray(right))
    return int(np.size(left) + np.size(right))


def rank_for_params(
    kind: str, m_split: Sequence[int], n_split: Sequence[int], budget: float
) -> int:
    """Largest rank of a Kronecker sum ("kron", ``r (m1 n1 + m2 n2)`` parameters) or Monarch
    pair ("monarch", ``r m2 n1 (m1 + n2)``) within ``budget``; at least 1, at most full rank."""
    (m1, m2), (n1, n2) = _pair(m_split, "m_split"), _pair(n_split, "n_split")
    if kind == "kron":
        per, top = m1 * n1 + m2 * n2, min(m1 * n1, m2 * n2)
    elif kind == "monarch":
        per, top = m2 * n1 * (m1 + n2), min(m1, n2)
    else:
        raise ValueError(f"unknown structure {kind!r}; expected one of {KINDS}")
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    return int(max(1, min(top, budget // per)))


# ---------------------------------------------------------------- Kronecker transforms


def kron_inverse(factors: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``[F_0^-1, F_1^-1, ...]`` (so ``kron(F)^-1 = kron(F^-1)``); ValueError on a non-square,
    singular or ill-conditioned (cond > 1e12) factor, naming it."""
    out = []
    for i, f in enumerate(factors):
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] != f.shape[1] or f.size == 0:
            raise ValueError(f"Kronecker factor {i} must be square, got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"Kronecker factor {i} has non-finite entries")
        cond = float(np.linalg.cond(f))
        if not cond <= _MAX_COND:
            raise ValueError(
                f"Kronecker factor {i} ({f.shape[0]}x{f.shape[1]}) is singular or "
                f"ill-conditioned: condition number {cond:.3g} > {_MAX_COND:.0e}"
            )
        out.append(np.linalg.solve(f, np.eye(f.shape[0])))
    return out


def kron_apply(x: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
    """``x @ kron(F_0, F_1, ...)`` on the last axis without the dense product (for two factors
    ``X -> F_0^T X F_1`` on ``X [..., a, b]``); rectangular factors allowed for two factors."""
    fs = [np.asarray(f, dtype=np.float64) for f in factors]
    if not fs or any(f.ndim != 2 for f in fs):
        raise ValueError("need one or more 2-D factors")
    x = np.asarray(x, dtype=np.float64)
    if len(fs) == 2:
        return apply_kronecker(x, fs[0], fs[1])
    if any(f.shape[0] != f.shape[1] for f in fs):
        raise ValueError("rectangular factors are supported for exactly two factors")
    return apply_factors(x, fs)
