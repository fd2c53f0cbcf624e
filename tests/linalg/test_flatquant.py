"""Learned Kronecker transforms: exact fold, invertibility, and a lower quantized error."""

import numpy as np
import pytest
import torch

from rotaq.linalg.flatquant import (
    KronTransform,
    calibrate_kron,
    fake_quant_tokens,
    fake_quant_weight,
)

RNG = np.random.default_rng(0)


def _data(t=256, n=48, m=32, outliers=True):
    x = RNG.normal(size=(t, n))
    if outliers:
        x[:, [3, 17]] *= 25.0  # channel outliers, as in LLM activations
    ws = [RNG.normal(size=(m, n)) / np.sqrt(n) for _ in range(2)]
    return x, ws


def test_fold_is_exact_float64():
    x, ws = _data()
    p1 = RNG.normal(size=(6, 6)) + 3 * np.eye(6)
    p2 = RNG.normal(size=(8, 8)) + 3 * np.eye(8)
    d = np.exp(RNG.normal(size=48) * 0.3)
    t = KronTransform(p1, p2, d, 0.0, 0.0)
    p = t.dense()
    np.testing.assert_allclose(p, d[:, None] * np.kron(p1, p2), atol=1e-12)
    for w in ws:
        folded = t.fold(w)
        np.testing.assert_allclose(folded, w @ np.linalg.inv(p).T, atol=1e-10)
        np.testing.assert_allclose((x @ p) @ folded.T, x @ w.T, atol=1e-9)


def test_calibration_lowers_w4a4_error_and_stays_invertible():
    x, ws = _data()
    t = calibrate_kron(x, ws, (6, 8), w_bits=4, a_bits=4, iters=150, lr=1e-2)
    assert t.loss_final < 0.8 * t.loss_init  # outlier channels: a learned P helps a lot
    p = t.dense()
    assert np.linalg.cond(p) < 1e4
    for w in ws:  # the float rewrite is still exact
        np.testing.assert_allclose((x @ p) @ t.fold(w).T, x @ w.T, rtol=1e-7, atol=1e-7)


def test_identity_when_no_iterations():
    x, ws = _data()
    t = calibrate_kron(x, ws, (6, 8), iters=0)
    np.testing.assert_array_equal(t.p1, np.eye(6))
    assert t.scale is not None and np.all(t.scale == 1.0)
    assert t.loss_final == t.loss_init


def test_quantizers_match_their_definition():
    w = torch.tensor(RNG.normal(size=(4, 10)))
    q = fake_quant_weight(w, 4, 4, symmetric=True)  # ragged last group of 2
    wp = np.pad(w.numpy(), ((0, 0), (0, 2))).reshape(4, 3, 4)
    s = np.abs(wp).max(-1, keepdims=True) / 7
    ref = (np.clip(np.round(wp / s), -8, 7) * s).reshape(4, 12)[:, :10]
    np.testing.assert_allclose(q.numpy(), ref, atol=1e-12)
    x = torch.tensor(RNG.normal(size=(3, 8)))
    xq = fake_quant_tokens(x, 4, clip=1.0).numpy()
    s = np.abs(x.numpy()).max(-1, keepdims=True) / 7
    np.testing.assert_allclose(xq, np.clip(np.round(x.numpy() / s), -8, 7) * s, atol=1e-12)


def test_bad_split():
    x, ws = _data()
    with pytest.raises(ValueError, match="does not give"):
        calibrate_kron(x, ws, (5, 8))
