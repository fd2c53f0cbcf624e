"""Tests for rotaq.linalg.formats: e4m3 / e2m1 grids, QFormat validation, fp8/mxfp4/nvfp4 scales."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from rotaq.linalg.formats import (
    FP4_E2M1_VALUES,
    FP8_E4M3_MAX,
    QFormat,
    round_fp4_e2m1,
    round_fp8_e4m3,
)
from rotaq.linalg.quant import fake_quantize, quant_error, quantize_rtn

E2M1 = np.array(FP4_E2M1_VALUES)


def _torch_e4m3(x: np.ndarray) -> np.ndarray:
    return (
        torch.from_numpy(np.asarray(x, dtype=np.float64)).to(torch.float8_e4m3fn).double().numpy()
    )


def _all_e4m3() -> np.ndarray:
    """Every finite e4m3fn value (253 distinct: 254 bit patterns minus the duplicate zero)."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    return np.unique(v[np.isfinite(v)])


def _is_e4m3(x: np.ndarray) -> np.ndarray:
    return np.isin(np.abs(x), _all_e4m3())


# ---------------------------------------------------------------- element grids


def test_e4m3_grid_facts():
    v = _all_e4m3()
    assert v.size == 253
    assert v.max() == FP8_E4M3_MAX == 448.0
    assert v[v > 0].min() == 2.0**-9
    np.testing.assert_array_equal(round_fp8_e4m3(v), v)


def test_fp8_matches_torch_random_and_ties():
    rng = np.random.default_rng(0)
    mags = 2.0 ** rng.uniform(-14, np.log2(448), 200_000)  # deep subnormal .. max
    x = np.concatenate([mags * rng.choice([-1, 1], mags.size), rng.standard_normal(50_000)])
    np.testing.assert_array_equal(round_fp8_e4m3(x), _torch_e4m3(x))
    # exact midpoints between neighbours (ties to even), including the subnormal range
    v = _all_e4m3()
    mids = np.concatenate([(v[1:] + v[:-1]) / 2, -(v[1:] + v[:-1]) / 2])
    np.testing.assert_array_equal(round_fp8_e4m3(mids), _torch_e4m3(mids))
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(round_fp8_e4m3(x32), _torch_e4m3(x32))


def test_fp8_saturation_and_specials():
    x = np.array([448.0, 449.0, 464.0, 500.0, 1e9, np.inf, -1e9, -np.inf, 0.0, -0.0, 2.0**-11])
    r = round_fp8_e4m3(x)
    np.testing.assert_array_equal(r, [448, 448, 448, 448, 448, 448, -448, -448, 0, 0, 0])
    assert np.signbit(r[9])
    clipped = np.clip(x[:8], -448, 448)
    np.testing.assert_array_equal(r[:8], _torch_e4m3(clipped))
    assert np.isnan(round_fp8_e4m3(np.array([np.nan])))[0]


def test_e2m1_representable_and_midpoints():
    signed = np.concatenate([E2M1, -E2M1])
    np.testing.assert_array_equal(round_fp4_e2m1(signed), signed)
    mids = (E2M1[1:] + E2M1[:-1]) / 2  # 0.25 .75 1.25 1.75 2.5 3.5 5
    expect = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # ties to the even mantissa
    np.testing.assert_array_equal(round_fp4_e2m1(mids), expect)
    np.testing.assert_array_equal(round_fp4_e2m1(-mids), -expect)
    eps = 1e-9
    np.testing.assert_array_equal(round_fp4_e2m1(mids - eps), E2M1[:-1])
    np.testing.assert_array_equal(round_fp4_e2m1(mids + eps), E2M1[1:])
    np.testing.assert_array_equal(
        round_fp4_e2m1(np.array([6.1, 7.0, 100.0, -np.inf])), [6, 6, 6, -6]
    )


def test_e2m1_matches_ml_dtypes():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-8, 8, 100_000), (E2M1[1:] + E2M1[:-1]) / 2])
    ref = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    np.testing.assert_array_equal(round_fp4_e2m1(x), ref)


# ---------------------------------------------------------------- QFormat


def test_qformat_ranges_and_normalization():
    assert (QFormat(bits=4).qmin, QFormat(bits=4).qmax) == (-8, 7)
    assert (QFormat(bits=8).qmin, QFormat(bits=8).qmax) == (-128, 127)
    assert (QFormat(bits=2).qmin, QFormat(bits=2).qmax) == (-2, 1)
    assert (QFormat(bits=3, symmetric=False).qmin, QFormat(bits=3, symmetric=False).qmax) == (0, 7)
    mx, nv, f8 = QFormat(kind="mxfp4"), QFormat(kind="nvfp4"), QFormat(kind="fp8_e4m3")
    assert (mx.group_size, mx.bits, mx.qmax) == (32, 4, 6.0)
    assert (nv.group_size, nv.bits, nv.qmin) == (16, 4, -6.0)
    assert (f8.group_size, f8.bits, f8.qmax) == (-1, 8, 448.0)
    assert QFormat(kind="nvfp4") == QFormat(kind="nvfp4", group_size=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "int5"}, "kind"),
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"clip": "percentile"}, "clip"),
        ({"kind": "fp8_e4m3", "symmetric": False}, "symmetric"),
        ({"kind": "mxfp4", "group_size": 16}, "blocks of 32"),
        ({"kind": "nvfp4", "group_size": 32}, "blocks of 16"),
    ],
)
def test_qformat_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QFormat(**kwargs)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size 32 does not divide in_features 48"):
        quantize_rtn(np.ones((4, 48)), QFormat(bits=4, group_size=32))
    with pytest.raises(ValueError, match="16 does not divide in_features 40"):
        quantize_rtn(np.ones((4, 40)), QFormat(kind="nvfp4"))
    assert QFormat(group_size=64).resolve_group_size(256) == 64
    assert QFormat().resolve_group_size(96) == 96


# ---------------------------------------------------------------- float weight formats


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((128, 256))


def test_fp8_weight_scales(gauss):
    for gs in (-1, 64):
        q = quantize_rtn(gauss, QFormat(kind="fp8_e4m3", group_size=gs))
        g = 256 if gs == -1 else gs
        amax = np.abs(gauss.reshape(128, -1, g)).max(-1)
        np.testing.assert_allclose(q.scale, amax / 448, rtol=1e-15)
        assert q.codes.dtype == np.float64
        assert np.all(_is_e4m3(q.codes))
        np.testing.assert_array_equal(np.abs(q.codes.reshape(128, -1, g)).max(-1), 448.0)
        assert q.zero is None


def test_mxfp4_scales_are_powers_of_two(gauss):
    q = quantize_rtn(gauss * 0.01, QFormat(kind="mxfp4"))
    assert q.scale.shape == (128, 8)
    e = np.log2(q.scale)
    np.testing.assert_array_equal(e, np.round(e))
    amax = np.abs(gauss * 0.01).reshape(128, 8, 32).max(-1)
    ratio = amax / q.scale  # the OCP rule puts amax in [4, 8) scale units
    assert np.all((ratio >= 4) & (ratio < 8))
    assert np.all(np.isin(np.abs(q.codes), E2M1))


def test_nvfp4_block_scales_are_e4m3_times_global(gauss):
    w = gauss * 3.0
    q = quantize_rtn(w, QFormat(kind="nvfp4"))
    assert q.scale.shape == (128, 16)
    assert q.global_scale == pytest.approx(np.abs(w).max() / (448 * 6), rel=1e-15)
    s8 = q.scale / q.global_scale
    np.testing.assert_allclose(round_fp8_e4m3(s8), s8, rtol=1e-14)
    assert np.all(_is_e4m3(round_fp8_e4m3(s8)))
    assert s8.max() == 448.0  # the block holding the tensor amax uses the top of the fp8 range
    assert np.all(np.isin(np.abs(q.codes), E2M1))


def test_float_format_error_ordering(gauss):
    err = {
        k: quant_error(gauss, fake_quantize(gauss, QFormat(kind=k)))
        for k in ("fp8_e4m3", "nvfp4", "mxfp4")
    }
    # measured: fp8 0.026, nvfp4 0.095, mxfp4 0.115
    assert err["fp8_e4m3"] < 0.035
    assert err["nvfp4"] < 0.9 * err["mxfp4"]
    assert 0.08 < err["nvfp4"] < 0.11 and 0.10 < err["mxfp4"] < 0.13


def test_zero_groups_keep_positive_scales():
    w = np.zeros((3, 64))
    w[0, :16] = 1.0
    for fmt in (
        QFormat(bits=4, group_size=16),
        QFormat(bits=4, symmetric=False, group_size=16),
        QFormat(kind="fp8_e4m3", group_size=16),
        QFormat(kind="mxfp4"),
        QFormat(kind="nvfp4"),
        QFormat(kind="nvfp4", clip="mse"),
    ):
        q = quantize_rtn(w, fmt)
        assert np.all(q.scale > 0)
        np.testing.assert_array_equal(q.dequantize(), w)
    q = quantize_rtn(np.zeros((2, 32)), QFormat(kind="nvfp4"))
    assert np.all(q.scale > 0) and np.all(q.dequantize() == 0)
