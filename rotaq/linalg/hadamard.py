"""Hadamard matrices from Sylvester, Paley I/II (over GF(p^k)) and Kronecker products.

An order ``n`` is *reachable* when it is 1, 2, a power of two, a Paley I order
``q + 1`` (``q`` a prime power, ``q = 3 mod 4``), a Paley II order ``2 (q + 1)``
(``q = 1 mod 4``), or a product ``a * b`` of reachable orders ``a, b > 1``.
Unnormalized matrices have entries +-1 and satisfy ``H @ H.T == n * I``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from rotaq.linalg.galois import jacobsthal, prime_power

logger = logging.getLogger(__name__)


def _order(n: int) -> int:
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"matrix order must be a positive integer, got {n}")
    return n


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(n: int) -> tuple[int, int] | None:
    """``(1, q)`` for a Paley I order, ``(2, q)`` for Paley II, else None (I preferred)."""
    if n >= 4 and (n - 1) % 4 == 3 and prime_power(n - 1):
        return (1, n - 1)
    if n % 2 == 0 and (n // 2 - 1) % 4 == 1 and prime_power(n // 2 - 1):
        return (2, n // 2 - 1)
    return None


@functools.cache
def _decompose(n: int) -> tuple[tuple[int, ...], int] | None:
    """Best ``(bases, e)`` with ``n == prod(bases) * 2**e``, or None if unreachable.

    Bases are non-power-of-two Paley orders, sorted. Fewest bases win, then the
    smallest largest base (so the power-of-two part goes to one Sylvester factor).
    """
    if _is_pow2(n):
        return ((), n.bit_length() - 1)
    if n % 4:
        return None
    best = ((n,), 0) if _paley_kind(n) else None
    for d in range(2, math.isqrt(n) + 1):
        if n % d:
            continue
        left, right = _decompose(d), _decompose(n // d)
        if left is None or right is None:
            continue
        cand = (tuple(sorted(left[0] + right[0])), left[1] + right[1])
        if best is None or _rank(cand) < _rank(best):
            best = cand
    return best


def _rank(dec: tuple[tuple[int, ...], int]) -> tuple:
    return (len(dec[0]), max(dec[0], default=0), dec[0])


def _require(n: int) -> tuple[tuple[int, ...], int]:
    dec = _decompose(_order(n))
    if dec is None:
        raise ValueError(
            f"no Hadamard construction for order {n}: reachable orders are 1, 2 and "
            "multiples of 4 built from Sylvester, Paley I/II and Kronecker products "
            "(see uncovered_sizes())"
        )
    return dec


def is_hadamard_size(n: int) -> bool:
    """True if ``hadamard(n)`` can be built by the constructions of this module."""
    n = operator.index(n)
    return n >= 1 and _decompose(n) is not None


@functools.lru_cache(maxsize=8)
def _reachable_mask(limit: int) -> np.ndarray:
    """Boolean mask ``m[n]`` (``0 <= n <= limit``) of reachable orders, by sieving."""
    size = limit + 1
    prime = np.ones(size, dtype=bool)
    prime[:2] = False
    ppow = np.zeros(size, dtype=bool)  # prime powers p^k, k >= 2
    for p in range(2, math.isqrt(limit) + 1):
        if prime[p]:
            prime[p * p :: p] = False
            v = p * p
            while v <= limit:
                ppow[v], v = True, v * p
    ppow |= prime
    mask = np.zeros(size, dtype=bool)
    mask[1 : min(size, 3)] = True
    reach = [2]  # reachable orders > 1, ascending
    for n in range(4, size, 4):
        small = itertools.takewhile(lambda d, n=n: d * d <= n, reach)
        if (
            _is_pow2(n)
            or (ppow[n - 1] and (n - 1) % 4 == 3)  # Paley I
            or (ppow[n // 2 - 1] and (n // 2 - 1) % 4 == 1)  # Paley II
            or any(n % d == 0 and mask[n // d] for d in small)  # Kronecker
        ):
            mask[n] = True
            reach.append(n)
    mask.setflags(write=False)
    return mask


def covered_sizes(limit: int) -> list[int]:
    """Reachable orders ``<= limit``: 1, 2 and the reachable multiples of 4."""
    limit = operator.index(limit)
    if limit < 1:
        return []
    return np.flatnonzero(_reachable_mask(limit)).tolist()


def uncovered_sizes(limit: int) -> list[int]:
    """Multiples of 4 up to ``limit`` that no construction here reaches."""
    limit = operator.index(limit)
    if limit < 4:
        return []
    mask = _reachable_mask(limit)
    return [n for n in range(4, limit + 1, 4) if not mask[n]]




def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=32)
def _sylvester_i8(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int8)
    for _ in range(n.bit_length() - 1):
        h = np.kron(h2, h)
    return _frozen(h)


@functools.lru_cache(maxsize=64)
def _paley1_i8(q: int) -> np.ndarray:
    n = q + 1
    s = np.zeros((n, n), dtype=np.int8)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
    return _frozen(s + np.eye(n, dtype=np.int8))  # I + skew conference matrix


@functools.lru_cache(maxsize=64)
def _paley2_i8(q: int) -> np.ndarray:
    n = q + 1
    c = np.zeros((n, n), dtype=np.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)  # symmetric conference matrix
    a = np.array([[1, 1], [1, -1]], dtype=np.int8)
    b = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return _frozen(np.kron(c, a) + np.kron(np.eye(n, dtype=np.int8), b))


def sylvester(n: int, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Sylvester Hadamard matrix of power-of-two order ``n`` (``H_2n = H_2 kron H_n``)."""
    if not _is_pow2(_order(n)):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    return np.array(_sylvester_i8(n), dtype=dtype)


def paley1(q: int, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Paley I Hadamard matrix of order ``q + 1`` (``q`` a prime power, ``q = 3 mod 4``)."""
    if prime_power(q) is None or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime power q = 3 mod 4, got {q}")
    return np.array(_paley1_i8(q), dtype=dtype)


def paley2(q: int, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Paley II Hadamard matrix of order ``2 (q + 1)`` (``q`` a prime power, ``q = 1 mod 4``)."""
    if prime_power(q) is None or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime power q = 1 mod 4, got {q}")
    return np.array(_paley2_i8(q), dtype=dtype)


def _base_i8(b: int) -> np.ndarray:
    if _is_pow2(b):
        return _sylvester_i8(b)
    kind, q = _paley_kind(b)  # type: ignore[misc]
    return _paley1_i8(q) if kind == 1 else _paley2_i8(q)


def _factors_i8(n: int) -> list[np.ndarray]:
    bases, e = _require(n)
    out = [_base_i8(b) for b in bases]
    if e or not out:
        out.append(_sylvester_i8(1 << e))
    return out


def _kron_all(mats: list[np.ndarray]) -> np.ndarray:
    return functools.reduce(np.kron, mats[1:], mats[0])


@functools.lru_cache(maxsize=4)
def _hadamard_i8(n: int) -> np.ndarray:
    return _frozen(np.asarray(_kron_all(_factors_i8(n))))


def hadamard_factors(n: int, dtype: DTypeLike = np.float64) -> list[np.ndarray]:
    """+-1 Hadamard factors whose Kronecker product (in order) is ``hadamard(n)``.

    Non-power-of-two Paley bases come first (ascending), then one Sylvester factor
    holding the whole power-of-two part. ``n == 1`` gives ``[[[1]]]``.
    """
    return [np.array(f, dtype=dtype) for f in _factors_i8(n)]


def hadamard(n: int, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Unnormalized +-1 Hadamard matrix of order ``n`` (``H @ H.T == n * I``); a fresh copy."""
    return np.array(_hadamard_i8(n), dtype=dtype)


def normalized_hadamard(n: int) -> np.ndarray:
    """Orthogonal ``hadamard(n) / sqrt(n)`` in float64."""
    h = hadamard(n)
    h /= math.sqrt(n)
    return h


def kronecker_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal ``(A, B)`` with ``kron(A, B) == normalized_hadamard(n)`` and ``a + b`` minimal.

    The factor list of ``hadamard_factors(n)`` is cut once, keeping its order; the
    Sylvester factor may be cut too (``S_{2^(i+j)} = S_{2^i} kron S_{2^j}``). Ties go to
    the larger ``A``; with a single non-Sylvester factor, ``B = ones((1, 1))``.
    """
    bases, e = _require(n)
    options = [(bases[:j], 0, bases[j:], e) for j in range(len(bases) + 1)]
    options += [(bases, i, (), e - i) for i in range(1, e + 1)]

    sizes = [(math.prod(o[0]) << o[1], math.prod(o[2]) << o[3]) for o in options]
    best = min(range(len(options)), key=lambda i: (sum(sizes[i]), -sizes[i][0]))
    a_b, a_e, b_b, b_e = options[best]

    def build(part: tuple[int, ...], exp: int) -> np.ndarray:
        mats = [_base_i8(b) for b in part] + [_sylvester_i8(1 << exp)]
        m = np.array(_kron_all(mats), dtype=np.float64)
        m /= math.sqrt(m.shape[0])
        return m

    return build(a_b, a_e), build(b_b, b_e)


def apply_kronecker(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Compute ``x @ kron(a, b)`` on the last axis without forming the Kronecker product.

    Row-major convention: the last axis of ``x`` (length ``a_in * b_in``) is viewed as
    ``X[..., i, j] = x[..., i * b_in + j]``; then
    ``(x @ kron(A, B))[..., k * b_out + l] = (A.T @ X @ B)[..., k, l]``.
    As graph ops: Reshape(..., a_in, b_in) -> MatMul by A.T on the left -> MatMul by B
    on the right -> Reshape(..., a_out * b_out).
    """
    x, a, b = np.asarray(x), np.asarray(a), np.asarray(b)
    (a_in, a_out), (b_in, b_out) = a.shape, b.shape
    if x.shape[-1] != a_in * b_in:
        raise ValueError(f"last axis {x.shape[-1]} != {a_in} * {b_in}")
    xm = x.reshape(x.shape[:-1] + (a_in, b_in))
    y = np.matmul(np.matmul(a.T, xm), b)
    return y.reshape(x.shape[:-1] + (a_out * b_out,))


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """Haar-random orthogonal ``n x n`` matrix: QR of a Gaussian, columns sign-fixed by diag(R)."""
    n = _order(n)
    g = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    s = np.sign(np.diag(r))
    s[s == 0] = 1.0
    return q * s


def apply_factors(x: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
    """``x @ kron(F_0, F_1, ...)`` on the last axis, axis by axis (cost n * sum(n_i) per row)."""
    x = np.asarray(x)
    dims = [f.shape[0] for f in factors]
    if x.shape[-1] != math.prod(dims):
        raise ValueError(f"last axis {x.shape[-1]} != {' * '.join(map(str, dims))}")
    lead = x.shape[:-1]
    y = x.reshape(lead + tuple(dims))
    for i, f in enumerate(factors):
        axis = len(lead) + i
        y = np.moveaxis(np.tensordot(y, f, axes=([axis], [0])), -1, axis)
    return y.reshape(lead + (x.shape[-1],))


@dataclass(frozen=True)
class Rotation:
    """An orthogonal ``Q = diag(signs) @ kron(factors)`` (normalized Hadamard factors), applied
    without forming Q; ``dense`` holds Q instead when no Hadamard of that order is known."""

    signs: np.ndarray | None
    factors: tuple[np.ndarray, ...]
    dense: np.ndarray | None = None

    def right(self, w: np.ndarray) -> np.ndarray:
        """``w @ Q`` (rotates the input side of a weight ``[out, in]``)."""
        if self.dense is not None:
            return w @ self.dense
        return apply_factors(w * self.signs, self.factors)

    def left_t(self, w: np.ndarray) -> np.ndarray:
        """``Q^T @ w`` (rotates the output side of a weight ``[out, in]``)."""
        if self.dense is not None:
            return self.dense.T @ w
        return apply_factors((w * self.signs[:, None]).T, self.factors).T

    def matrix(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense.copy()
        return self.right(np.eye(len(self.signs)))


def random_rotation(n: int, seed: int = 0) -> Rotation:
    """``random_hadamard(n, seed)`` in factored form (same signs, same matrix)."""
    n = _order(n)
    if not is_hadamard_size(n):
        msg = "no Hadamard order n=%d (Sylvester/Paley/Kronecker); using a Haar-random rotation"
        logger.warning(msg, n)
        return Rotation(None, (), random_orthogonal(n, seed))
    signs = np.random.default_rng(seed).integers(0, 2, size=n) * 2.0 - 1.0
    factors = tuple(f / math.sqrt(f.shape[0]) for f in hadamard_factors(n))
    return Rotation(signs, factors)


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """Orthogonal ``diag(s) @ hadamard(n) / sqrt(n)`` with random signs ``s`` from ``seed``.

    Unreachable ``n`` logs a warning and falls back to ``random_orthogonal(n, seed)``.
    """
    return random_rotation(n, seed).matrix()


def fwht(x: np.ndarray) -> np.ndarray:
    """Normalized fast Walsh-Hadamard transform on the last axis: ``x @ sylvester(n) / sqrt(n)``."""
    y = np.array(x, dtype=np.float64)
    if y.ndim == 0 or not _is_pow2(y.shape[-1]):
        raise ValueError(f"fwht needs a power-of-two last axis, got shape {y.shape}")
    shape, n = y.shape, y.shape[-1]
    lead = shape[:-1]
    h = 1
    while h < n:
        y = y.reshape(lead + (n // (2 * h), 2, h))
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = np.stack((lo + hi, lo - hi), axis=-2)
        h *= 2
    y = y.reshape(shape)
    y /= math.sqrt(n)
    return y
