"""Relative errors between two runs' outputs (the original and a rewrite): what verification and
the error bounds of lossy rewrites are judged by."""

from __future__ import annotations

import numpy as np


def max_rel_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max |out - ref| / max |ref| over each output tensor; the worst output counts."""
    if len(ref) != len(out):
        raise ValueError(f"output count changed: {len(ref)} -> {len(out)}")
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r64.shape != o64.shape:
            raise ValueError(f"output shape changed: {r64.shape} -> {o64.shape}")
        # a value that is NaN / inf where the original is finite is an infinite error (a plain
        # max() would drop NaN and let a broken rewrite pass); both non-finite at the same
        # place (e.g. masked -inf logits) is no error
        same = (r64 == o64) | (np.isnan(r64) & np.isnan(o64))
        if np.any(~np.isfinite(o64) & ~same):
            return float("inf")
        fin = np.isfinite(r64)
        scale = float(np.max(np.abs(r64[fin]), initial=0.0)) or 1.0
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(o64 - r64))
        worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
    return worst


def rel_rms_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """||out - ref|| / ||ref|| (Frobenius) per output tensor; the worst output counts. An average,
    so steadier across input samples than :func:`max_rel_error` for lossy rewrites."""
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        scale = float(np.linalg.norm(r64)) or 1.0
        worst = max(worst, float(np.linalg.norm(o64 - r64)) / scale)
    return worst
