"""int4 weights x int8 activations on AVX-512 VNNI: the prefill kernel of ``accuracy_level=4``
``MatMulNBits`` (``w4a8-rotated``) for the TVM backend.

:func:`tvm_kernels.qmatmul_func` simulates ORT's int8 activations in fp32: ``round(x / s) * s``
times the dequantized weight, one fp32 multiply-add per weight, so at 16-128 rows it is slower
than ORT's integer kernel. Here the products are integers, 64 per instruction
(``vpdpbusd``: unsigned bytes x signed bytes, summed in fours into 16 int32 lanes). Per row
``i`` and K block ``b`` (``block`` codes, the weight's quantization block, which is also ORT's
activation block):

    q[i, k]    = round(x[i, k] / s[i, b]),  s[i, b] = max_k |x[i, k]| / 127   (int8)
    y[i, n]    = sum_b s[i, b] * (scale[b, n] * P[i, b, n] + shift[b, n] * Q[i, b])
    P[i, b, n] = sum_{k in b} code[k, n] * q[i, k]      (exact, int32)
    Q[i, b]    = sum_{k in b} q[i, k]

which is ``sum_k (q s) (code * scale + shift)`` of the fp32 kernel with the integer part exact
(the weight ``w = code * scale + shift``, ``shift = -zero_point * scale``). The codes are the
unsigned operand, the quantized rows the signed one, so no offset correction is needed; the 16
lanes are 16 rows (``m`` must be a multiple of 16), each instruction takes four codes of one
output column broadcast. Loop nest: rows quantized once (``[m/16, K/4, 16, 4]`` int8); per N
tile (parallel) the tile's codes unpacked once to four per uint32; per 16 rows and 8 columns,
8 int32 accumulators over a block, then the fp32 update above.

The weights keep the layout of :mod:`tvm_matmul` (codes ``[N/nt, K/2, nt]``, two per byte along
K, scale / shift ``[N/nt, blocks, nt]``), so decode steps read the same parameters through the
one-row kernel. Written as TVMScript with explicit loops (TE's tensorize wanted the global
scope for the accumulator, and TVM's own VNNI intrinsic declares ``<16 x i32>`` operands that
LLVM 19+ rejects).
"""

from __future__ import annotations

from typing import Any

FEATURE = "avx512vnni"  # LLVM's name for the CPU feature


def applies(m: int, k: int, bits: int, block: int, act_bits: int, nt: int) -> bool:
    """Whether :func:`qmatmul_vnni_func` computes this ``RotaqQMatMul`` (given a VNNI CPU)."""
    return (bits == 4 and act_bits == 8 and m >= 16 and m % 16 == 0 and k % 16 == 0
            and block % 16 == 0 and nt % 8 == 0)


def qmatmul_vnni_func(m: int, k: int, n: int, block: int, nt: int = 64) -> Any:
    """The scheduled PrimFunc ``(x [m, k], codes, scale, shift, y [m, n])`` (module doc; a bias
    is added by the caller); ``m`` a multiple of 16, ``k`` and ``block`` of 16, ``nt`` of 8."""
    if not applies(m, k, 4, block, 8, nt):
        raise ValueError(f"the VNNI kernel does not take m={m} k={k} block={block} nt={nt}")
    from tvm.script import tirx as T

    nb = -(-k // block)
    kp, mg, nti, bq, ng = nb * block, m // 16, n // nt, block // 4, nt // 8
    lanes = T.ramp(0, 1, 16)
    vnni = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")

    @T.prim_func(s_tir=True)
    def main(x: T.Buffer((m, k), "float32"), w: T.Buffer((nti, kp // 2, nt), "uint8"),
             sc: T.Buffer((nti, nb, nt), "float32"), sh: T.Buffer((nti, nb, nt), "float32"),
             y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        sa = T.alloc_buffer((nb, m), "float32")  # activation scales, rows contiguous
        qs = T.alloc_buffer((nb, m), "float32")  # sum of a row's codes per block
        qrow = T.alloc_buffer((m, kp), "int8")
        xq = T.alloc_buffer((mg, kp // 4, 16, 4), "int8")  # 16 rows x 4 codes per 64 bytes
        # 1. int8 rows, per block: amax over 16-lane chunks, then round(x / s)
        for row in T.parallel(m):
            for b in range(nb):
                vmax = T.decl_buffer((16,), "float32", scope="local")
                vtot = T.decl_buffer((16,), "float32", scope="local")
                amax = T.decl_buffer((1,), "float32", scope="local")
                vmax[lanes] = T.broadcast(T.float32(0), 16)
                vtot[lanes] = T.broadcast(T.float32(0), 16)
                for r in range(block // 16):
                    if b * block + r * 16 < k:
                        vmax[lanes] = T.max(vmax[lanes], T.fabs(x[row, T.ramp(b * block + r * 16,
                                                                                 1, 16)]))
                amax[0] = T.float32(0)
                for lane in range(16):
                    amax[0] = T.max(amax[0], vmax[lane])
                s = amax[0] / T.float32(127.0)
                sa[b, row] = s
                for r in range(block // 16):
                    if b * block + r * 16 < k and s > T.float32(0):
                        qv = T.round(x[row, T.ramp(b * block + r * 16, 1, 16)]
                                     / T.broadcast(T.max(s, T.float32(1e-30)), 16))
                        qrow[row, T.ramp(b * block + r * 16, 1, 16)] = T.Cast("int8x16", qv)
                        vtot[lanes] = vtot[lanes] + qv
                    else:
                        qrow[row, T.ramp(b * block + r * 16, 1, 16)] = T.broadcast(T.int8(0), 16)
                qs[b, row] = T.float32(0)
                for lane in range(16):
                    qs[b, row] = qs[b, row] + vtot[lane]
        for g in T.parallel(mg):
            for k4 in range(kp // 4):
                for mi in range(16):
                    for ri in T.vectorized(4):
                        xq[g, k4, mi, ri] = qrow[g * 16 + mi, k4 * 4 + ri]
        # 2. per N tile: codes four per uint32, then 16 rows x 8 columns per register tile
        for t in T.parallel(nti):
            wst = T.decl_buffer((kp // 4, nt), "uint32")
            for k4 in range(kp // 4):
                for c in T.vectorized(nt):
                    wst[k4, c] = (
                        T.Cast("uint32", w[t, 2 * k4, c] & T.uint8(15))
                        | (T.Cast("uint32", w[t, 2 * k4, c] >> T.uint8(4)) << T.uint32(8))
                        | (T.Cast("uint32", w[t, 2 * k4 + 1, c] & T.uint8(15)) << T.uint32(16))
                        | (T.Cast("uint32", w[t, 2 * k4 + 1, c] >> T.uint8(4)) << T.uint32(24)))
            for g in range(mg):
                ytile = T.decl_buffer((16, nt), "float32", scope="local")
                for cg in range(ng):
                    yacc = T.decl_buffer((8, 16), "float32", scope="local")
                    acc = T.decl_buffer((8, 16), "int32", scope="local")
                    for u in T.unroll(8):
                        yacc[u, lanes] = T.broadcast(T.float32(0), 16)
                    for b in range(nb):
                        for u in T.unroll(8):
                            acc[u, lanes] = T.broadcast(T.int32(0), 16)
                        for k4 in range(bq):
                            rows = xq.vload([g, b * bq + k4, 0, 0], "int8x64")
                            for u in T.unroll(8):
                                codes = T.reinterpret(T.broadcast(T.reinterpret(
                                    wst[b * bq + k4, cg * 8 + u], dtype="int32"), 16),
                                    dtype="int8x64")
                                acc[u, lanes] = T.call_llvm_pure_intrin(
                                    vnni, acc[u, lanes], codes, rows, dtype="int32x16")
                        for u in T.unroll(8):
                            yacc[u, lanes] = yacc[u, lanes] + sa[b, T.ramp(g * 16, 1, 16)] * (
                                T.broadcast(sc[t, b, cg * 8 + u], 16)
                                * T.Cast("float32x16", acc[u, lanes])
                                + T.broadcast(sh[t, b, cg * 8 + u], 16)
                                * qs[b, T.ramp(g * 16, 1, 16)])
                    for u in range(8):
                        for mi in range(16):
                            ytile[mi, cg * 8 + u] = yacc[u, mi]
                for mi in range(16):
                    for c in T.vectorized(nt):
                        y[g * 16 + mi, t * nt + c] = ytile[mi, c]

    return main
