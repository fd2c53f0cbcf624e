"""Tests for rotaq.linalg.kron: splits, Kronecker sums, Monarch projection, inverses, apply."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rotaq.linalg.kron import (
    kron_apply,
    kron_inverse,
    kron_params,
    kron_spectrum,
    kron_sum_dense,
    monarch_dense,
    monarch_params,
    monarch_project,
    near_square_split,
    nearest_kronecker,
    rank_for_params,
)

M1, M2, N1, N2 = 3, 4, 2, 5  # W [12, 10]


def _rearrange_loops(w, m1, m2, n1, n2):
    """``R[(i1, j1), (i2, j2)] = W[i1 m2 + i2, j1 n2 + j2]`` by explicit loops."""
    r = np.empty((m1 * n1, m2 * n2))
    for i1, i2, j1, j2 in itertools.product(range(m1), range(m2), range(n1), range(n2)):
        r[i1 * n1 + j1, i2 * n2 + j2] = w[i1 * m2 + i2, j1 * n2 + j2]
    return r


def _monarch_loops(left, right, m1, m2, n1, n2, r):
    w = np.zeros((m1 * m2, n1 * n2))
    for i1, i2, j1, j2, s in itertools.product(
        range(m1), range(m2), range(n1), range(n2), range(r)
    ):
        w[i1 * m2 + i2, j1 * n2 + j2] += left[i2, i1, j1 * r + s] * right[j1, i2 * r + s, j2]
    return w


# ---------------------------------------------------------------- near-square splits


@pytest.mark.parametrize(
    "n, split",
    [
        (576, (24, 24)),
        (1536, (32, 48)),
        (11008, (86, 128)),
        (4096, (64, 64)),
        (7, (1, 7)),
        (1, (1, 1)),
        (384, (16, 24)),
        (2048, (32, 64)),
    ],
)
def test_near_square_split_examples(n, split):
    assert near_square_split(n) == split


def test_near_square_split_brute_force():
    for n in range(1, 400):
        a, b = near_square_split(n)
        assert a * b == n and a <= b
        assert not any(n % d == 0 for d in range(a + 1, math.isqrt(n) + 1))
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            near_square_split(bad)


# ---------------------------------------------------------------- Kronecker sums


def test_kron_sum_dense_matches_np_kron():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, M1, N1)), rng.standard_normal((3, M2, N2))
    want = sum(np.kron(a[s], b[s]) for s in range(3))
    np.testing.assert_allclose(kron_sum_dense(a, b), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(kron_sum_dense(a[0], b[0]), np.kron(a[0], b[0]), atol=1e-13)
    assert kron_params(a, b) == 3 * (M1 * N1 + M2 * N2)
    with pytest.raises(ValueError, match=r"A \[r, m1, n1\]"):
        kron_sum_dense(a, b[:2])


def test_nearest_kronecker_full_rank_and_exact_structure():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((M1 * M2, N1 * N2))
    full = min(M1 * N1, M2 * N2)
    a, b = nearest_kronecker(w, (M1, M2), (N1, N2), rank=full)
    assert a.shape == (full, M1, N1) and b.shape == (full, M2, N2)
    np.testing.assert_allclose(kron_sum_dense(a, b), w, atol=1e-10)
    a0, b0 = rng.standard_normal((2, M1, N1)), rng.standard_normal((2, M2, N2))
    w2 = np.kron(a0[0], b0[0]) + np.kron(a0[1], b0[1])  # exactly a rank-2 Kronecker sum
    a, b = nearest_kronecker(w2, (M1, M2), (N1, N2), rank=2)
    np.testing.assert_allclose(kron_sum_dense(a, b), w2, atol=1e-10)
    a, b = nearest_kronecker(w2, (M1, M2), (N1, N2), rank=1)
    assert np.linalg.norm(w2 - kron_sum_dense(a, b)) > 1e-3 * np.linalg.norm(w2)


def _als_kron(w, m1, m2, n1, n2, rank, seed, iters=300):
    """Alternating least squares on the loop-built rearrangement from a random start."""
    r = _rearrange_loops(w, m1, m2, n1, n2)
    v = np.random.default_rng(seed).standard_normal((m2 * n2, rank))
    for _ in range(iters):
        u = np.linalg.lstsq(v, r.T, rcond=None)[0].T
        v = np.linalg.lstsq(u, r, rcond=None)[0].T
    a = u.T.reshape(rank, m1, n1)
    b = v.T.reshape(rank, m2, n2)
    return sum(np.kron(a[s], b[s]) for s in range(rank))


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_nearest_kronecker_is_optimal(rank):
    rng = np.random.default_rng(10 + rank)
    w = rng.standard_normal((M1 * M2, N1 * N2))
    a, b = nearest_kronecker(w, (M1, M2), (N1, N2), rank=rank)
    err = np.linalg.norm(w - kron_sum_dense(a, b))
    sig = np.linalg.svd(_rearrange_loops(w, M1, M2, N1, N2), compute_uv=False)
    np.testing.assert_allclose(kron_spectrum(w, (M1, M2), (N1, N2)), sig, rtol=1e-12)
    np.testing.assert_allclose(err**2, np.sum(sig[rank:] ** 2), rtol=1e-10)
    for seed in range(3):
        alt = _als_kron(w, M1, M2, N1, N2, rank, seed)
        assert err <= np.linalg.norm(w - alt) * (1 + 1e-9)
    for _ in range(20):  # perturbing the factors never helps
        da = 1e-3 * rng.standard_normal(a.shape)
        db = 1e-3 * rng.standard_normal(b.shape)
        assert err <= np.linalg.norm(w - kron_sum_dense(a + da, b + db))


def test_kronecker_validation():
    w = np.ones((12, 10))
    with pytest.raises(ValueError, match="m_split 5 x 2 does not split the 12 rows"):
        nearest_kronecker(w, (5, 2), (2, 5))
    with pytest.raises(ValueError, match="n_split 3 x 3 does not split the 10 columns"):
        monarch_project(w, (3, 4), (3, 3))
    with pytest.raises(ValueError, match=r"Kronecker rank must be an integer in \[1, 6\]"):
        nearest_kronecker(w, (3, 4), (2, 5), rank=0)
    with pytest.raises(ValueError, match=r"Kronecker rank must be an integer in \[1, 6\]"):
        nearest_kronecker(w, (3, 4), (2, 5), rank=7)
    with pytest.raises(ValueError, match=r"Monarch rank must be an integer in \[1, 3\]"):
        monarch_project(w, (3, 4), (2, 5), rank=4)
    with pytest.raises(ValueError, match="two positive integers"):
        nearest_kronecker(w, (12,), (2, 5))
    with pytest.raises(ValueError, match="non-finite"):
        nearest_kronecker(np.full((4, 4), np.nan), (2, 2), (2, 2))


# ---------------------------------------------------------------- Monarch


def test_monarch_dense_matches_formula():
    rng = np.random.default_rng(2)
    for r in (1, 2):
        left = rng.standard_normal((M2, M1, N1 * r))
        right = rng.standard_normal((N1, M2 * r, N2))
        want = _monarch_loops(left, right, M1, M2, N1, N2, r)
        np.testing.assert_allclose(monarch_dense(left, right), want, rtol=1e-12, atol=1e-12)
        assert monarch_params(left, right) == r * M2 * N1 * (M1 + N2)
    with pytest.raises(ValueError, match="inconsistent Monarch factors"):
        monarch_dense(np.ones((M2, M1, 3)), np.ones((N1, M2, N2)))


@pytest.mark.parametrize("rank", [1, 2])
def test_monarch_reproduces_monarch_matrices(rank):
    rng = np.random.default_rng(3 + rank)
    left = rng.standard_normal((M2, M1, N1 * rank))
    right = rng.standard_normal((N1, M2 * rank, N2))
    w = _monarch_loops(left, right, M1, M2, N1, N2, rank)
    lp, rp = monarch_project(w, (M1, M2), (N1, N2), rank=rank)
    assert lp.shape == left.shape and rp.shape == right.shape
    np.testing.assert_allclose(monarch_dense(lp, rp), w, atol=1e-10)


def test_monarch_full_rank_and_optimality():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((M1 * M2, N1 * N2))
    full = min(M1, N2)
    np.testing.assert_allclose(
        monarch_dense(*monarch_project(w, (M1, M2), (N1, N2), rank=full)), w, atol=1e-10
    )
    for r in (1, 2):
        left, right = monarch_project(w, (M1, M2), (N1, N2), rank=r)
        err2 = np.linalg.norm(w - monarch_dense(left, right)) ** 2
        bound = 0.0  # any block rank <= r: error >= sum of each block's singular-value tail
        for i2, j1 in itertools.product(range(M2), range(N1)):
            blk = np.array(
                [[w[i1 * M2 + i2, j1 * N2 + j2] for j2 in range(N2)] for i1 in range(M1)]
            )
            bound += np.sum(np.linalg.svd(blk, compute_uv=False)[r:] ** 2)
        np.testing.assert_allclose(err2, bound, rtol=1e-10)
        for _ in range(10):
            near = monarch_dense(left + 1e-3 * rng.standard_normal(left.shape), right)
            assert err2 <= np.linalg.norm(w - near) ** 2


def test_monarch_as_block_diagonal_graph():
    """The two-block-diagonal-matmul form in ``monarch_project``'s docstring computes ``W x``."""
    rng = np.random.default_rng(6)
    r = 2
    left, right = monarch_project(rng.standard_normal((M1 * M2, N1 * N2)), (M1, M2), (N1, N2), r)
    w = monarch_dense(left, right)
    x = rng.standard_normal(N1 * N2)
    z = np.stack([right[j1] @ x.reshape(N1, N2)[j1] for j1 in range(N1)])  # [n1, m2 r]
    z = z.reshape(N1, M2, r).transpose(1, 0, 2).reshape(M2, N1 * r)
    y = np.stack([left[i2] @ z[i2] for i2 in range(M2)])  # [m2, m1]
    np.testing.assert_allclose(y.T.reshape(-1), w @ x, atol=1e-12)


# ---------------------------------------------------------------- ranks for a budget


def test_rank_for_params():
    assert rank_for_params("kron", (4, 4), (4, 4), 100) == 3
    assert rank_for_params("kron", (4, 4), (4, 4), 10) == 1
    assert rank_for_params("kron", (4, 4), (4, 4), 1e9) == 16
    assert rank_for_params("monarch", (3, 4), (2, 5), 1e9) == 3
    rng = np.random.default_rng(7)
    w = rng.standard_normal((M1 * M2, N1 * N2))
    for budget in (30, 64, 100, 150, 400):
        r = rank_for_params("kron", (M1, M2), (N1, N2), budget)
        assert kron_params(*nearest_kronecker(w, (M1, M2), (N1, N2), r)) <= max(budget, 26)
        if r < 6:
            assert kron_params(*nearest_kronecker(w, (M1, M2), (N1, N2), r + 1)) > budget
        r = rank_for_params("monarch", (M1, M2), (N1, N2), budget)
        assert monarch_params(*monarch_project(w, (M1, M2), (N1, N2), r)) <= max(budget, 64)
        if r < 3:
            assert monarch_params(*monarch_project(w, (M1, M2), (N1, N2), r + 1)) > budget
    with pytest.raises(ValueError, match="unknown structure 'tucker'"):
        rank_for_params("tucker", (2, 2), (2, 2), 10)


# ---------------------------------------------------------------- inverses and application


def test_kron_inverse_and_apply():
    rng = np.random.default_rng(8)
    f = [np.eye(n) + 0.3 * rng.standard_normal((n, n)) for n in (3, 4)]
    inv = kron_inverse(f)
    np.testing.assert_allclose(np.kron(*f) @ np.kron(*inv), np.eye(12), atol=1e-10)
    x = rng.standard_normal((2, 5, 12))
    np.testing.assert_allclose(kron_apply(x, f), x @ np.kron(*f), atol=1e-12)
    np.testing.assert_allclose(kron_apply(kron_apply(x, f), inv), x, atol=1e-10)
    f3 = f + [rng.standard_normal((2, 2))]
    x3 = rng.standard_normal((4, 24))
    np.testing.assert_allclose(kron_apply(x3, f3), x3 @ np.kron(np.kron(*f), f3[2]), atol=1e-12)
    rect = [rng.standard_normal((3, 2)), rng.standard_normal((4, 5))]
    np.testing.assert_allclose(kron_apply(x, rect), x @ np.kron(*rect), atol=1e-12)
    with pytest.raises(ValueError, match="exactly two factors"):
        kron_apply(x3, rect + [np.eye(2)])
    with pytest.raises(ValueError, match="last axis"):
        kron_apply(rng.standard_normal((2, 13)), f)


def test_kron_inverse_rejects_singular():
    ok = np.eye(3)
    singular = np.array([[1.0, 2.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="Kronecker factor 1 .* condition number"):
        kron_inverse([ok, singular])
    with pytest.raises(ValueError, match="factor 0 .* condition number 1e\\+13"):
        kron_inverse([np.diag([1.0, 1e-13])])
    with pytest.raises(ValueError, match="factor 0 must be square"):
        kron_inverse([np.ones((2, 3))])
