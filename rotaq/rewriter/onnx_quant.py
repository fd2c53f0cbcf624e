"""ONNX Runtime lowering of quantized linears, simulated activation quantizers, kernel reports.

Functions take an :class:`~rotaq.rewriter.onnx.OnnxGraph` ``g`` and edit ``g.model`` in place.

Lowerings of ``quantize_linear`` (weights ``W ~= (codes - zero) * scale``, ``[out, in]``):

- ``"qdq"``: the codes as an integer initializer ``[in, out]`` + ``DequantizeLinear`` (per-channel:
  scale ``[out]``, ``axis=1``; groups: blocked scale ``[in / g, out]``, ``axis=0, block_size=g``,
  opset 21) + ``MatMul``. 2..4-bit codes are ``int4`` (symmetric) / ``uint4`` (asymmetric),
  5..8-bit codes ``int8`` / ``uint8``. When the activation is quantized to 8 bits, symmetric codes
  are stored as ``uint8`` with zero point 128 (the same values): ORT's ``U8S8`` integer GEMM on
  AVX2 CPUs without VNNI sums pairs of u8*s8 products in int16 and saturates (errors of 10-70 %
  measured here with full-range codes); ``U8U8`` is exact. Activations: ``None``; 8-bit dynamic
  -> ``DynamicQuantizeLinear`` -> ``DequantizeLinear`` (per-tensor uint8, what ORT fuses into
  ``DynamicQuantizeMatMul``); 8-bit static -> ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8,
  fused with the weight into ``QuantizeLinear`` + ``MatMulIntegerToFloat``, or into
  ``QLinearMatMul`` when ``output_act`` adds a static ``Q -> DQ`` on the output); 4-bit static ->
  int4 ``Q -> DQ``; other dynamic widths -> the per-token fake quantizer of
  :func:`insert_fake_quant` (simulation, never fused). One activation quantizer per (input value,
  ActQuant) is shared by all the linears reading it (q/k/v): ORT then runs it once
  (``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat``s). The bias is ``Add(y, b)``, but
  ``Sub(y, -b)`` behind an 8-bit activation quantizer: ORT's level-1 MatMulAddFusion turns a
  MatMul + Add on a static-shaped input into Gemm before the QDQ fusions can see the MatMul.
  Without an activation quantizer ORT (level >= extended) fuses ``DequantizeLinear -> MatMul``
  into MatMulNBits, by default with accuracy_level 4 (session option
  ``session.qdq_matmulnbits_accuracy_level``), i.e. int8 activations inside the kernel.
- ``"matmulnbits"``: ``com.microsoft.MatMulNBits`` (bits 2, 4 or 8; block size a power of two
  >= 16) with ``B`` packed ``uint8 [N, n_blocks, block_size * bits / 8]`` (element ``k`` of a
  block in bits ``(k * bits) % 8`` upward of byte ``k * bits // 8``, low bits first), ``scales``
  ``[N, n_blocks]`` in the activation dtype, symmetric codes shifted by ``2^(bits-1)`` (the default
  zero point, so no zero-point input), asymmetric zero points packed the same way to ``uint8 [N,
  ceil(n_blocks * bits / 8)]``, the bias as input 5. ``accuracy_level=4`` (the kernel quantizes
  the activation to int8, per row and block, symmetric ``amax / 127``) for an 8-bit dynamic
  ``act``; otherwise 0 with any other ``act`` emitted in front as in ``"qdq"``.
- ``"dequant"``: ``qw.dequantize()`` stored as the float weight of the (still plain) linear, with
  any ``act`` simulated in front by :func:`insert_fake_quant`. Float formats (fp8, mxfp4, nvfp4)
  only lower this way.
- ``"auto"``: see :func:`choose_lowering`.

Every node added is tagged with metadata ``rotaq.role = "quant"`` (except the float MatMul of
``"dequant"``, which stays a linear), ``rotaq.quant`` (a description) and ``rotaq.quant.linear``
(the linear key). The compute node (``MatMul`` / ``MatMulNBits``) takes the linear's key as its
name; the final value takes the linear's output name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq import tags
from rotaq.errors import RewriteError
from rotaq.linalg.formats import QuantizedWeight
from rotaq.rewriter.onnx_chain import emit_chain
from rotaq.rewriter.onnx_emit import (  # default_opset, ROLE_KEY: public here too
    ROLE_KEY,
    _discard,
    _Emitter,
    _replace,
    consumers_of,
    default_opset,
    require_opset,
    rewire,
)
from rotaq.rewriter.quant_chain import act_desc as _act_desc
from rotaq.rewriter.quant_chain import check_act as _check_act
from rotaq.rewriter.quant_chain import fake_quant_chain
from rotaq.rewriter.sites import ActQuant

logger = logging.getLogger(__name__)

QUANT_ROLE = tags.ROLE_QUANT
QUANT_KEY = tags.QUANT  # human-readable description of the quantizer
LINEAR_KEY = tags.QUANT_LINEAR  # the quantized linear a node belongs to
ACT_KEY = tags.QUANT_ACT  # "<value>|<act>" on the last node of a shareable act quantizer
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
LOWERINGS = ("auto", "qdq", "matmulnbits", "dequant")
NBITS_BITS = (2, 4, 8)  # what ORT's MatMulNBits kernel accepts (1.32)
MS_DOMAIN = "com.microsoft"


# ---------------------------------------------------------------------------------- descriptions
def _weight_desc(qw: QuantizedWeight) -> str:
    f = qw.fmt
    kind = f"int{f.bits}" if f.kind == "int" else f.kind
    sym = "" if f.kind != "int" else (" sym" if f.symmetric else " asym")
    gs = "channel" if qw.n_groups == 1 else f"g{qw.group_size}"
    return f"w {kind}{sym} {gs}"


def _block_ok(block: int) -> bool:
    return block >= 16 and block & (block - 1) == 0


def _is_a8_dynamic(act: ActQuant | None) -> bool:
    return act is not None and act.mode == "dynamic" and int(act.bits) == 8


def choose_lowering(qw: QuantizedWeight, act: ActQuant | None) -> str:
    """What ``lowering="auto"`` picks.

    - float formats -> ``"dequant"`` (simulated);
    - 2- or 4-bit int, block (group size, or ``in`` when per-channel) a power of two >= 16 and
      ``act`` None or 8-bit dynamic -> ``"matmulnbits"``;
    - 5..8-bit int with groups and an 8-bit activation quantizer: ORT fuses that QDQ pattern into
      ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``, which then fail at run time on blocked
      scales, so -> ``"matmulnbits"`` (8 bits, 8-bit dynamic act, block ok) else ``"dequant"``;
    - otherwise ``"qdq"``.
    """
    f = qw.fmt
    if f.kind != "int":
        return "dequant"
    nbits_ok = f.bits in NBITS_BITS and _block_ok(qw.group_size)
    if f.bits <= 4:
        if nbits_ok and (act is None or _is_a8_dynamic(act)):
            return "matmulnbits"
        return "qdq"
    if qw.n_groups > 1 and act is not None and int(act.bits) == 8:
        if nbits_ok and _is_a8_dynamic(act):
            return "matmulnbits"
        logger.warning(
            "%s with %s has no ORT kernel (grouped int8 QDQ with int8 activations fails in ORT); "
            "lowering as dequantized float weights", _weight_desc(qw), _act_desc(act))
        return "dequant"
    return "qdq"


def _require_ms(g: Any) -> None:
    g.model.opset_imports.setdefault(MS_DOMAIN, 1)


def _opset_need(act: ActQuant | None, dt: oir.DataType | None, qw: QuantizedWeight | None = None
                ) -> int:
    """The default-domain opset the Q/DQ nodes of a static 4/8-bit ``act`` and, with ``qw``,
    of a QDQ weight need (int4 or blocked scales: 21; fp16/bf16 scales: 19; else 13)."""
    low = dt != oir.DataType.FLOAT
    need = 0
    if act is not None and act.mode == "static" and int(act.bits) in (4, 8):
        need = 21 if int(act.bits) == 4 else (19 if low else 13)
    if qw is not None:
        need = max(need, 21 if qw.n_groups > 1 or qw.fmt.bits <= 4 else (19 if low else 13))
    return need


def _act_int_type(act: ActQuant) -> tuple[oir.DataType, int]:
    """(storage type, zero-point offset) of a Q/DQ activation: 8 bits as uint8 (symmetric codes
    shifted by 128: U8U8 kernels are exact on AVX2), 4 bits as int4 / uint4."""
    if int(act.bits) == 8:
        return oir.DataType.UINT8, 128 if act.symmetric else 0
    return (oir.DataType.INT4 if act.symmetric else oir.DataType.UINT4), 0


def _emit_act(g: Any, em: _Emitter, x: oir.Value, act: ActQuant) -> oir.Value:
    """The quantized-then-dequantized activation of ``x`` (shared with an identical quantizer
    already reading ``x``). ``em``'s nodes go right after ``x``'s producer."""
    tag = f"{x.name}|{_act_desc(act)}"
    for n in g.model.graph:  # act quantizers sit right after x's producer: safe to share
        if n.metadata_props.get(ACT_KEY) == tag and list(n.outputs[0].uses()):
            return n.outputs[0]
    mark = {ACT_KEY: tag, QUANT_KEY: _act_desc(act)}
    dt = x.dtype
    if dt is None or not dt.is_floating_point():
        raise RewriteError(f"activation {x.name!r} is not a float tensor")
    if _is_a8_dynamic(act):
        if dt != oir.DataType.FLOAT:
            raise RewriteError(
                f"DynamicQuantizeLinear needs a float32 input; {x.name!r} is {dt}: use "
                "lowering='matmulnbits' (accuracy_level 4) or a static act")
        if act.clip_ratio != 1.0 or act.symmetric:
            logger.debug("ORT's dynamic int8 quantizer is per-tensor uint8 asymmetric; "
                         "symmetric / clip_ratio of %s are not applied", _act_desc(act))
        q = em.value("act_q", oir.DataType.UINT8, x.shape)
        s = em.value("act_scale", oir.DataType.FLOAT, [])
        z = em.value("act_zp", oir.DataType.UINT8, [])
        em.node("DynamicQuantizeLinear", [x], [q, s, z])
        out = em.value("act_dq", dt, x.shape)
        em.node("DequantizeLinear", [q, s, z], [out], extra=mark)
        return out
    if act.mode == "static" and int(act.bits) in (4, 8):
        qt, offset = _act_int_type(act)
        s = em.const(np.array(float(act.scale)), dt, "act_scale")
        z = em.const(np.array(int(act.zero_point or 0) + offset), qt, "act_zp")
        q = em.value("act_q", qt, x.shape)
        em.node("QuantizeLinear", [x, s, z], [q])
        out = em.value("act_dq", dt, x.shape)
        em.node("DequantizeLinear", [q, s, z], [out], extra=mark)
        return out
    out = emit_chain(g, em, x, fake_quant_chain(act), dt)
    em.nodes[-1].metadata_props.update(mark)
    return out


# ---------------------------------------------------------------------------------- weights
def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``codes [..., n]`` (values < 2^bits) along the last axis, little-endian
    within each byte (bits 2, 4, 8; ``n * bits`` a multiple of 8)."""
    c = np.asarray(codes).astype(np.uint8)
    per = 8 // bits
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= (c[..., j] << np.uint8(bits * j)).astype(np.uint8)
    return out


def _bias_of(g: Any, lin: Any) -> np.ndarray | None:
    if lin.bias is None:
        return None
    b = g._array(lin.bias).reshape(-1)
    b = np.broadcast_to(b, (lin.out_features,)) * (lin.beta if lin.bias_add is None else 1.0)
    return np.array(b, dtype=np.float64)


def _bias_value(g: Any, em: _Emitter, lin: Any, bias: np.ndarray, dt: oir.DataType
                ) -> oir.Value:
    """The linear's own bias constant when it already is ``[out]`` in ``dt`` (and unscaled)."""
    t = g._const(lin.bias) if lin.bias is not None else None
    if (t is not None and lin.bias.is_initializer() and t.dtype == dt
            and tuple(t.shape) == (lin.out_features,)
            and (lin.bias_add is not None or lin.beta == 1.0)):
        return lin.bias
    return em.const(bias, dt, "bias")


def _weight_dq(g: Any, em: _Emitter, qw: QuantizedWeight, dt: oir.DataType,
               a8: bool, k: int) -> oir.Value:
    """Integer weight initializer ``[in, out]`` + DequantizeLinear -> float ``[in, out]``."""
    f = qw.fmt
    codes = np.asarray(qw.codes, dtype=np.int64)[:, :k]  # blocked DQ: ceil(k / block) blocks
    n_out, n_in = codes.shape
    zero = None if qw.zero is None else np.asarray(qw.zero, dtype=np.int64)
    if f.bits <= 4:
        qt = oir.DataType.INT4 if f.symmetric else oir.DataType.UINT4
    elif f.symmetric and a8:  # U8U8: exact on AVX2 (U8S8 saturates)
        qt, codes, zero = oir.DataType.UINT8, codes + 128, np.full(qw.scale.shape, 128, np.int64)
    else:
        qt = oir.DataType.INT8 if f.symmetric else oir.DataType.UINT8
    info = np.iinfo(np.int8 if qt == oir.DataType.INT8 else np.uint8)
    lo, hi = {oir.DataType.INT4: (-8, 7), oir.DataType.UINT4: (0, 15)}.get(qt, (info.min, info.max))
    if codes.min() < lo or codes.max() > hi:
        raise RewriteError(f"codes of {_weight_desc(qw)} do not fit {qt}")
    grouped = qw.n_groups > 1
    wq = em.const(codes.T, qt, "weight_q")
    if grouped:
        scale = em.const(np.asarray(qw.scale).T, dt, "weight_scale")  # [n_groups, out]
        attrs = {"axis": 0, "block_size": int(qw.group_size)}
        zp = None if zero is None else em.const(zero.T, qt, "weight_zp")
    else:
        scale = em.const(np.asarray(qw.scale)[:, 0], dt, "weight_scale")  # [out]
        attrs = {"axis": 1}
        zp = None if zero is None else em.const(zero[:, 0], qt, "weight_zp")
    w = em.value("weight_dq", dt, [n_in, n_out])
    em.node("DequantizeLinear", [wq, scale, zp], [w], attrs, extra={QUANT_KEY: _weight_desc(qw)})
    return w


def _nbits_inputs(g: Any, em: _Emitter, qw: QuantizedWeight, dt: oir.DataType, k: int
                  ) -> tuple[list[oir.Value | None], dict[str, int]]:
    """MatMulNBits inputs; ``k`` is the true input width (the codes may carry a zero-padded last
    block, which is exactly MatMulNBits' own layout for K not a multiple of the block)."""
    f = qw.fmt
    n_out, k_codes = qw.codes.shape
    if f.kind != "int" or f.bits not in NBITS_BITS:
        raise RewriteError(
            f"MatMulNBits takes int weights of {NBITS_BITS} bits, not {_weight_desc(qw)}: "
            "use lowering='qdq' or 'dequant'")
    block = qw.group_size
    if not _block_ok(block):
        hint = ("per-channel needs in_features a power of two; "
                if qw.n_groups == 1 else "")
        raise RewriteError(
            f"MatMulNBits needs a block size that is a power of two >= 16, got {block} "
            f"(in_features {k}): {hint}quantize with group_size 32, 64 or 128")
    nb = k_codes // block
    codes = np.asarray(qw.codes, dtype=np.int64)
    if f.symmetric:
        codes = codes + 2 ** (f.bits - 1)  # default zero point 2^(bits-1)
    if codes.min() < 0 or codes.max() >= 2**f.bits:
        raise RewriteError(f"codes out of the {f.bits}-bit range")
    packed = _pack_bits(codes.reshape(n_out, nb, block), f.bits)  # [N, nb, blob]
    b = em.const(packed, oir.DataType.UINT8, "weight_packed")
    s = em.const(np.asarray(qw.scale).reshape(n_out, nb), dt, "weight_scale")
    zp = None
    if qw.zero is not None:
        per = 8 // f.bits
        width = -(-nb // per) * per
        z = np.zeros((n_out, width), np.int64)
        z[:, :nb] = np.asarray(qw.zero, dtype=np.int64)
        zp = em.const(_pack_bits(z, f.bits), oir.DataType.UINT8, "weight_zp")
    attrs = {"K": int(k), "N": int(n_out), "bits": int(f.bits), "block_size": int(block)}
    return [b, s, zp], attrs


# ---------------------------------------------------------------------------------- rewrite
def quantize_linear(g: Any, key: str, qw: QuantizedWeight, act: ActQuant | None = None,
                    lowering: str = "auto", *, output_act: ActQuant | None = None) -> str:
    """Replace the float linear ``key`` by a quantized one (see the module doc); keeps its bias
    and its output value name, which is returned.

    ``output_act`` (``"qdq"`` only): a static 8-bit quantizer of the product, emitted as
    ``QuantizeLinear -> DequantizeLinear`` after the MatMul (before the bias): with a static 8-bit
    ``act`` ORT then fuses the whole pattern into ``QLinearMatMul``.
    """
    if lowering not in LOWERINGS:
        raise RewriteError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    lin = g._linear(key)
    act = _check_act(act)
    codes = np.asarray(qw.codes)
    pad = codes.shape[1] - lin.in_features  # a ragged last group arrives zero-padded
    if codes.shape[0] != lin.out_features or not 0 <= pad < max(qw.group_size, 1):
        raise RewriteError(
            f"quantize_linear {key!r}: codes shape {codes.shape} != "
            f"{(lin.out_features, lin.in_features)}")
    mode = choose_lowering(qw, act) if lowering == "auto" else lowering
    if mode != "dequant" and qw.fmt.kind != "int":
        raise RewriteError(
            f"{qw.fmt.kind} weights are simulated: use lowering='dequant' (or 'auto')")
    if output_act is not None:
        output_act = _check_act(output_act)
        if mode != "qdq" or output_act.mode != "static" or int(output_act.bits) != 8:
            raise RewriteError("output_act must be a static 8-bit ActQuant, with lowering 'qdq'")
    if mode == "qdq" and qw.n_groups > 1 and qw.fmt.bits > 4 and act is not None \
            and int(act.bits) == 8:
        raise RewriteError(
            f"{_weight_desc(qw)} with {_act_desc(act)} as QDQ: ORT fuses it into an int8 kernel "
            "that fails on blocked scales; quantize per channel (group_size=-1) or use "
            "lowering='matmulnbits' / 'dequant'")
    x = lin.node.inputs[0]
    wdt = g._const(lin.weight).dtype
    dt = x.dtype if x.dtype is not None and x.dtype.is_floating_point() else wdt
    if mode != "dequant":  # before any reference is kept: the converter may edit the graph
        require_opset(g, _opset_need(act, dt, qw if mode == "qdq" else None))
        lin = g._linear(key)
        x = lin.node.inputs[0]
    bias = _bias_of(g, lin)
    desc = _weight_desc(qw) + (f" {_act_desc(act)}" if act is not None else "")
    orig_meta = {k: v for k, v in lin.node.metadata_props.items() if k != ROLE_KEY}
    meta = {k: v for k, v in orig_meta.items() if k == _SCOPE_KEY}  # scope for reports
    logger.debug("quantize_linear %s: %s as %s", key, desc, mode)

    if mode == "dequant":
        name = (lin.bias_add or lin.node).outputs[0].name
        g.set_linear(key, qw.dequantize()[:, : lin.in_features], bias)
        n = g._node(key)
        n.metadata_props[QUANT_KEY] = desc + " (simulated: dequantized float weight)"
        if act is not None:
            insert_fake_quant(g, x.name, [key], act)
        return name

    meta.update({ROLE_KEY: QUANT_ROLE, LINEAR_KEY: key, QUANT_KEY: desc})
    compute_meta = {**orig_meta, **meta}  # the node taking the linear's place keeps its metadata
    scope_base = g._hint(lin.node, "q").rsplit(".", 1)[0]
    em, act_em = _Emitter(g, meta, scope_base), _Emitter(g, meta, scope_base)
    lin.node.name = g._fresh(f"{key}_float")  # free the key for the quantized compute node
    n_out = lin.out_features
    out_shape = None if x.shape is None else [*list(x.shape.dims)[:-1], n_out]
    try:
        if mode == "qdq":
            xa = x if act is None else _emit_act(g, act_em, x, act)
            w = _weight_dq(g, em, qw, dt, a8=act is not None and int(act.bits) == 8,
                           k=lin.in_features)
            y = em.value("mm", dt, out_shape)
            em.node("MatMul", [xa, w], [y], name=key, extra=compute_meta)
            if output_act is not None:
                qt, offset = _act_int_type(output_act)
                s = em.const(np.array(float(output_act.scale)), dt, "out_scale")
                z = em.const(np.array(int(output_act.zero_point or 0) + offset), qt, "out_zp")
                yq = em.value("out_q", qt, out_shape)
                em.node("QuantizeLinear", [y, s, z], [yq])
                y = em.value("out_dq", dt, out_shape)
                em.node("DequantizeLinear", [yq, s, z], [y],
                        extra={QUANT_KEY: "out " + _act_desc(output_act)})
            if bias is not None:
                yb = em.value("biased", dt, out_shape)
                if act is not None and int(act.bits) == 8 and output_act is None:
                    # ORT's level-1 MatMulAddFusion turns MatMul + Add (static-shaped input)
                    # into Gemm before the QDQ fusions run; it does not match Sub.
                    em.node("Sub", [y, em.const(-bias, dt, "neg_bias")], [yb])
                else:
                    em.node("Add", [y, _bias_value(g, em, lin, bias, dt)], [yb])
                y = yb
        elif mode == "matmulnbits":
            inputs, attrs = _nbits_inputs(g, em, qw, dt, lin.in_features)
            a8 = _is_a8_dynamic(act)
            xa = x if act is None or a8 else _emit_act(g, act_em, x, act)
            b = None if bias is None else _bias_value(g, em, lin, bias, dt)
            _require_ms(g)
            y = em.value("mm", dt, out_shape)
            at = {**attrs, "accuracy_level": 4 if a8 else 0}
            em.node("MatMulNBits", [xa, *inputs, None, b], [y], at, domain=MS_DOMAIN, name=key,
                    extra=compute_meta)
        else:
            raise RewriteError(f"unknown lowering {mode!r}")
    except Exception:
        lin.node.name = key
        _discard([em, act_em])
        raise
    return _replace(g, lin, act_em, em, y)


def insert_fake_quant(g: Any, value: str, consumers: Sequence[str], act: ActQuant) -> str:
    """Simulated activation quantization of ``value`` for ``consumers`` only; returns the new
    value's name: the chain of :func:`~rotaq.rewriter.quant_chain.fake_quant_chain` (dynamic:
    per token, symmetric ``s = max(ReduceMax(|x|) * clip_ratio / qmax, tiny)``,
    ``y = Clip(Round(x / s), -qmax - 1, qmax) * s``, Round ties to even; asymmetric as
    :func:`rotaq.linalg.quant.quantize_per_token`), except static 8- and 4-bit quantizers:
    ``QuantizeLinear -> DequantizeLinear`` (uint8 / int4 / uint4 storage, opset 21 for 4 bits).
    """
    act = _check_act(act)
    v, users = consumers_of(g, value, consumers, "insert_fake_quant")
    if _opset_need(act, v.dtype) > default_opset(g):
        require_opset(g, _opset_need(act, v.dtype))
        v, users = consumers_of(g, value, consumers, "insert_fake_quant")
    em = _Emitter(g, {ROLE_KEY: QUANT_ROLE, QUANT_KEY: _act_desc(act)}, f"fq_{value}")
    if act.mode == "static" and int(act.bits) in (4, 8):
        out = _emit_act(g, em, v, act)
    else:
        out = emit_chain(g, em, v, fake_quant_chain(act), v.dtype)
    return rewire(g, v, users, out, em)


# ---------------------------------------------------------------------------------- ORT
