"""Linears -> rotaq's matmul kernel for the TVM backend, as onnxscript rewrite rules.

- ``com.microsoft.MatMulNBits`` (2/4/8-bit blocked weights, asymmetric zero points, bias,
  ``accuracy_level=4`` int8 activations) -> ``RotaqQMatMul`` with the weight repacked to
  ``uint8 [K / per, N]`` plus fp32 scale and shift ``[blocks, N]`` (:func:`repack_nbits`);
- ``MatMul`` with a constant 2-D fp32 weight (plain linears, low-rank chains) -> the same op
  with an fp32 weight, so every linear gets a schedule;
- ``MatMul`` reading ``DequantizeLinear`` of a constant int8 / uint8 weight (per tensor or per
  output column: QDQ int8 linears, the int8 head of ``w4a8-rotated``) -> the same op with the
  8-bit codes and one scale / shift per column (TVM's default lowering ran that head 9-64x
  slower than ORT; dequantized to fp32 it read 4x the bytes per decode step).

Weights are tiled along N (:func:`tile`) into new initializers ``rotaq_q<i>_*`` /
``rotaq_w<i>`` (``i``: the node's rank among the rewritten ones, in graph order);
initializers left unread are dropped. ``tvm_import`` emits the kernel
(:func:`tvm_kernels.qmatmul_func`) for each ``RotaqQMatMul`` node.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rotaq.backends import tvm_kernels as K
from rotaq.backends.tvm_graph import apply_rules, init_array, on_proto

QOP = "RotaqQMatMul"
DENSE_MIN_ELEMS = 256  # constant MatMul weights from this size go through rotaq's kernel


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes from bytes, low bits first: ``[rows, bytes] -> [rows, count]``."""
    per = 8 // bits
    p = packed.astype(np.uint16)
    parts = [(p >> (i * bits)) & (2**bits - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(p.shape[0], -1)[:, :count]


def repack_nbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, k: int, n: int,
                 bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits ``B [N, blocks, blob]``, scales, packed zero points -> (codes ``uint8
    [ceil(K/per), N]`` packed along K, scale ``[blocks, N]``, shift ``[blocks, N]``) with
    ``w[k, n] = code * scale + shift``."""
    nb = -(-k // block)
    codes = _unpack(b.reshape(n, -1), bits, nb * block)  # [N, nb*block]
    per = 8 // bits
    kp = -(-nb * block // per)
    c = np.zeros((n, kp * per), np.uint16)
    c[:, : codes.shape[1]] = codes
    c = c.reshape(n, kp, per)
    packed = np.zeros((n, kp), np.uint16)
    for i in range(per):
        packed |= c[:, :, i] << (i * bits)
    sc = np.asarray(scales, np.float32).reshape(n, nb)
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), np.float32)
    elif zp.dtype == np.uint8:
        z = _unpack(zp.reshape(n, -1), bits, nb).astype(np.float32)
    else:
        z = np.asarray(zp, np.float32).reshape(n, nb)
    return (np.ascontiguousarray(packed.astype(np.uint8).T), np.ascontiguousarray(sc.T),
            np.ascontiguousarray((-z * sc).T))


def tile(arr: np.ndarray, nt: int) -> np.ndarray:
    """``[rows, N] -> [N / nt, rows, nt]``: each N tile contiguous along the rows."""
    rows, n = arr.shape
    return np.ascontiguousarray(arr.reshape(rows, n // nt, nt).transpose(1, 0, 2))


class _Rules:
    """The three rules, sharing the count that names their new initializers."""

    def __init__(self) -> None:
        self.counts = {"nbits": 0, "dense": 0, "int8": 0}

    def _const(self, op: Any, arr: np.ndarray, name: str) -> Any:
        import onnx_ir as ir

        return op.initializer(ir.tensor(arr, name=name), name=name)

    def _quantized(self, op: Any, kind: str, x: Any, packed: tuple, extra: list, name: str,
                   **attrs: int) -> Any:
        """``RotaqQMatMul(x, codes, scale, shift, *extra)`` from ``packed`` (codes ``[rows,
        N]``, scale and shift ``[blocks, N]``), each tiled along N into ``rotaq_q<i>_*``."""
        nt = K.pick_tile(attrs["N"])
        idx = sum(self.counts.values())
        consts = [self._const(op, tile(arr, nt), f"rotaq_q{idx}_{suffix}")
                  for suffix, arr in zip(("codes", "scale", "shift"), packed)]
        self.counts[kind] += 1
        return op.op(QOP, x, *consts, *extra, **attrs, tile=nt, _name=name)

    # -- MatMulNBits
    @staticmethod
    def nbits_pattern(op: Any, a: Any) -> Any:
        return op.MatMulNBits(a, _domain="com.microsoft", _allow_other_inputs=True,
                              _outputs=["y"])

    def nbits_rewrite(self, op: Any, a: Any, y: Any) -> Any:
        node = y.producer()
        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        if ins[4] is not None:
            raise ValueError(f"{node.name}: MatMulNBits with g_idx is not supported")
        arrs = [init_array(v) if v is not None else None for v in ins[1:4]]
        if any(v is not None and arr is None for v, arr in zip(ins[1:4], arrs)) or \
                arrs[0] is None or arrs[1] is None:
            raise ValueError(f"{node.name}: MatMulNBits needs constant weights")
        at = node.attributes
        k, n, bits, block = (at.get_int(x) for x in ("K", "N", "bits", "block_size"))
        packed = repack_nbits(arrs[0], arrs[1], arrs[2], k, n, bits, block)
        act = 8 if at.get_int("accuracy_level", 0) == 4 else 0
        return self._quantized(op, "nbits", a, packed, [ins[5]] if ins[5] is not None else [],
                               node.name, K=k, N=n, bits=bits, block_size=block, act_bits=act)

    # -- MatMul with a constant 2-D fp32 weight
    @staticmethod
    def dense_pattern(op: Any, x: Any, w: Any) -> Any:
        return op.MatMul(x, w, _outputs=["y"])

    @staticmethod
    def dense_check(context: Any, w: Any, **_: Any) -> bool:
        import onnx_ir as ir

        if w is None or not w.is_initializer() or w.const_value is None:
            return False
        t = w.const_value
        return len(t.shape) == 2 and t.dtype == ir.DataType.FLOAT and \
            t.shape[0] * t.shape[1] >= DENSE_MIN_ELEMS

    def dense_rewrite(self, op: Any, x: Any, w: Any, y: Any) -> Any:
        """``RotaqQMatMul(x, tiled fp32 weight)``."""
        arr = init_array(w)
        nt = K.pick_tile(arr.shape[1])
        idx = sum(self.counts.values())
        weight = self._const(op, tile(arr, nt), f"rotaq_w{idx}")
        self.counts["dense"] += 1
        return op.op(QOP, x, weight, K=int(arr.shape[0]), N=int(arr.shape[1]), bits=32,
                     block_size=1, act_bits=0, tile=nt, _name=y.producer().name)

    # -- MatMul with a constant int8 weight behind DequantizeLinear (QDQ int8 linears, heads)
    @staticmethod
    def dq_pattern(op: Any, x: Any, q: Any, s: Any) -> Any:
        return op.MatMul(x, op.DequantizeLinear(q, s, _allow_other_inputs=True,
                                                _outputs=["w"]), _outputs=["y"])

    @staticmethod
    def dq_check(context: Any, q: Any, s: Any, w: Any, **_: Any) -> bool:
        node = w.producer()
        arrs = [init_array(v) if v is not None else None for v in node.inputs]
        if any(v is not None and a is None for v, a in zip(node.inputs, arrs)):
            return False
        qa, sa = arrs[0], arrs[1]
        if qa is None or qa.ndim != 2 or qa.dtype not in (np.int8, np.uint8) or \
                qa.size < DENSE_MIN_ELEMS or node.attributes.get_int("block_size", 0):
            return False
        axis = node.attributes.get_int("axis", 1) % 2
        return sa.size == 1 or (sa.ndim == 1 and axis == 1 and sa.size == qa.shape[1])

    def dq_rewrite(self, op: Any, x: Any, q: Any, s: Any, w: Any, y: Any) -> Any:
        """The 8-bit weight kept as 8-bit codes (a quarter of the fp32 bytes a decode step
        reads: the head is a fifth of SmolLM2's weights) in the quantized kernel, one block
        along K: ``w = code * s + shift`` with ``code = q`` (uint8) or ``q + 128`` (int8) and
        ``shift = -(zp [+ 128]) * s``, per output column (a per-tensor scale is broadcast)."""
        node = w.producer()
        arrs = [init_array(v) if v is not None else None for v in node.inputs]
        qa = arrs[0]
        k, n = qa.shape
        zp = arrs[2] if len(arrs) > 2 and arrs[2] is not None else np.zeros((), qa.dtype)
        scale = np.broadcast_to(np.asarray(arrs[1], np.float32).reshape(-1), (n,))
        off = np.broadcast_to(np.asarray(zp, np.float32).reshape(-1), (n,))
        codes = qa
        if qa.dtype == np.int8:
            codes, off = (qa.astype(np.int16) + 128).astype(np.uint8), off + 128.0
        packed = (codes, scale.reshape(1, n), (-off * scale).astype(np.float32).reshape(1, n))
        return self._quantized(op, "int8", x, packed, [], y.producer().name, K=int(k), N=int(n),
                               bits=8, block_size=int(k), act_bits=0)

    def rules(self) -> list:
        from onnxscript.rewriter import pattern

        return [pattern.RewriteRule(self.nbits_pattern, self.nbits_rewrite,
                                    name="rotaq_qmatmul_nbits"),
                pattern.RewriteRule(self.dense_pattern, self.dense_rewrite, self.dense_check,
                                    name="rotaq_qmatmul_dense"),
                pattern.RewriteRule(self.dq_pattern, self.dq_rewrite, self.dq_check,
                                    name="rotaq_qmatmul_dequantized")]


def lower_matmuls_ir(model: Any) -> dict[str, int]:
    """Replace each MatMulNBits node, and each MatMul whose second input is a 2-D fp32
    initializer of at least :data:`DENSE_MIN_ELEMS` elements, by ``RotaqQMatMul(A, weight[,
    scale, shift][, bias])`` (attributes ``K``, ``N``, ``bits`` (32: fp32), ``block_size``,
    ``act_bits``, ``tile``) in an ``onnx_ir.Model``; drops the initializers left unread.
    Raises ValueError for a MatMulNBits with ``g_idx`` or non-constant weights. Returns
    counts per kind (``nbits``, ``dense``, ``int8``: behind ``DequantizeLinear``)."""
    rules = _Rules()
    apply_rules(model, rules.rules())
    inits = model.graph.initializers
    for name, value in list(inits.items()):
        if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            del inits[name]
    return dict(rules.counts)


def lower_matmuls(proto: Any) -> dict[str, int]:
    """:func:`lower_matmuls_ir` on an ``onnx.ModelProto``, in place."""
    return on_proto(proto, lower_matmuls_ir, changed=lambda _: True)
