"""Tests for rotaq.linalg.quant: weight RTN (int, clip search) and activation quantizers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rotaq.linalg.formats import decode, encode, group_params
from rotaq.linalg.quant import (
    QFormat,
    QuantizedWeight,
    calibrate_per_tensor,
    fake_quantize,
    quant_error,
    quantize_per_tensor,
    quantize_per_token,
    quantize_rtn,
    search_act_clip,
)

TOL = 1e-12


@pytest.fixture(scope="module")
def heavy() -> np.ndarray:
    """Student-t(3) weights: heavy tails make range clipping and small groups pay off."""
    return np.random.default_rng(0).standard_t(3, size=(64, 256))


def _groups(a: np.ndarray, g: int) -> np.ndarray:
    return a.reshape(a.shape[0], -1, g)


def _expand(s: np.ndarray, n_in: int) -> np.ndarray:
    return np.repeat(s, n_in // s.shape[1], axis=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_rtn_symmetric_bounds(heavy, bits, group_size):
    fmt = QFormat(bits=bits, group_size=group_size)
    q = quantize_rtn(heavy, fmt)
    g = fmt.resolve_group_size(256)
    qmax = 2 ** (bits - 1) - 1
    assert q.codes.dtype == np.int32 and q.codes.shape == heavy.shape
    assert q.scale.shape == (64, 256 // g) and q.zero is None
    np.testing.assert_allclose(q.scale, np.abs(_groups(heavy, g)).max(-1) / qmax, rtol=1e-15)
    assert q.codes.min() >= -(qmax + 1) and q.codes.max() <= qmax
    assert q.codes.min() >= -qmax  # without clipping the extra negative code stays unused
    deq = q.dequantize()
    assert np.all(np.abs(heavy - deq) <= _expand(q.scale, 256) / 2 * (1 + TOL))
    np.testing.assert_array_equal(deq, _expand(q.scale, 256) * q.codes)
    np.testing.assert_array_equal(fake_quantize(heavy, fmt), deq)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 64])
def test_rtn_asymmetric_bounds(heavy, bits, group_size):
    w = heavy + 0.7  # off-center so the zero points matter
    w[:, 0] = 0.0
    fmt = QFormat(bits=bits, symmetric=False, group_size=group_size)
    q = quantize_rtn(w, fmt)
    g = fmt.resolve_group_size(256)
    qmax = 2**bits - 1
    lo = np.minimum(_groups(w, g).min(-1), 0)
    hi = np.maximum(_groups(w, g).max(-1), 0)
    np.testing.assert_allclose(q.scale, (hi - lo) / qmax, rtol=1e-15)
    assert q.zero is not None and q.zero.dtype == np.int32 and q.zero.shape == q.scale.shape
    assert q.zero.min() >= 0 and q.zero.max() <= qmax
    assert q.codes.min() >= 0 and q.codes.max() <= qmax
    deq = q.dequantize()
    assert np.all(np.abs(w - deq) <= _expand(q.scale, 256) / 2 * (1 + TOL))
    np.testing.assert_array_equal(deq[:, 0], 0.0)  # zero is exactly representable
    np.testing.assert_array_equal(deq, (q.codes - _expand(q.zero, 256)) * _expand(q.scale, 256))


def test_rtn_int_error_levels(heavy):
    errs = [
        quant_error(heavy, fake_quantize(heavy, QFormat(bits=b, group_size=32)))
        for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01  # int8 g32 on t(3) weights: measured 0.0055


def test_smaller_groups_lower_error(heavy):
    err = {
        g: quant_error(heavy, fake_quantize(heavy, QFormat(bits=4, group_size=g)))
        for g in (-1, 128, 64, 32, 16)
    }
    vals = [err[g] for g in (-1, 128, 64, 32, 16)]
    assert all(a > 1.05 * b for a, b in itertools.pairwise(vals))


# (format, bound on total squared error with MSE clip / without); measured on t(3) weights:
# int4 g32 0.83, int3 per-channel 0.53, asym int4 g64 0.94, int8 0.9998, fp8 0.93, mxfp4 1.0
# (a power-of-two scale can only halve, which saturates too much), nvfp4 0.92.
MSE_CASES = [
    (QFormat(bits=4, group_size=32), 0.88),
    (QFormat(bits=3, group_size=-1), 0.6),
    (QFormat(bits=4, symmetric=False, group_size=64), 0.97),
    (QFormat(bits=8, group_size=-1), 1.0),
    (QFormat(kind="fp8_e4m3", group_size=32), 0.96),
    (QFormat(kind="mxfp4"), 1.0),
    (QFormat(kind="nvfp4"), 0.95),
]


@pytest.mark.parametrize(
    "fmt, bound",
    MSE_CASES,
    ids=[f"{f.kind}{f.bits}{'s' if f.symmetric else 'a'}g{f.group_size}" for f, _ in MSE_CASES],
)
def test_mse_clip_never_worse_per_group(heavy, fmt, bound):
    clipped = QFormat(fmt.kind, fmt.bits, fmt.symmetric, fmt.group_size, clip="mse")
    g = fmt.resolve_group_size(256)
    e0 = np.square(_groups(heavy - fake_quantize(heavy, fmt), g)).sum(-1)
    e1 = np.square(_groups(heavy - fake_quantize(heavy, clipped), g)).sum(-1)
    assert np.all(e1 <= e0)
    assert e1.sum() <= bound * e0.sum()
    if bound < 1.0:
        assert np.sum(e1 < e0) > 0


def test_mse_clip_uses_extra_code_and_clips(heavy):
    fmt = QFormat(bits=4, group_size=32, clip="mse")
    q = quantize_rtn(heavy, fmt)
    full = quantize_rtn(heavy, QFormat(bits=4, group_size=32))
    assert np.any(q.scale < full.scale)  # some groups clip
    assert q.codes.min() >= -8 and q.codes.max() <= 7
    deq, s = q.dequantize(), _expand(q.scale, 256)
    inside = (heavy >= -8 * s) & (heavy <= 7 * s)
    assert np.all(np.abs(heavy - deq)[inside] <= s[inside] / 2 * (1 + TOL))
    np.testing.assert_array_equal(q.codes[heavy > 7.5 * s], 7)  # clipped: saturated codes
    np.testing.assert_array_equal(q.codes[heavy < -8.5 * s], -8)
    assert np.any(heavy > 7.5 * s)


def test_quantized_weight_roundtrip_helpers(heavy):
    fmt = QFormat(bits=4, symmetric=False, group_size=64)
    s, z = group_params(heavy.reshape(64, 4, 64), fmt)
    c = encode(heavy.reshape(64, 4, 64), s[..., None], z[..., None], fmt)
    qw = QuantizedWeight(c.reshape(64, 256), s, z, fmt)
    np.testing.assert_array_equal(qw.dequantize(), fake_quantize(heavy, fmt))
    assert (qw.n_groups, qw.group_size) == (4, 64)
    np.testing.assert_array_equal(decode(np.array([3, 5]), 0.5, np.array([1, 1])), [1.0, 2.0])


def test_rtn_rejects_bad_weights():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.ones(8), QFormat())
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(np.array([[1.0, np.nan]]), QFormat())


def test_quant_error():
    w = np.array([[3.0, 4.0]])
    assert quant_error(w, w) == 0.0
    assert quant_error(w, np.zeros_like(w)) == 1.0
    assert quant_error(w, w + [[0.0, 0.5]]) == pytest.approx(0.1)
    assert quant_error(np.zeros(2), np.zeros(2)) == 0.0
    assert quant_error(np.zeros(2), np.ones(2)) == float("inf")


# ---------------------------------------------------------------- activations


@pytest.fixture(scope="module")
def acts() -> np.ndarray:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32, 96)) * rng.uniform(0.1, 5, size=(4, 32, 1))
    x[0, 0] = 0.0
    return x


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_symmetric_bound(acts, bits):
    y = quantize_per_token(acts, bits=bits)
    assert y.shape == acts.shape
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(acts).max(-1, keepdims=True) / qmax
    assert np.all(np.abs(acts - y) <= scale / 2 * (1 + TOL))
    np.testing.assert_array_equal(y[0, 0], 0.0)
    codes = y / np.where(scale > 0, scale, 1)
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-9)


def test_per_token_asymmetric_and_clip(acts):
    x = acts + 1.5
    y = quantize_per_token(x, bits=8, symmetric=False)
    scale = np.maximum(x.max(-1, keepdims=True), 0) - np.minimum(x.min(-1, keepdims=True), 0)
    assert np.all(np.abs(x - y) <= scale / 255 / 2 * (1 + TOL))
    yc = quantize_per_token(acts, bits=4, clip_ratio=0.8)
    lim = 0.8 * np.abs(acts).max(-1, keepdims=True)
    assert np.all(np.abs(yc) <= lim * 8 / 7 * (1 + TOL))  # codes reach -8 with clipping
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_per_token(acts, clip_ratio=1.5)


def test_per_tensor_minmax_calibration(acts):
    scale, zp = calibrate_per_tensor(acts, bits=8)
    lo, hi = acts.min(), acts.max()
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-15)
    assert zp == int(np.rint(-lo / scale)) and 0 <= zp <= 255
    y = quantize_per_tensor(acts, scale, zp)
    assert np.all(np.abs(acts - y) <= scale / 2 * (1 + 1e-9) + 1e-12)
    out = quantize_per_tensor(np.array([hi * 10, lo * 10]), scale, zp)
    np.testing.assert_allclose(out, [(255 - zp) * scale, -zp * scale])  # saturates
    s_sym, zp_sym = calibrate_per_tensor(acts, bits=8, symmetric=True)
    assert zp_sym == 0 and s_sym == pytest.approx(np.abs(acts).max() / 127)
    y = quantize_per_tensor(acts, s_sym, 0, symmetric=True)
    assert np.all(np.abs(acts - y) <= s_sym / 2 * (1 + 1e-9))


def test_per_tensor_matches_torch_fake_quant():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(10_000) * 3).astype(np.float32)
    for bits, sym, zp in ((8, False, 131), (8, True, 0), (4, False, 7)):
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
        scale = 2.0**-4  # power of two: x / scale is exact in float32 and float64
        ref = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), scale, zp, qmin, qmax)
        ours = quantize_per_tensor(x, scale, zp, bits=bits, symmetric=sym)
        np.testing.assert_array_equal(ours, ref.double().numpy())


def test_percentile_calibration_helps_with_outliers():
    rng = np.random.default_rng(5)
    calib = rng.standard_normal(100_000)
    calib[:5] = [80.0, -60.0, 120.0, 90.0, -100.0]
    test = rng.standard_normal(100_000)
    errs = {}
    for method in ("minmax", "percentile"):
        s, zp = calibrate_per_tensor(calib, bits=8, method=method, percentile=99.99)
        errs[method] = np.mean(np.square(test - quantize_per_tensor(test, s, zp)))
    assert errs["percentile"] < 0.05 * errs["minmax"]  # measured ratio about 0.015


def test_calibration_rejects():
    with pytest.raises(ValueError, match="method"):
        calibrate_per_tensor(np.ones(4), method="kl")
    with pytest.raises(ValueError, match="finite"):
        calibrate_per_tensor(np.array([]))
    with pytest.raises(ValueError, match="scale"):
        quantize_per_tensor(np.ones(3), 0.0, 0)


def test_search_act_clip_scores_in_the_output_space():
    """Gaussian tokens (576 channels, int4 per token): clipping at 0.7 beats no clip by ~1.5x,
    and the score is the float64 output error of each reading linear. One planted outlier
    channel: a weight that ignores it wants the smallest clip (saturating it costs nothing);
    a weight that reads only it wants no clip."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 576))
    w = rng.standard_normal((64, 576))
    grid = (0.6, 0.7, 0.8, 0.9, 1.0)
    best, errs = search_act_clip(x, [w], grid)
    for c in grid:  # the documented score, in float64
        d = quantize_per_token(x, 4, True, c) - x
        ref = np.square(d @ w.T).sum() / np.square(x @ w.T).sum()
        assert errs[c] == pytest.approx(ref, rel=1e-4)
    assert best == min(grid, key=errs.get) == 0.7
    assert errs[1.0] > 1.4 * errs[0.7]
    x[:, 5] *= 12.0  # one outlier channel sets every token's step
    ignore, read = w.copy(), np.zeros_like(w)
    ignore[:, 5] = 0.0
    read[:, 5] = 1.0
    assert search_act_clip(x, [ignore], grid)[0] == 0.6
    assert search_act_clip(x, [read], grid)[0] == 1.0
    # two linears on one input: the sum of their relative errors
    both = search_act_clip(x, [ignore, read], grid)[1]
    one, two = search_act_clip(x, [ignore], grid)[1], search_act_clip(x, [read], grid)[1]
    assert all(both[c] == pytest.approx(one[c] + two[c]) for c in grid)
    with pytest.raises(ValueError, match="empty grid"):
        search_act_clip(x, [w], ())
