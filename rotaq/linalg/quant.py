"""Quantizers on arrays: weight RTN and GPTQ, simulated activation quantizers, error helpers.

Weights are ``[out, in]`` (a linear computes ``y = x W^T``); groups run along the input axis.
Formats, their scale conventions and the element grids live in ``rotaq.linalg.formats``; GPTQ
and Hessian accumulation in ``rotaq.linalg.gptq``; both are re-exported here.

Integer rounding is round-half-to-even everywhere (``np.rint``), which is what ONNX
QuantizeLinear and ``torch.round`` do, so simulated and deployed results agree.
"""

from __future__ import annotations

import logging

import numpy as np

from rotaq.linalg.formats import (
    FP4_E2M1_MAX,
    FP4_E2M1_VALUES,
    FP8_E4M3_MAX,
    MSE_CLIP_RATIOS,
    QFormat,
    QuantizedWeight,
    encode,
    group_params,
    nvfp4_global_scale,
    round_fp4_e2m1,
    round_fp8_e4m3,
)
from rotaq.linalg.gptq import HessianAccumulator, gptq, hessian_from_inputs

logger = logging.getLogger(__name__)

__all__ = [
    "FP4_E2M1_MAX",
    "FP4_E2M1_VALUES",
    "FP8_E4M3_MAX",
    "MSE_CLIP_RATIOS",
    "HessianAccumulator",
    "QFormat",
    "QuantizedWeight",
    "calibrate_per_tensor",
    "fake_quantize",
    "gptq",
    "hessian_from_inputs",
    "quant_error",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_rtn",
    "round_fp4_e2m1",
    "round_fp8_e4m3",
]


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight has non-finite entries")
    return w


def quantize_rtn(w: np.ndarray, fmt: QFormat) -> QuantizedWeight:
    """Round-to-nearest: per group ``codes = encode(w / scale)``, scales from the group range.

    With ``fmt.clip == "mse"`` each group's range is shrunk by the ratio minimizing its
    squared error (see ``formats.group_params``).
    """
    w = _check_weight(w)
    out, n_in = w.shape
    gs = fmt.resolve_group_size(n_in)
    wg = w.reshape(out, n_in // gs, gs)
    gscale = nvfp4_global_scale(w) if fmt.kind == "nvfp4" else None
    scale, zero = group_params(wg, fmt, gscale)
    codes = encode(wg, scale[..., None], None if zero is None else zero[..., None], fmt)
    return QuantizedWeight(codes.reshape(out, n_in), scale, zero, fmt, gscale)


def fake_quantize(w: np.ndarray, fmt: QFormat) -> np.ndarray:
    """``quantize_rtn(w, fmt).dequantize()``: the float64 weight a quantized layer computes with."""
    return quantize_rtn(w, fmt).dequantize()


def quant_error(w: np.ndarray, wq: np.ndarray) -> float:
    """Relative Frobenius error ``||w - wq||_F / ||w||_F`` (0 if both are zero, inf if only w)."""
    w = np.asarray(w, dtype=np.float64)
    diff = float(np.linalg.norm(w - np.asarray(wq, dtype=np.float64)))
    ref = float(np.linalg.norm(w))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def _int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be in 2..16, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def quantize_per_token(
    x: np.ndarray, bits: int = 8, symmetric: bool = True, clip_ratio: float = 1.0
) -> np.ndarray:
    """Dynamic per-token (per-row, last axis = channels) fake quantization, float64.

    Symmetric: ``scale = clip_ratio * amax / (2^(b-1) - 1)``, codes in ``[-2^(b-1), 2^(b-1)-1]``.
    Asymmetric: range ``clip_ratio * [min(x_min, 0), max(x_max, 0)]`` over ``2^b - 1`` steps with
    an integer zero point. A zero row keeps scale 1.
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    x = np.asarray(x, dtype=np.float64)
    qmin, qmax = _int_range(bits, symmetric)
    if symmetric:
        scale = clip_ratio * np.abs(x).max(axis=-1, keepdims=True) / qmax
        zero = np.zeros_like(scale)
    else:
        lo = clip_ratio * np.minimum(x.min(axis=-1, keepdims=True), 0.0)
        hi = clip_ratio * np.maximum(x.max(axis=-1, keepdims=True), 0.0)
        scale = (hi - lo) / qmax
        zero = np.clip(np.rint(-lo / np.where(scale > 0, scale, 1.0)), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def calibrate_per_tensor(
    samples: np.ndarray,
    bits: int = 8,
    method: str = "minmax",
    percentile: float = 99.99,
    symmetric: bool = False,
) -> tuple[float, int]:
    """``(scale, zero_point)`` of a static per-tensor quantizer from calibration samples.

    ``minmax`` uses the extreme values, ``percentile`` the ``percentile`` / ``100 - percentile``
    quantiles (of ``|x|`` when symmetric). The range always contains 0. Symmetric:
    ``scale = amax / (2^(b-1) - 1)``, zero point 0; asymmetric: ``scale = (hi - lo) / (2^b - 1)``,
    ``zero_point = rint(-lo / scale)``.
    """
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("calibration samples must be non-empty and finite")
    if method not in ("minmax", "percentile"):
        raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    qmin, qmax = _int_range(bits, symmetric)
    p = 100.0 if method == "minmax" else percentile
    if symmetric:
        amax = float(np.percentile(np.abs(x), p))
        return (amax / qmax if amax > 0 else 1.0), 0
    lo = min(float(np.percentile(x, 100.0 - p)), 0.0)
    hi = max(float(np.percentile(x, p)), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero_point = int(np.clip(np.rint(-lo / scale), qmin, qmax))
    logger.debug(
        "per-tensor %s calibration: range [%g, %g], scale %g, zp %d",
        method,
        lo,
        hi,
        scale,
        zero_point,
    )
    return scale, zero_point


def quantize_per_tensor(
    x: np.ndarray, scale: float, zero_point: int, bits: int = 8, symmetric: bool = False
) -> np.ndarray:
    """Static fake quantization ``(clip(rint(x / scale) + zp, qmin, qmax) - zp) * scale``.

    Code range ``[-2^(b-1), 2^(b-1)-1]`` when symmetric (int8-like), ``[0, 2^b-1]`` otherwise.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    qmin, qmax = _int_range(bits, symmetric)
    x = np.asarray(x, dtype=np.float64)
    q = np.clip(np.rint(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def search_act_clip(x: np.ndarray, weights: list[np.ndarray], grid: tuple[float, ...],
                    bits: int = 4, symmetric: bool = True) -> tuple[float, dict[float, float]]:
    """The clip ratio of ``grid`` whose per-token quantizer of ``x`` (rows = tokens) gives the
    smallest output error of the linears reading it: ``sum_k ||(Q_c(x) - x) W_k^T||^2 /
    ||x W_k^T||^2`` (each linear weighted equally). Returns (best clip, error per clip).

    A smaller clip shrinks every token's step (``clip * amax / qmax``) and saturates its few
    largest entries; which wins depends on the tails, so it is chosen per tensor, on the
    calibration inputs, in the linears' output space (an entry a weight ignores costs nothing).
    """
    if not grid:
        raise ValueError("search_act_clip: empty grid")
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    # the stacked weights, each scaled by 1/sqrt(||x W_k^T||^2): the score is ||d M^T||^2, and
    # when M has more rows than columns its R factor (M = Q R) gives the same norm, cheaper
    m = np.concatenate([np.asarray(w, np.float32) / np.float32(
        np.sqrt(float(np.square(x @ np.asarray(w, np.float32).T).sum()) or 1.0))
        for w in weights])
    if m.shape[0] > m.shape[1]:
        m = np.linalg.qr(m.astype(np.float64), mode="r").astype(np.float32)
    errs: dict[float, float] = {}
    for c in grid:
        d = (quantize_per_token(x, bits, symmetric, float(c)) - x).astype(np.float32)
        errs[float(c)] = float(np.square(d @ m.T).sum())
    best = min(errs, key=lambda c: (errs[c], -c))
    return best, errs
