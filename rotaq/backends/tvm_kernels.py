"""TIR kernels of the TVM backend: weight-dequantize matmul (int2/4/8 packed or fp32 weights,
optional blocked int8 activation quantization) and the fast Walsh-Hadamard transform.

``qmatmul_func`` returns a PrimFunc ``y[m, n] = sum_k a(x)[m, k] * w(k, n) (+ bias[n])`` where
``w(k, n) = code(k, n) * scale[k // block, n] + shift[k // block, n]`` is unpacked from ``uint8
[ceil(K / per), N]`` (``per = 8 / bits`` codes along K in one byte, low bits first), or read
from an fp32 ``[K, N]`` weight (``bits=32``). With ``act_bits=8`` ``a(x)`` is ORT's
``accuracy_level=4`` activation: per row and block of ``block`` along K, ``round(x / s) * s``
with ``s = amax / 127``. CPU schedules vectorize along N (the weight layout puts N innermost),
parallelize N tiles and keep an ``mt x nt`` accumulator tile in registers; GPU builds leave
scheduling to dlight.

``fwht_func`` is ``y = x @ (H_n / sqrt(n))`` on the last axis (n a power of two, Sylvester
order) as log2(n) in-place butterfly stages, optionally followed by a small dense factor for
Kronecker sizes: ``x @ kron(A, H_n/sqrt(n))``.
"""

from __future__ import annotations

import math
from typing import Any

_VEC = 16  # fp32 lanes per AVX-512 register


def _te():
    from tvm import te, tirx

    return te, tirx


def qmatmul_func(m: int, k: int, n: int, bits: int, block: int, act_bits: int = 0,
                 has_bias: bool = False) -> Any:
    """The unscheduled PrimFunc (see module doc). ``bits`` in (2, 4, 8, 32)."""
    te, tirx = _te()
    x = te.placeholder((m, k), "float32", name="x")
    if bits == 32:
        w = te.placeholder((k, n), "float32", name="w")
        params = [x, w]
    else:
        per = 8 // bits
        nb = -(-k // block)
        w = te.placeholder((-(-nb * block // per), n), "uint8", name="w")
        sc = te.placeholder((nb, n), "float32", name="scale")
        sh = te.placeholder((nb, n), "float32", name="shift")
        params = [x, w, sc, sh]
    bias = te.placeholder((n,), "float32", name="bias") if has_bias else None
    if bias is not None:
        params.append(bias)

    a = x
    if act_bits:
        nb_a = -(-k // block)
        r = te.reduce_axis((0, block), name="r")
        amax = te.compute(
            (m, nb_a),
            lambda i, b: te.max(
                tirx.if_then_else(b * block + r < k, tirx.abs(x[i, tirx.min(b * block + r, k - 1)]),
                                  tirx.const(0.0, "float32")), axis=r),
            name="amax")
        qmax = float(2 ** (act_bits - 1) - 1)

        def _aq(i, kk):
            s = amax[i, kk // block] / qmax
            safe = tirx.max(s, tirx.const(1e-30, "float32"))
            q = tirx.round(x[i, kk] / safe)
            return tirx.if_then_else(s > 0, q * s, tirx.const(0.0, "float32"))

        a = te.compute((m, k), _aq, name="aq")

    def _w(kk, j):
        if bits == 32:
            return w[kk, j]
        per = 8 // bits
        byte = w[kk // per, j]
        code = (byte >> ((kk % per) * bits).astype("uint8")) & tirx.const(2**bits - 1, "uint8")
        return code.astype("float32") * sc[kk // block, j] + sh[kk // block, j]

    rk = te.reduce_axis((0, k), name="rk")
    y = te.compute((m, n), lambda i, j: te.sum(a[i, rk] * _w(rk, j), axis=rk), name="mm")
    if bias is not None:
        y = te.compute((m, n), lambda i, j: y[i, j] + bias[j], name="bias_add")
    return te.create_prim_func([*params, y])


def _pick_nt(n: int) -> int:
    for nt in (64, 32, 16, 8, 4, 2, 1):
        if n % nt == 0:
            return nt
    return 1


def schedule_qmatmul_cpu(func: Any, m: int, n: int, threads: int = 0) -> Any:
    """CPU schedule: parallel N tiles, an ``mt x nt`` register tile, K outermost inside the tile,
    the N tile vectorized; the optional activation quantizer is computed once per row block."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = _block_names(sch, ("aq", "amax", "bias_add"))
    if "aq" in names:
        sch.parallel(sch.get_loops(sch.get_sblock("amax"))[0]) if m > 1 else None
        sch.parallel(sch.get_loops(sch.get_sblock("aq"))[0]) if m > 1 else None
    mm = sch.get_sblock("mm")
    i, j, rk = sch.get_loops(mm)
    nt = _pick_nt(n)
    mt = 1 if m == 1 else next(t for t in (4, 2, 1) if m % t == 0)
    jo, ji = sch.split(j, [None, nt])
    io, ii = sch.split(i, [None, mt])
    sch.reorder(jo, io, rk, ii, ji)
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, io)
    sch.parallel(sch.fuse(jo, io) if m > 1 else jo)
    if nt >= 4:
        sch.vectorize(ji)
    if mt > 1:
        sch.unroll(ii)
    sch.decompose_reduction(mm, rk)
    sch.vectorize(sch.get_loops(acc)[-1])
    if "bias_add" in names:
        badd = sch.get_sblock("bias_add")
        sch.reverse_compute_at(badd, sch.get_loops(acc)[0])
        sch.vectorize(sch.get_loops(badd)[-1])
    return sch.mod["main"]


def _block_names(sch: Any, candidates: tuple[str, ...]) -> set[str]:
    found = set()
    for name in candidates:
        try:
            sch.get_sblock(name)
            found.add(name)
        except Exception:  # noqa: BLE001 - a missing block raises a ScheduleError
            pass
    return found


def fwht_func(m: int, a: int, n: int, dense: Any = None) -> Any:
    """``y[i, :] = x[i, :] @ kron(A, H_n / sqrt(n))`` for x ``[m, a * n]`` (``A`` = ``dense``
    ``[a, a]``, identity when ``a == 1``); n a power of two. Butterflies in TVMScript-free TIR
    built with ``ir_builder``: each row is copied to a local buffer, transformed in place
    (log2(n) stages per block of n), mixed across blocks by A, and written out."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if n & (n - 1):
        raise ValueError(f"FWHT needs a power of two, got {n}")
    width = a * n
    stages = int(math.log2(n))
    norm = 1.0 / math.sqrt(n)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("fwht")
            T.func_attr({"tirx.noalias": True})
            x = T.arg("x", T.Buffer((m, width), "float32"))
            extra = []
            if a > 1:
                amat = T.arg("amat", T.Buffer((a, a), "float32"))
                extra.append(amat)
            y = T.arg("y", T.Buffer((m, width), "float32"))
            with T.parallel(0, m) as i:
                buf = T.alloc_buffer((width,), "float32", scope="local")
                with T.serial(0, width) as c:
                    T.buffer_store(buf, x[i, c] * norm, [c])
                h = 1
                for _ in range(stages):
                    with T.serial(0, width // 2) as p:
                        # pair p -> positions lo, lo + h inside its block of 2h
                        lo = (p // h) * (2 * h) + p % h
                        u = T.buffer_load(buf, [lo]) if hasattr(T, "buffer_load") else buf[lo]
                        v = buf[lo + h]
                        T.buffer_store(buf, u + v, [lo])
                        T.buffer_store(buf, u - v, [lo + h])
                    h *= 2
                if a == 1:
                    with T.vectorized(0, width) as c:
                        T.buffer_store(y, buf[c], [i, c])
                else:
                    with T.serial(0, a) as r:
                        with T.vectorized(0, n) as c:
                            T.buffer_store(y, tirx.const(0.0, "float32"), [i, r * n + c])
                        with T.serial(0, a) as s:
                            with T.vectorized(0, n) as c:
                                T.buffer_store(y, y[i, r * n + c] + buf[s * n + c] * amat[s, r],
                                               [i, r * n + c])
    return ib.get()


def fwht_lanes() -> int:
    return _VEC


def gpu_rules() -> list:
    """dlight GPU schedule rules, most specific first (rotaq's dequantize-matmuls are matched
    by the GEMV / low-batch GEMV / Matmul rules)."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
