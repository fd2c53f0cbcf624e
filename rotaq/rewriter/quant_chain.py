"""Activation quantizers as chains: one validation and one fake-quant description for both IRs.

:func:`fake_quant_chain` turns an :class:`~rotaq.rewriter.sites.ActQuant` into the chain steps of
:mod:`rotaq.rewriter.chain` (``absmax`` / ``minmax`` then ``grid``); each IR's chain emitter
lowers it (ONNX: Abs / ReduceMax / Div / Round / Clip / Mul ...; FX: the matching aten ops) and
:meth:`Chain.apply` is the reference. The ONNX adapter lowers static 4- and 8-bit quantizers to
``QuantizeLinear -> DequantizeLinear`` instead (same values, ORT's fused kernels).
"""

from __future__ import annotations

import numpy as np

from rotaq.errors import RewriteError
from rotaq.rewriter.chain import Chain, Step
from rotaq.rewriter.sites import ActQuant


def act_range(act: ActQuant) -> tuple[int, int]:
    """``(qmin, qmax)`` of the activation codes."""
    b = int(act.bits)
    return (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if act.symmetric else (0, 2**b - 1)


def act_desc(act: ActQuant) -> str:
    kind = "sym" if act.symmetric else "asym"
    if act.mode == "static":
        return f"a{act.bits} static {kind} scale={act.scale:g} zp={act.zero_point}"
    clip = f" clip={act.clip_ratio:g}" if act.clip_ratio != 1.0 else ""
    return f"a{act.bits} dynamic {kind}{clip}"


def check_act(act: ActQuant | None) -> ActQuant | None:
    """Refuse an activation quantizer no IR can run (one clear reason)."""
    if act is None:
        return None
    if act.mode not in ("dynamic", "static"):
        raise RewriteError(f"ActQuant.mode must be 'dynamic' or 'static', got {act.mode!r}")
    if not 2 <= int(act.bits) <= 8:
        raise RewriteError(f"activation bits must be in 2..8, got {act.bits}")
    if not 0.0 < act.clip_ratio <= 1.0:
        raise RewriteError(f"ActQuant.clip_ratio must be in (0, 1], got {act.clip_ratio}")
    if act.mode == "static":
        if act.scale is None or not act.scale > 0:
            raise RewriteError("a static ActQuant needs a positive scale")
        if not act.symmetric and act.zero_point is None:
            raise RewriteError("an asymmetric static ActQuant needs a zero_point")
        zp = int(act.zero_point or 0)
        lo, hi = act_range(act)
        if not lo <= zp <= hi:
            raise RewriteError(f"zero_point {zp} is outside the {act.bits}-bit code range")
    return act


def fake_quant_chain(act: ActQuant) -> Chain:
    """``x -> dequant(quant(x))``, any width: per row (last axis) when dynamic, symmetric
    (``absmax``) or asymmetric (``minmax``, as :func:`rotaq.linalg.quant.quantize_per_token`),
    or one static grid."""
    check_act(act)
    lo, hi = act_range(act)
    if act.mode == "static":
        grid = np.array([float(act.scale), float(act.zero_point or 0)])
        return Chain((Step("grid", grid, (lo, hi)),), -1, -1, "fake_quant")
    if act.symmetric:
        first = Step("absmax", np.array(act.clip_ratio / hi))
    else:
        first = Step("minmax", np.array(float(act.clip_ratio)), (lo, hi))
    return Chain((first, Step("grid", arg=(lo, hi))), -1, -1, "fake_quant")
