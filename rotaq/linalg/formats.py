"""Number formats for weight quantization: element grids, QFormat, group scales.

Conventions (all math in float64, rounding ties to even everywhere, like ONNX QuantizeLinear,
torch.round and IEEE casts):

- ``int`` symmetric, b bits: ``qmax = 2^(b-1) - 1``, ``scale = amax / qmax``, codes
  ``clip(rint(w / scale), -(qmax + 1), qmax)``. Unclipped values never reach ``-(qmax + 1)``;
  with a clip ratio below one the extra negative code is used.
- ``int`` asymmetric: the range ``[min(w_min, 0), max(w_max, 0)]`` (so 0 is exact),
  ``scale = (hi - lo) / (2^b - 1)``, integer ``zero = clip(rint(-lo / scale), 0, 2^b - 1)``,
  codes ``clip(rint(w / scale) + zero, 0, 2^b - 1)``.
- ``fp8_e4m3``: ``scale = amax / 448``, codes ``round_fp8_e4m3(w / scale)``.
- ``mxfp4`` (OCP MX): blocks of 32, ``scale = 2^(floor(log2 amax) - 2)`` (e2m1 emax is 2,
  exponent clamped to the E8M0 range [-127, 127]), codes ``round_fp4_e2m1(w / scale)``;
  magnitudes in (6, 8) scale units saturate to 6 as the spec says.
- ``nvfp4``: blocks of 16, ``global = amax_tensor / (448 * 6)``,
  ``scale = max(round_fp8_e4m3(amax_block / 6 / global), 2^-9) * global`` (round to nearest,
  so a block may saturate slightly), codes ``round_fp4_e2m1(w / scale)``.

A group whose range is zero gets scale 1 (nvfp4: the smallest e4m3 subnormal times global), so
every scale is positive. ``clip="mse"`` multiplies the range by each ratio of
``MSE_CLIP_RATIOS`` (1.0 first) and keeps, per group, the one with the least squared error;
ties keep the larger ratio, so it is never worse than no clipping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_E4M3_MIN_SUBNORMAL = 2.0**-9
KINDS = ("int", "fp8_e4m3", "mxfp4", "nvfp4")
CLIPS = ("none", "mse")
INT_BITS = range(2, 9)
MSE_CLIP_RATIOS = np.linspace(1.0, 0.5, 26)  # steps of 0.02, 1.0 first
_BLOCK = {"mxfp4": 32, "nvfp4": 16}
_ELEMENT_BITS = {"fp8_e4m3": 8, "mxfp4": 4, "nvfp4": 4}


def _round_minifloat(x: np.ndarray, mant_bits: int, min_exp: int, max_val: float) -> np.ndarray:
    """Round to a sign/exponent/mantissa grid: ties to even, subnormals, saturate at max_val.

    A magnitude ``a`` in binade ``e = max(floor(log2 a), min_exp)`` has spacing
    ``2^(e - mant_bits)``; rint on ``a / spacing`` is round-half-even on the mantissa.
    NaN stays NaN, +-inf saturates.
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    _, e = np.frexp(a)  # a = m 2^e with m in [0.5, 1), so floor(log2 a) = e - 1
    step = np.ldexp(1.0, np.maximum(e - 1, min_exp) - mant_bits)
    r = np.minimum(np.rint(a / step) * step, max_val)
    return np.copysign(r, x)


def round_fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """Nearest float8 e4m3fn value (bias 7, max 448, subnormal step 2^-9, no inf), saturating."""
    return _round_minifloat(x, 3, -6, FP8_E4M3_MAX)


def round_fp4_e2m1(x: np.ndarray) -> np.ndarray:
    """Nearest e2m1 value in +-{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even mantissa, saturating at 6.

    Ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    """
    return _round_minifloat(x, 1, 0, FP4_E2M1_MAX)


@dataclass(frozen=True)
class QFormat:
    """A weight quantization format; groups run along the input axis of a ``[out, in]`` weight.

    ``group_size=-1`` is one group per output row. ``mxfp4``/``nvfp4`` fix the group to 32/16
    (a ``-1`` is replaced; another value is an error). For float kinds ``bits`` is set to the
    element width (8 or 4) and the format must be symmetric.
    """

    kind: str = "int"
    bits: int = 8
    symmetric: bool = True
    group_size: int = -1
    clip: str = "none"

    def __post_init__(self) -> None:
        if self.kind in _ELEMENT_BITS:
            object.__setattr__(self, "bits", _ELEMENT_BITS[self.kind])
        if self.kind in _BLOCK and self.group_size == -1:
            object.__setattr__(self, "group_size", _BLOCK[self.kind])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an unknown kind/clip, bad bits, group size or symmetry."""
        if self.kind not in KINDS:
            raise ValueError(f"QFormat.kind must be one of {KINDS}, got {self.kind!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"QFormat.clip must be one of {CLIPS}, got {self.clip!r}")
        if self.kind == "int" and self.bits not in INT_BITS:
            raise ValueError(f"int QFormat.bits must be in 2..8, got {self.bits!r}")
        if self.kind != "int" and not self.symmetric:
            raise ValueError(f"{self.kind} is a symmetric float format; symmetric=False is invalid")
        gs = self.group_size
        if not isinstance(gs, (int, np.integer)) or (gs != -1 and gs < 1):
            raise ValueError(f"QFormat.group_size must be -1 or a positive integer, got {gs!r}")
        if self.kind in _BLOCK and gs != _BLOCK[self.kind]:
            raise ValueError(f"{self.kind} uses blocks of {_BLOCK[self.kind]}, got group_size={gs}")

    @property
    def qmax(self) -> float:
        """Largest code: 2^(b-1)-1 (int sym), 2^b-1 (int asym), 448 / 6 (float kinds)."""
        if self.kind == "fp8_e4m3":
            return FP8_E4M3_MAX
        if self.kind in _BLOCK:
            return FP4_E2M1_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qmin(self) -> float:
        """Smallest code: -(2^(b-1)) (int sym), 0 (int asym), -qmax (float kinds)."""
        if self.kind != "int":
            return -self.qmax
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    def resolve_group_size(self, in_features: int) -> int:
        """The group length for ``in_features`` inputs; ValueError unless it divides them."""
        gs = in_features if self.group_size == -1 else int(self.group_size)
        if in_features < 1 or in_features % gs:
            raise ValueError(
                f"group_size {gs} does not divide in_features {in_features} "
                f"({self.kind}, {self.bits} bits)"
            )
        return gs


@dataclass
class QuantizedWeight:
    """Group-quantized ``[out, in]`` weight: ``W ~= (codes - zero) * scale`` per group.

    ``codes``: int32 for int kinds, float64 element values (units of scale) for float kinds.
    ``scale``/``zero``: ``[out, n_groups]``; ``zero`` only for asymmetric int.
    ``global_scale``: the nvfp4 per-tensor scale (``scale / global_scale`` is e4m3), else None.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    fmt: QFormat
    global_scale: float | None = None

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    @property
    def group_size(self) -> int:
        return int(self.codes.shape[1] // self.scale.shape[1])

    def dequantize(self) -> np.ndarray:
        """``[out, in]`` float64 ``(codes - zero) * scale`` with scales repeated over groups."""
        out, n_in = self.codes.shape
        c = self.codes.reshape(out, self.n_groups, -1)
        z = None if self.zero is None else self.zero[..., None]
        return decode(c, self.scale[..., None], z).reshape(out, n_in)


def encode(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, fmt: QFormat) -> np.ndarray:
    """Codes of ``w`` for broadcastable ``scale``/``zero`` (int32 for int, float64 for floats)."""
    v = np.asarray(w, dtype=np.float64) / scale
    if fmt.kind == "fp8_e4m3":
        return round_fp8_e4m3(v)
    if fmt.kind in _BLOCK:
        return round_fp4_e2m1(v)
    q = np.rint(v)
    if zero is not None:
        q = q + zero
    return np.clip(q, fmt.qmin, fmt.qmax).astype(np.int32)


def decode(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """``(codes - zero) * scale`` in float64 (``zero`` None means 0)."""
    c = codes if zero is None else codes - zero
    return c.astype(np.float64) * scale


def nvfp4_global_scale(w: np.ndarray) -> float:
    """Per-tensor nvfp4 scale ``amax / (448 * 6)`` (1.0 for an all-zero tensor)."""
    amax = float(np.max(np.abs(w))) if np.size(w) else 0.0
    return amax / (FP8_E4M3_MAX * FP4_E2M1_MAX) if amax > 0 else 1.0


def _params_at(
    wg: np.ndarray, fmt: QFormat, ratio: float, global_scale: float | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero) per group of ``wg [..., g]`` with the range shrunk by ``ratio``."""
    if fmt.kind == "int" and not fmt.symmetric:
        lo = ratio * np.minimum(wg.min(axis=-1), 0.0)
        hi = ratio * np.maximum(wg.max(axis=-1), 0.0)
        scale = (hi - lo) / fmt.qmax
        scale = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.rint(-lo / scale), 0, fmt.qmax).astype(np.int32)
        return scale, zero
    amax = ratio * np.abs(wg).max(axis=-1)
    if fmt.kind == "mxfp4":
        _, e = np.frexp(amax)
        scale = np.ldexp(1.0, np.clip(e - 1 - 2, -127, 127))
    elif fmt.kind == "nvfp4":
        g = nvfp4_global_scale(wg) if global_scale is None else global_scale
        s8 = round_fp8_e4m3(amax / FP4_E2M1_MAX / g)
        return np.maximum(s8, FP8_E4M3_MIN_SUBNORMAL) * g, None
    else:
        scale = amax / fmt.qmax
    return np.where(amax > 0, scale, 1.0), None


def group_params(
    wg: np.ndarray, fmt: QFormat, global_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale ``[...]`` and zero (asymmetric int) for each group along the last axis of ``wg``.

    ``clip="mse"``: per group, the ratio r in MSE_CLIP_RATIOS minimizing
    ``sum_g (w - deq_r(w))^2`` (strict improvement needed, so r = 1 wins ties).
    """
    wg = np.asarray(wg, dtype=np.float64)
    if fmt.kind == "nvfp4" and global_scale is None:
        global_scale = nvfp4_global_scale(wg)
    scale, zero = _params_at(wg, fmt, 1.0, global_scale)
    if fmt.clip == "none":
        return scale, zero
    best = _sq_error(wg, scale, zero, fmt)
    for r in MSE_CLIP_RATIOS[1:]:
        s, z = _params_at(wg, fmt, float(r), global_scale)
        err = _sq_error(wg, s, z, fmt)
        better = err < best
        best = np.where(better, err, best)
        scale = np.where(better, s, scale)
        if zero is not None:
            zero = np.where(better, z, zero)
    return scale, zero


def _sq_error(
    wg: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, fmt: QFormat
) -> np.ndarray:
    z = None if zero is None else zero[..., None]
    deq = decode(encode(wg, scale[..., None], z, fmt), scale[..., None], z)
    return np.square(wg - deq).sum(axis=-1)
