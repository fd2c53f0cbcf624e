"""Tests for rotaq.linalg.lowrank: SVD variants, whitening robustness, rank choice, LQ, EoRA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rotaq.linalg.lowrank import (
    act_scales,
    allocate_ranks,
    eora,
    lowrank_factors,
    lq_decompose,
    max_useful_rank,
    params_dense,
    params_lowrank,
    rank_for_energy,
    rank_for_ratio,
    spectrum,
    transform_for,
    truncated_svd,
    whiten,
    whitening,
)

M, N, T = 24, 16, 200


@pytest.fixture(scope="module")
def layer() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``W [24, 16]`` Gaussian, inputs ``X = Z C`` with strongly correlated channels, ``G``."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((N, N)) * np.logspace(0, -2, N)[:, None]
    x = rng.standard_normal((T, N)) @ c
    return rng.standard_normal((M, N)), x, x.T @ x


def _cal_err(w: np.ndarray, w2: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((w - w2) @ x.T))


def _als_best(w: np.ndarray, g: np.ndarray, r: int, seed: int, iters: int = 200) -> np.ndarray:
    """Alternating least squares for ``min ||(W - a b) S||_F`` (``S S^T = G``) from a random start."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((r, w.shape[1]))
    for _ in range(iters):
        a = np.linalg.solve(b @ g @ b.T, b @ g @ w.T).T
        b = np.linalg.lstsq(a, w, rcond=None)[0]
    return a @ b


# ---------------------------------------------------------------- truncated SVD


def test_truncated_svd_full_rank_tail_and_balance():
    w = np.random.default_rng(1).standard_normal((12, 9))
    a, b = truncated_svd(w, 9)
    assert a.shape == (12, 9) and b.shape == (9, 9)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)
    sv = np.linalg.svd(w, compute_uv=False)
    for r in (1, 4, 8):
        a, b = truncated_svd(w, r)
        err2 = np.linalg.norm(w - a @ b) ** 2
        np.testing.assert_allclose(err2, np.sum(sv[r:] ** 2), rtol=1e-10)
        np.testing.assert_allclose(a.T @ a, np.diag(sv[:r]), atol=1e-10)  # singular values split
        np.testing.assert_allclose(b @ b.T, np.diag(sv[:r]), atol=1e-10)  # evenly: sqrt each side
        best_als = np.linalg.norm(w - _als_best(w, np.eye(9), r, seed=r))
        assert np.sqrt(err2) <= best_als + 1e-9


@pytest.mark.parametrize("rank", [0, 14, 2.5])
def test_rank_validation(rank):
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, min"):
        truncated_svd(np.ones((13, 20)), rank)


def test_weight_validation():
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(np.ones(5), 1)
    with pytest.raises(ValueError, match="non-finite"):
        lowrank_factors(np.full((3, 3), np.nan), 1)


# ---------------------------------------------------------------- ASVD scales


def test_act_scales_values_and_guards():
    v = np.array([1.0, 4.0, 16.0, 0.25])
    s = act_scales(v, alpha=0.5)
    np.testing.assert_allclose(np.exp(np.mean(np.log(s))), 1.0, rtol=1e-12)
    np.testing.assert_allclose(s / s[0], np.sqrt(v), rtol=1e-12)
    g = act_scales(np.array([2.0, 0.0, np.nan, -1.0, 8.0, np.inf]), alpha=1.0)
    assert np.all(np.isfinite(g)) and np.all(g > 0)
    np.testing.assert_allclose(g[[1, 2, 3]], g[0], rtol=1e-12)  # replaced by smallest positive
    np.testing.assert_allclose(g[5], g[4], rtol=1e-12)  # +inf by the largest finite
    np.testing.assert_allclose(act_scales(np.zeros(4)), np.ones(4))
    np.testing.assert_allclose(act_scales(v, alpha=0.0), np.ones(4))
    with pytest.raises(ValueError, match="alpha"):
        act_scales(v, alpha=-1.0)
    with pytest.raises(ValueError, match="empty"):
        act_scales(np.array([]))


# ---------------------------------------------------------------- whitening


def test_whitening_full_rank_is_exact_cholesky(layer):
    _, _, g = layer
    wh = whiten(g)
    assert wh.method == "cholesky" and wh.damping == 0.0
    np.testing.assert_allclose(wh.s @ wh.s.T, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())
    np.testing.assert_array_equal(np.triu(wh.s, 1), 0.0)
    np.testing.assert_allclose(wh.s @ wh.s_inv, np.eye(N), atol=1e-9)
    s, s_inv = whitening(g)
    np.testing.assert_array_equal(s, wh.s)
    np.testing.assert_array_equal(s_inv, wh.s_inv)


def test_whitening_rank_deficient_fewer_tokens_than_channels():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, N))  # rank 5 < 16 channels
    g = x.T @ x
    wh = whiten(g)
    assert wh.method == "cholesky" and 0 < wh.damping <= 1e-5
    mean_diag = np.mean(np.diag(g))
    np.testing.assert_allclose(wh.s @ wh.s.T, g + wh.damping * mean_diag * np.eye(N), atol=1e-9)
    np.testing.assert_allclose(wh.s @ wh.s_inv, np.eye(N), atol=1e-8)
    w = rng.standard_normal((M, N))
    a, b = lowrank_factors(w, 5, "whiten", gram=g)  # W X^T has rank 5: calibration error ~0
    assert _cal_err(w, a @ b, x) < 1e-4 * np.linalg.norm(w @ x.T)
    a, b = lowrank_factors(w, N, "whiten", gram=g)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)


def test_whitening_dead_channel(layer):
    w, x, _ = layer
    x = x.copy()
    x[:, 3] = 0.0
    g = x.T @ x
    wh = whiten(g)
    assert wh.damping > 0 and np.all(np.isfinite(wh.s_inv))
    assert np.abs(wh.s_inv).max() < 1e4 * np.abs(np.linalg.pinv(wh.s)).max()
    np.testing.assert_allclose(wh.s @ wh.s_inv, np.eye(N), atol=1e-8)
    a, b = lowrank_factors(w, N, "whiten", gram=g)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)
    sv = spectrum(w, "whiten", gram=g)
    a, b = lowrank_factors(w, 6, "whiten", gram=g)  # damping is tiny: tail still ~ the error
    np.testing.assert_allclose(_cal_err(w, a @ b, x) ** 2, np.sum(sv[6:] ** 2), rtol=1e-4)


def test_whitening_slightly_indefinite(layer):
    _, _, g = layer
    lam, q = np.linalg.eigh(g)
    lam[:3] = -1e-9 * np.mean(np.diag(g))  # round-off style negative eigenvalues
    g_bad = (q * lam) @ q.T
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(g_bad)
    wh = whiten(g_bad)
    assert wh.method == "cholesky" and 0 < wh.damping <= 1e-6
    np.testing.assert_allclose(wh.s @ wh.s.T, g_bad, atol=2e-6 * np.mean(np.diag(g)))


def test_whitening_strongly_indefinite_falls_back_to_eigen():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    lam = np.array([-3.0, 0.0, 1.0, 2.0, 4.0, 8.0])  # -3 is far beyond any damping (1e-1 * 2)
    g = (q * lam) @ q.T
    wh = whiten(g, damp=1e-6)
    assert wh.method == "eigen"
    floor = 1e-6 * np.mean(lam)
    np.testing.assert_allclose(wh.s @ wh.s.T, (q * np.maximum(lam, floor)) @ q.T, atol=1e-9)
    np.testing.assert_allclose(wh.s @ wh.s_inv, np.eye(6), atol=1e-8)
    np.testing.assert_allclose(wh.s_inv @ wh.s, np.eye(6), atol=1e-8)


def test_whitening_zero_gram_and_validation():
    s, s_inv = whitening(np.zeros((4, 4)))
    np.testing.assert_array_equal(s, np.eye(4))
    np.testing.assert_array_equal(s_inv, np.eye(4))
    with pytest.raises(ValueError, match="square"):
        whitening(np.ones((3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        whitening(np.full((3, 3), np.inf))
    with pytest.raises(ValueError, match="damp"):
        whitening(np.eye(3), damp=-1.0)


# ---------------------------------------------------------------- transforms and spectra


def test_transform_for(layer):
    _, x, g = layer
    assert transform_for("svd", N) == (None, None)
    am = np.abs(x).mean(axis=0)
    t, t_inv = transform_for("asvd", N, abs_mean=am, alpha=0.5)
    np.testing.assert_allclose(np.diag(t), act_scales(am, 0.5))
    np.testing.assert_allclose(t @ t_inv, np.eye(N), atol=1e-12)
    np.testing.assert_array_equal(t, np.diag(np.diag(t)))
    t, t_inv = transform_for("whiten", N, gram=g)
    np.testing.assert_allclose(t @ t.T, g, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="unknown low-rank method 'pca'"):
        transform_for("pca", N)
    with pytest.raises(ValueError, match="needs gram"):
        transform_for("whiten", N)
    with pytest.raises(ValueError, match="needs abs_mean"):
        transform_for("asvd", N)
    with pytest.raises(ValueError, match=r"gram must be \[8, 8\]"):
        transform_for("whiten", 8, gram=g)
    with pytest.raises(ValueError, match="abs_mean must have 8 entries"):
        transform_for("asvd", 8, abs_mean=am)


def test_spectrum_whiten_tail_is_calibration_error(layer):
    w, x, g = layer
    sv = spectrum(w, "whiten", gram=g)
    assert whiten(g).damping == 0.0 and np.all(np.diff(sv) <= 0)
    for r in (1, 3, 8, 15):
        a, b = lowrank_factors(w, r, "whiten", gram=g)
        np.testing.assert_allclose(_cal_err(w, a @ b, x) ** 2, np.sum(sv[r:] ** 2), rtol=1e-8)
    np.testing.assert_allclose(spectrum(w, "svd"), np.linalg.svd(w, compute_uv=False))
    am = np.abs(x).mean(axis=0)
    s = act_scales(am)
    np.testing.assert_allclose(
        spectrum(w, "asvd", abs_mean=am), np.linalg.svd(w * s, compute_uv=False), rtol=1e-12
    )


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_full_rank_reproduces(layer, method):
    w, x, g = layer
    a, b = lowrank_factors(w, N, method, gram=g, abs_mean=np.abs(x).mean(axis=0))
    assert a.shape == (M, N) and b.shape == (N, N)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)


def test_whitened_is_optimal_in_calibration_error(layer):
    w, x, g = layer
    am = np.abs(x).mean(axis=0)
    for r in (2, 5):
        errs = {
            m: _cal_err(w, np.matmul(*lowrank_factors(w, r, m, gram=g, abs_mean=am)), x)
            for m in ("svd", "asvd", "whiten")
        }
        assert errs["whiten"] < 0.8 * errs["svd"] and errs["whiten"] < errs["asvd"]
        for seed in range(3):
            assert errs["whiten"] <= _cal_err(w, _als_best(w, g, r, seed), x) * (1 + 1e-9)


def test_asvd_is_optimal_in_scaled_norm(layer):
    w, x, _ = layer
    am = np.abs(x).mean(axis=0)
    s = act_scales(am, 0.5)
    sv = spectrum(w, "asvd", abs_mean=am)
    for r in (2, 6):
        a, b = lowrank_factors(w, r, "asvd", abs_mean=am)
        err = np.linalg.norm((w - a @ b) * s)
        np.testing.assert_allclose(err**2, np.sum(sv[r:] ** 2), rtol=1e-10)
        assert err < np.linalg.norm((w - np.matmul(*truncated_svd(w, r))) * s)


# ---------------------------------------------------------------- rank choice


def test_param_counts_and_ratio():
    assert params_dense(64, 32) == 2048 and params_lowrank(64, 32, 5) == 480
    assert max_useful_rank(64, 64) == 31  # 32 * 128 == 4096 saves nothing
    assert max_useful_rank(2, 2) == 0
    assert rank_for_ratio(64, 64, 0.5) == 16
    assert rank_for_ratio(64, 64, 1.0) is None and rank_for_ratio(64, 64, 0.01) is None
    for m, n in itertools.product((3, 8, 20, 64), (5, 8, 48)):
        for keep in (0.05, 0.3, 0.5, 0.8, 0.99, 1.0, 1.3):
            ok = [r for r in range(1, min(m, n) + 1) if r * (m + n) <= keep * m * n]
            want = max(ok) if ok and max(ok) * (m + n) < m * n else None
            assert rank_for_ratio(m, n, keep) == want, (m, n, keep)
    with pytest.raises(ValueError, match="keep"):
        rank_for_ratio(8, 8, 0.0)


def test_rank_for_energy():
    sv = np.array([3.0, 2.0, 1.0])  # energies 9, 13, 14
    assert rank_for_energy(sv, 9 / 14) == 1
    assert rank_for_energy(sv, 0.65) == 2
    assert rank_for_energy(sv, 1.0) == 3
    assert rank_for_energy(sv[::-1], 0.65) == 2
    assert rank_for_energy(np.zeros(4), 0.9) == 1
    rng = np.random.default_rng(4)
    for _ in range(50):
        s = np.sort(rng.random(10))[::-1]
        e = rng.random()
        want = min(r for r in range(1, 11) if np.sum(s[:r] ** 2) >= e * np.sum(s**2))
        assert rank_for_energy(s, e) == want
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(sv, 0.0)


def _options(m, n, sv, step):
    e2 = np.asarray(sv) ** 2
    out = [(None, m * n, 0.0)]
    for r in range(step, (m * n - 1) // (m + n) + 1, step):
        out.append((r, r * (m + n), float(e2[r:].sum() / e2.sum())))
    return out


def _brute(layers, budget, step):
    best = None
    for combo in itertools.product(*[_options(m, n, sv, step) for m, n, sv in layers]):
        cost, err = sum(c for _, c, _ in combo), sum(e for _, _, e in combo)
        if cost <= budget and (best is None or err < best[0] - 1e-15):
            best = (err, [r for r, _, _ in combo])
    return best


def _score(layers, ranks, step):
    cost = err = 0.0
    for (m, n, sv), r in zip(layers, ranks):
        opts = {o[0]: o for o in _options(m, n, sv, step)}
        assert r in opts, f"rank {r} is not an allowed option"
        cost, err = cost + opts[r][1], err + opts[r][2]
    return cost, err


def _lagrangian_bracket(layers, budget, step):
    """Errors of the global lower-hull vertices (over all option combinations) around budget:
    the best Lagrangian solution within budget and the next one; the optimum lies between."""
    pts = sorted(
        (sum(c for _, c, _ in combo), sum(e for _, _, e in combo))
        for combo in itertools.product(*[_options(m, n, sv, step) for m, n, sv in layers])
    )
    hull: list = []
    for p in pts:
        while len(hull) >= 2:
            (c1, e1), (c2, e2) = hull[-2], hull[-1]
            if (e2 - e1) * (p[0] - c1) >= (p[1] - e1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    i = max(j for j, (c, _) in enumerate(hull) if c <= budget)
    return hull[i][1], hull[min(i + 1, len(hull) - 1)][1]


def _random_layers(rng):
    layers = []
    for m, n in ((32, 24), (40, 16), (24, 24)):
        sv = np.sort(rng.random(min(m, n)) ** rng.uniform(1, 6))[::-1]
        layers.append((m, n, sv))
    return layers


@pytest.mark.parametrize("seed", range(6))
def test_allocate_ranks_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers, step = _random_layers(rng), 2
    dense = sum(m * n for m, n, _ in layers)
    cheapest = sum(step * (m + n) for m, n, _ in layers)
    exact, budgets = 0, np.linspace(cheapest, dense, 40)
    for budget in budgets:
        ranks = allocate_ranks(layers, budget, step=step)
        cost, err = _score(layers, ranks, step)
        opt, _ = _brute(layers, budget, step)
        e_left, e_right = _lagrangian_bracket(layers, budget, step)
        assert cost <= budget
        # At least as good as the best Lagrangian solution within budget, so the margin to the
        # optimum is at most that hull segment's error drop (measured worst gap: 0.057).
        assert opt - 1e-12 <= err <= e_left + 1e-12
        assert err - opt <= e_left - e_right + 1e-12
        exact += err <= opt + 1e-12
        for (m, n, sv), r in zip(layers, ranks):  # leftover spent: no better option still fits
            now = next(o for o in _options(m, n, sv, step) if o[0] == r)
            for _, c, e in _options(m, n, sv, step):
                assert not (e < now[2] and cost - now[1] + c <= budget)
    assert exact >= 0.75 * len(budgets)  # measured 33..39 of 40
    # Everett: a budget equal to the cost of a Lagrangian solution is met exactly and optimally.
    for lam in np.geomspace(1e-6, 1e-2, 15):
        picks = [
            min(_options(m, n, sv, step), key=lambda o: (o[2] + lam * o[1], o[1]))
            for m, n, sv in layers
        ]
        budget = sum(o[1] for o in picks)
        cost, err = _score(layers, allocate_ranks(layers, budget, step=step), step)
        assert cost <= budget and abs(err - _brute(layers, budget, step)[0]) < 1e-12


def test_allocate_ranks_edges():
    rng = np.random.default_rng(7)
    layers = _random_layers(rng) + [(4, 4, np.ones(4))]  # 4x4: rank 8 > max_useful_rank 1
    step = 8
    dense = sum(m * n for m, n, _ in layers)
    assert allocate_ranks(layers, dense, step=step) == [None] * 4
    cheapest = sum(step * (m + n) for m, n, _ in layers[:3]) + 16
    assert allocate_ranks(layers, cheapest, step=step) == [8, 8, 8, None]
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate_ranks(layers, cheapest - 1, step=step)
    with pytest.raises(ValueError, match="step"):
        allocate_ranks(layers, dense, step=0)
    ranks = allocate_ranks(layers, 0.8 * dense, step=step)
    assert all(r is None or r % step == 0 for r in ranks) and ranks[3] is None


# ---------------------------------------------------------------- LQ-LoRA and EoRA


def _int4_rtn(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max(axis=1, keepdims=True) / 7.0
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale), -8, 7) * scale


def test_lq_decompose_beats_plain_quantization():
    rng = np.random.default_rng(8)
    w = 3.0 * rng.standard_normal((48, 4)) @ rng.standard_normal((4, 40))
    w += 0.3 * rng.standard_normal((48, 40))
    w[:, 5] += 20.0 * rng.standard_normal(48)  # an outlier column that hurts per-row int4
    # Measured (rank 5): plain int4 0.134; iterates 0.0916, 0.0862, ..., 0.0841 (best), 0.0842.
    q, a, b, errors = lq_decompose(w, 5, _int4_rtn, iters=8)
    assert len(errors) == 8 and a.shape == (48, 5) and b.shape == (5, 40)
    kept = np.linalg.norm(w - q - a @ b) / np.linalg.norm(w)
    np.testing.assert_allclose(kept, min(errors), rtol=1e-12)
    assert kept < 0.95 * errors[0] and errors[-1] > kept  # iterating helps; the best is kept
    plain = np.linalg.norm(w - _int4_rtn(w)) / np.linalg.norm(w)
    assert kept < 0.7 * plain
    with pytest.raises(ValueError, match="quantize returned shape"):
        lq_decompose(w, 2, lambda z: z[:, :3])
    with pytest.raises(ValueError, match="iters"):
        lq_decompose(w, 2, _int4_rtn, iters=0)


def test_eora_is_optimal_and_beats_plain_svd(layer):
    w, x, g = layer
    dw = w - _int4_rtn(w)
    lam, q = np.linalg.eigh(g)
    s_eig = q * np.sqrt(lam)  # EoRA's eigen-form, independent of the Cholesky used inside
    sv = np.linalg.svd(dw @ s_eig, compute_uv=False)
    for r in (2, 4, 10):  # measured ratios to plain SVD: 0.68, 0.41, 0.08
        a, b = eora(dw, g, r)
        err = _cal_err(dw, a @ b, x)
        np.testing.assert_allclose(err**2, np.sum(sv[r:] ** 2), rtol=1e-8)
        assert err < 0.75 * _cal_err(dw, np.matmul(*truncated_svd(dw, r)), x)
        assert err <= _cal_err(dw, _als_best(dw, g, r, seed=r), x) * (1 + 1e-9)
    a, b = eora(dw, g, N)
    np.testing.assert_allclose(a @ b, dw, atol=1e-10)
