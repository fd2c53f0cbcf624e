"""Quantized linears on the FX side: simulated quantization in plain torch ops.

Weights become their dequantized values (``W <- dequant(Q(W))``); activations get the fake-quant
chain of :func:`~rotaq.rewriter.quant_chain.fake_quant_chain` before the linear
(``x -> (clamp(round(x / s) + z, qmin, qmax) - z) * s``, ``s, z`` per token (dynamic, symmetric or
asymmetric) or one calibrated scale and zero point (static)). The torch side of a recipe therefore
computes exactly what the quantized model computes, in float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rotaq.rewriter import fx_chain
from rotaq.rewriter.quant_chain import check_act, fake_quant_chain
from rotaq.rewriter.sites import ActQuant

if TYPE_CHECKING:
    from rotaq.rewriter.fx import FxGraph


def quantize_linear(g: FxGraph, key: str, qweight: Any, act: ActQuant | None,
                    lowering: str = "auto") -> str:
    """Linear(x) -> Linear(fq(x)) with W <- dequant(Q(W)); returns the linear's output name."""
    check_act(act)
    w, bias = g.get_linear(key)
    g.set_linear(key, qweight.dequantize()[:, : w.shape[1]], bias)  # crop a padded last group
    if act is not None:
        view = g.view()
        g.insert_fake_quant(view.by_key[key].inputs[0], [key], act)
    return key


def insert_fake_quant(g: FxGraph, value: str, consumers: Sequence[str], act: ActQuant) -> str:
    """x -> fake_quant(x) for ``consumers`` only: the chain of
    :func:`~rotaq.rewriter.quant_chain.fake_quant_chain` (per token dynamic, symmetric or
    asymmetric, or static per tensor), as aten ops."""
    return fx_chain.insert_chain(g, value, consumers, fake_quant_chain(act), role="quant")
