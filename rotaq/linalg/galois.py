"""Finite fields GF(p^k) for the Paley Hadamard constructions: prime powers, irreducible
polynomials, field arithmetic on base-p digit encodings, and Jacobsthal matrices."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np


@functools.lru_cache(maxsize=8192)
def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k``, ``p`` prime and ``k >= 1``; None otherwise."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, r = 0, q
    while r % p == 0:
        r, k = r // p, k + 1
    return (p, k) if r == 1 else None


def _poly_rem(a: list[int], m: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo monic ``m`` over GF(p); coefficients low -> high."""
    a = list(a)
    dm = len(m) - 1
    for i in range(len(a) - 1, dm - 1, -1):
        c = a[i] % p
        if c:
            for j in range(dm + 1):
                a[i - dm + j] = (a[i - dm + j] - c * m[j]) % p
    return [c % p for c in a[:dm]]


def _is_irreducible(f: list[int], p: int) -> bool:
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for tail in itertools.product(range(p), repeat=d):
            if not any(_poly_rem(f, list(tail) + [1], p)):
                return False
    return True


@functools.cache
def irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """First monic irreducible polynomial of degree ``k`` over GF(p), coefficients low -> high."""
    if prime_power(p) != (p, 1) or k < 1:
        raise ValueError(f"need a prime p and degree k >= 1, got p={p}, k={k}")
    for tail in itertools.product(range(p), repeat=k):
        f = list(tail) + [1]
        if (k == 1 or f[0]) and _is_irreducible(f, p):
            return tuple(f)
    raise AssertionError("unreachable: irreducible polynomials exist for every degree")


class GF:
    """GF(q), q = p^k; element ``x`` is the int whose base-p digits are its coefficients."""

    def __init__(self, q: int) -> None:
        pk = prime_power(q)
        if pk is None:
            raise ValueError(f"{q} is not a prime power")
        self.q = q
        self.p, self.k = pk
        self.modulus = np.array(irreducible_poly(self.p, self.k)[: self.k], dtype=np.int64)
        self.powers = self.p ** np.arange(self.k, dtype=np.int64)

    def digits(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.int64)[..., None] // self.powers) % self.p

    def encode(self, d: np.ndarray) -> np.ndarray:
        return (np.asarray(d, dtype=np.int64) % self.p) @ self.powers

    def sub(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.encode(self.digits(x) - self.digits(y))

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        p, k = self.p, self.k
        dx, dy = np.broadcast_arrays(self.digits(x), self.digits(y))
        c = np.zeros(dx.shape[:-1] + (2 * k - 1,), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                c[..., i + j] += dx[..., i] * dy[..., j]
        c %= p
        for deg in range(2 * k - 2, k - 1, -1):  # x^k == -sum(modulus[j] x^j)
            top = c[..., deg].copy()
            c[..., deg - k : deg] = (c[..., deg - k : deg] - top[..., None] * self.modulus) % p
        return self.encode(c[..., :k])

    def quadratic_character(self) -> np.ndarray:
        """chi[x] = 0 for x = 0, 1 for nonzero squares, -1 otherwise (by squaring everything)."""
        x = np.arange(self.q)
        chi = -np.ones(self.q, dtype=np.int8)
        chi[self.mul(x, x)] = 1
        chi[0] = 0
        return chi


def jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(x_i - x_j) over GF(q), as int8."""
    field = GF(q)
    chi = field.quadratic_character()
    x = np.arange(q)
    dig = field.digits(x)
    out = np.empty((q, q), dtype=np.int8)
    step = max(1, (1 << 22) // (q * field.k))
    for s in range(0, q, step):
        if field.k == 1:  # prime field: subtraction is plain modular arithmetic
            diff = (x[s : s + step, None] - x[None, :]) % q
        else:
            diff = field.encode(dig[s : s + step, None, :] - dig[None, :, :])
        out[s : s + step] = chi[diff]
    return out
