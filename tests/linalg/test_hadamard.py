"""Tests for rotaq.linalg.hadamard (Sylvester, Paley I/II over GF(p^k), Kronecker)."""

from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np
import pytest

from rotaq.linalg import hadamard as hm
from rotaq.linalg.galois import GF, irreducible_poly
from rotaq.linalg.hadamard import (
    apply_kronecker,
    covered_sizes,
    fwht,
    hadamard,
    hadamard_factors,
    is_hadamard_size,
    kronecker_split,
    normalized_hadamard,
    paley1,
    paley2,
    random_hadamard,
    random_orthogonal,
    sylvester,
    uncovered_sizes,
)

# Measured with this implementation; a change means the reachability rules changed.
N_COVERED_MULTIPLES_OF_4_UP_TO_16384 = 2448
N_UNCOVERED_UP_TO_16384 = 1648
BIG_SIZES = (576, 1536, 4864, 11008)


def _assert_hadamard_exact(h: np.ndarray) -> None:
    """Entries +-1 and H H^T == n I exactly.

    Entries are +-1, so every partial sum of the float64 product is an integer of
    magnitude <= n < 2**53: the BLAS product is exact integer arithmetic.
    """
    n = h.shape[0]
    assert h.shape == (n, n)
    assert np.all(np.abs(h) == 1)
    assert np.array_equal(h @ h.T, n * np.eye(n))


def _kron_all(mats: list[np.ndarray]) -> np.ndarray:
    return functools.reduce(np.kron, mats)


# --------------------------------------------------------------------------- small orders


def test_trivial_orders():
    np.testing.assert_array_equal(hadamard(1), [[1.0]])
    np.testing.assert_array_equal(hadamard(2), [[1.0, 1.0], [1.0, -1.0]])
    assert hadamard(4).dtype == np.float64
    assert [f.shape for f in hadamard_factors(1)] == [(1, 1)]


def test_every_covered_size_up_to_1024_is_exactly_hadamard():
    sizes = covered_sizes(1024)
    assert sizes[:8] == [1, 2, 4, 8, 12, 16, 20, 24]
    assert all(n in (1, 2) or n % 4 == 0 for n in sizes)
    start = time.perf_counter()
    for n in sizes:
        _assert_hadamard_exact(hadamard(n))
    assert time.perf_counter() - start < 30.0
    assert len(sizes) == 2 + sum(1 for n in range(4, 1025, 4) if is_hadamard_size(n))


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 52, 76, 148, 344])
def test_named_small_orders(n):
    assert is_hadamard_size(n)
    _assert_hadamard_exact(hadamard(n))


def test_hadamard_returns_fresh_copies():
    a = hadamard(12)
    a[0, 0] = 99.0
    assert hadamard(12)[0, 0] == 1.0
    assert hadamard(12, dtype=np.int8).dtype == np.int8


@pytest.mark.parametrize("n", [0, -4, 3, 6, 10, 92, 172, 668])
def test_unreachable_orders_raise(n):
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match="order"):
        hadamard(n)
    with pytest.raises(ValueError):
        hadamard_factors(n)


# --------------------------------------------------------------------------- GF(p^k) and Paley


@pytest.mark.parametrize("q", [3, 7, 9, 25, 27, 49, 81, 125, 343])
def test_gf_is_a_field_and_chi_is_quadratic_character(q):
    field = GF(q)
    x = np.arange(q)
    table = field.mul(x[:, None], x[None, :])
    assert np.array_equal(table, table.T)
    assert np.all(table[0] == 0)
    assert np.array_equal(table[1], x)
    for row in table[1:]:  # irreducible modulus <=> every nonzero element invertible
        assert sorted(row[1:].tolist()) == list(range(1, q))
    y, z = np.random.default_rng(q).integers(0, q, size=(2, 50))
    assert np.array_equal(field.mul(table[y, z], x[:, None]), field.mul(y, table[z][:, x].T))
    chi = field.quadratic_character()
    assert chi[0] == 0 and np.count_nonzero(chi == 1) == (q - 1) // 2
    minus_one = field.sub(0, 1)
    assert chi[minus_one] == (1 if q % 4 == 1 else -1)


def test_irreducible_poly_has_no_roots():
    for p, k in [(3, 3), (5, 2), (7, 3), (3, 9), (11, 2)]:
        f = irreducible_poly(p, k)
        assert len(f) == k + 1 and f[-1] == 1
        for r in range(p):
            assert sum(c * r**i for i, c in enumerate(f)) % p != 0
    with pytest.raises(ValueError):
        irreducible_poly(4, 2)


def test_paley1_over_gf27_order_28():
    h = paley1(27)
    assert h.shape == (28, 28)
    _assert_hadamard_exact(h)
    np.testing.assert_array_equal(hadamard(28), h)


def test_paley2_over_gf25_order_52():
    h = paley2(25)
    assert h.shape == (52, 52)
    _assert_hadamard_exact(h)
    np.testing.assert_array_equal(hadamard(52), h)


def test_paley1_over_gf343_order_344():
    h = paley1(343)
    assert h.shape == (344, 344)
    _assert_hadamard_exact(h)
    np.testing.assert_array_equal(hadamard(344), h)


@pytest.mark.parametrize("q", [3, 11, 19, 23, 27, 43, 243])
def test_paley1_prime_and_prime_power(q):
    _assert_hadamard_exact(paley1(q))


@pytest.mark.parametrize("q", [5, 9, 13, 17, 37, 49, 73, 81])
def test_paley2_prime_and_prime_power(q):
    _assert_hadamard_exact(paley2(q))


def test_paley_rejects_wrong_residue_or_non_prime_power():
    for bad in (5, 15, 21, 25):
        with pytest.raises(ValueError):
            paley1(bad)
    for bad in (7, 21, 27, 45):
        with pytest.raises(ValueError):
            paley2(bad)
    with pytest.raises(ValueError):
        sylvester(12)


# --------------------------------------------------------------------------- large orders


def test_big_orders_576_1536_full_gram():
    for n in (576, 1536):
        h = hadamard(n)
        assert np.all(np.abs(h) == 1)
        np.testing.assert_allclose(h @ h.T, n * np.eye(n), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [4864, 11008])
def test_big_orders_structure_and_gram_rows(n):
    """Exact H == kron(factors) with Hadamard factors, plus a float64 Gram row block."""
    factors = hadamard_factors(n, dtype=np.int8)
    for f in factors:
        _assert_hadamard_exact(f.astype(np.float64))
    h8 = hadamard(n, dtype=np.int8)
    assert np.array_equal(h8, _kron_all(factors))
    assert np.all(np.abs(h8) == 1)
    # float64 Gram rows H[rows] @ H.T (the full Gram is 2 n^3 flops), columns in chunks
    rows = np.unique(np.r_[0, n - 1, np.random.default_rng(n).choice(n, 192, replace=False)])
    top = h8[rows].astype(np.float64)
    for c in range(0, n, 2048):
        gram = top @ h8[c : c + 2048].astype(np.float64).T
        want = (rows[:, None] == np.arange(c, min(c + 2048, n))[None, :]) * float(n)
        np.testing.assert_allclose(gram, want, rtol=0, atol=1e-9)


def test_named_big_factorizations():
    sizes = {n: [f.shape[0] for f in hadamard_factors(n)] for n in BIG_SIZES}
    assert sizes == {576: [36, 16], 1536: [12, 128], 4864: [76, 64], 11008: [344, 32]}


def test_18944_factors_without_dense_matrix():
    assert is_hadamard_size(18944)
    factors = hadamard_factors(18944)
    assert [f.shape[0] for f in factors] == [148, 128]
    assert math.prod(f.shape[0] for f in factors) == 18944
    for f in factors:
        _assert_hadamard_exact(f)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 24, 48, 144, 240, 576, 1728])
def test_hadamard_is_kron_of_factors(n):
    factors = hadamard_factors(n)
    np.testing.assert_array_equal(hadamard(n), _kron_all(factors))
    non_pow2 = [f.shape[0] for f in factors if f.shape[0] & (f.shape[0] - 1)]
    assert non_pow2 == sorted(non_pow2)
    assert sum(1 for f in factors if f.shape[0] & (f.shape[0] - 1) == 0) <= 1


# --------------------------------------------------------------------------- Kronecker split


def _split_sums(n: int) -> list[int]:
    """a + b for every single cut of the factor list, Sylvester expanded into H_2's."""
    sizes: list[int] = []
    for f in hadamard_factors(n):
        m = f.shape[0]
        sizes += [2] * (m.bit_length() - 1) if m & (m - 1) == 0 else [m]
    return [math.prod(sizes[:j]) + math.prod(sizes[j:]) for j in range(len(sizes) + 1)]


@pytest.mark.parametrize("n", [1, 2, 12, 64, 128, 144, 576, 1536, 1728, 4864])
def test_kronecker_split(n):
    a, b = kronecker_split(n)
    assert a.shape[0] * b.shape[0] == n
    np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-12)
    np.testing.assert_allclose(b @ b.T, np.eye(b.shape[0]), atol=1e-12)
    assert np.max(np.abs(np.kron(a, b) - normalized_hadamard(n))) <= 1e-14
    assert a.shape[0] + b.shape[0] == min(_split_sums(n))


def test_kronecker_split_sizes():
    shapes = {
        n: (kronecker_split(n)[0].shape[0], kronecker_split(n)[1].shape[0])
        for n in (12, 344, 1024, 1536, 576, 18944)
    }
    assert shapes == {
        12: (12, 1),
        344: (344, 1),
        1024: (32, 32),
        1536: (48, 32),
        576: (36, 16),
        18944: (148, 128),
    }
    np.testing.assert_array_equal(kronecker_split(12)[1], np.ones((1, 1)))


def test_apply_kronecker_matches_dense():
    rng = np.random.default_rng(0)
    for n in (12, 48, 576, 1536):
        a, b = kronecker_split(n)
        x = rng.standard_normal((3, 5, n))
        np.testing.assert_allclose(
            apply_kronecker(x, a, b), x @ np.kron(a, b), rtol=1e-12, atol=1e-12
        )
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 2))  # rectangular
    x = rng.standard_normal((7, 12))
    np.testing.assert_allclose(apply_kronecker(x, a, b), x @ np.kron(a, b), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        apply_kronecker(x, a, a)


# --------------------------------------------------------------------------- random rotations


@pytest.mark.parametrize("n", [12, 64, 76, 344])
def test_random_hadamard_orthogonal_and_deterministic(n):
    q = random_hadamard(n, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(q), 1 / math.sqrt(n), rtol=1e-15)
    np.testing.assert_array_equal(q, random_hadamard(n, seed=3))
    assert not np.array_equal(q, random_hadamard(n, seed=4))
    signs = np.sign(q[:, 0] * hadamard(n)[:, 0])
    np.testing.assert_allclose(q, signs[:, None] * normalized_hadamard(n), atol=1e-15)


def test_random_hadamard_fallback_warns(caplog):
    n = 668
    assert n in uncovered_sizes(1024)
    with caplog.at_level(logging.WARNING, logger=hm.__name__):
        q = random_hadamard(n, seed=1)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "668" in msgs[0]
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-10)
    np.testing.assert_array_equal(q, random_orthogonal(n, seed=1))


def test_random_hadamard_no_warning_when_reachable(caplog):
    with caplog.at_level(logging.WARNING, logger=hm.__name__):
        random_hadamard(1536, seed=0)
    assert not caplog.records


def test_random_orthogonal_haar_sign_fix():
    q = random_orthogonal(50, seed=7)
    np.testing.assert_allclose(q.T @ q, np.eye(50), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(50, seed=7))
    g = np.random.default_rng(7).standard_normal((50, 50))
    r = q.T @ g  # G = Q R with R upper triangular and positive diagonal
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-10)
    assert np.all(np.diag(r) > 0)


# --------------------------------------------------------------------------- coverage


def test_covered_sizes_16384_fast_and_stable():
    hm._reachable_mask.cache_clear()
    start = time.perf_counter()
    sizes = covered_sizes(16384)
    assert time.perf_counter() - start < 1.0
    mult4 = [n for n in sizes if n % 4 == 0]
    assert len(mult4) == N_COVERED_MULTIPLES_OF_4_UP_TO_16384
    assert sizes[:2] == [1, 2] and len(sizes) == len(mult4) + 2
    for n in BIG_SIZES + (12, 20, 28, 36, 44, 52, 76, 148, 344):
        assert n in sizes
    assert 172 not in sizes
    assert is_hadamard_size(18944)
    assert covered_sizes(0) == [] and covered_sizes(1) == [1] and covered_sizes(3) == [1, 2]


def test_covered_sizes_agree_with_is_hadamard_size():
    sizes = set(covered_sizes(4096))
    for n in range(1, 4097):
        assert (n in sizes) == is_hadamard_size(n), n


def test_uncovered_sizes_16384(capsys):
    unc = uncovered_sizes(16384)
    assert len(unc) == N_UNCOVERED_UP_TO_16384
    assert len(unc) + N_COVERED_MULTIPLES_OF_4_UP_TO_16384 == 16384 // 4
    assert unc[:6] == [92, 116, 156, 172, 184, 188]
    assert all(n % 4 == 0 for n in unc)
    assert not set(unc) & set(covered_sizes(16384))
    assert {668, 716, 892} <= set(unc)
    assert uncovered_sizes(3) == []
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --------------------------------------------------------------------------- fast WHT


def test_fwht_matches_dense():
    rng = np.random.default_rng(1)
    for n in (1, 2, 4, 8, 64, 1024):
        x = rng.standard_normal((3, 2, n))
        dense = x @ (sylvester(n) / math.sqrt(n))
        np.testing.assert_allclose(fwht(x), dense, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(fwht(x), x @ normalized_hadamard(n), rtol=1e-12, atol=1e-12)
    v = rng.standard_normal(16)
    np.testing.assert_allclose(fwht(fwht(v)), v, atol=1e-12)
    with pytest.raises(ValueError):
        fwht(np.ones(12))
