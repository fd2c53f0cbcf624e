"""Quantized linears on the FX side: simulated quantization in plain torch ops.

Weights become their dequantized values (``W <- dequant(Q(W))``); activations get a fake-quant
subgraph ``x -> clamp(round(x / s), qmin, qmax) * s`` before the linear, with ``s`` per token
(dynamic) or one calibrated scale and zero point (static). The torch side of a recipe therefore
computes exactly what the quantized model computes, in float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rotaq.errors import RewriteError
from rotaq.rewriter.sites import ActQuant

if TYPE_CHECKING:
    from rotaq.rewriter.fx import FxGraph

aten = torch.ops.aten


def quantize_linear(g: FxGraph, key: str, qweight: Any, act: ActQuant | None,
                    lowering: str = "auto") -> str:
    """Linear(x) -> Linear(fq(x)) with W <- dequant(Q(W)); returns the linear's output name."""
    w, bias = g.get_linear(key)
    g.set_linear(key, qweight.dequantize()[:, : w.shape[1]], bias)  # crop a padded last group
    if act is not None:
        view = g.view()
        g.insert_fake_quant(view.by_key[key].inputs[0], [key], act)
    return key


def _range(act: ActQuant) -> tuple[int, int]:
    if act.bits < 2 or act.bits > 8:
        raise RewriteError(f"activation bits must be 2..8, got {act.bits}")
    if act.symmetric:
        return -(2 ** (act.bits - 1)), 2 ** (act.bits - 1) - 1
    return 0, 2 ** act.bits - 1


def insert_fake_quant(g: FxGraph, value: str, consumers: Sequence[str], act: ActQuant) -> str:
    """x -> fake_quant(x) for ``consumers`` only (per-token dynamic or static per-tensor)."""
    src = g._node(value)
    users = [g._node(c) for c in consumers]
    order = {n: i for i, n in enumerate(g.gm.graph.nodes)}
    first = min(users, key=lambda u: order[u])
    qmin, qmax = _range(act)
    graph = g.gm.graph
    created = []

    def call(target, *args):
        node = graph.call_function(target, args)
        created.append(node)
        return node

    with graph.inserting_before(first):
        if act.mode == "dynamic":
            if not act.symmetric:
                raise RewriteError("dynamic activation quantization is symmetric in rotaq")
            amax = call(aten.amax.default, call(aten.abs.default, src), [-1], True)
            scale = call(aten.clamp_min.default,
                         call(aten.mul.Tensor, amax, act.clip_ratio / qmax), 1e-12)
            q = call(aten.clamp.default, call(aten.round.default, call(aten.div.Tensor, src, scale)),
                     qmin, qmax)
            out = call(aten.mul.Tensor, q, scale)
        elif act.mode == "static":
            if act.scale is None:
                raise RewriteError("static activation quantization needs a calibrated scale")
            zp = float(act.zero_point or 0)
            q = call(aten.clamp.default,
                     call(aten.add.Tensor,
                          call(aten.round.default, call(aten.div.Tensor, src, float(act.scale))),
                          zp), qmin, qmax)
            out = call(aten.mul.Tensor, call(aten.sub.Tensor, q, zp), float(act.scale))
        else:
            raise RewriteError(f"activation mode must be dynamic or static, not '{act.mode}'")
    return g._wire(src, out, users, created, "quant")
