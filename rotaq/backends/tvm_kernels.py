"""TIR kernels of the TVM backend: weight-dequantize matmul (int2/4/8 packed or fp32 weights,
optional blocked int8 activation quantization).

``qmatmul_func`` returns a PrimFunc ``y[m, n] = sum_k a(x)[m, k] * w(k, n) (+ bias[n])`` where
``w(k, n) = code(k, n) * scale[k // block, n] + shift[k // block, n]`` is unpacked from ``uint8
[ceil(K / per), N]`` (``per = 8 / bits`` codes along K in one byte, low bits first), or read
from an fp32 ``[K, N]`` weight (``bits=32``). With ``act_bits=8`` ``a(x)`` is ORT's
``accuracy_level=4`` activation: per row and block of ``block`` along K, ``round(x / s) * s``
with ``s = amax / 127``. CPU schedules vectorize along N (the weight layout puts N innermost),
parallelize N tiles and keep an ``mt x nt`` accumulator tile in registers; GPU builds leave
scheduling to dlight.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _te():
    from tvm import te, tirx

    return te, tirx


def _weights(te: Any, x: Any, k: int, n: int, bits: int, block: int, nt: int,
             has_bias: bool) -> tuple[list, Any]:
    """The matmul kernels' parameters after ``x``: the weight tiled along N (fp32 ``[N/nt, K,
    nt]`` for ``bits`` 32, else codes ``uint8 [N/nt, K/per, nt]`` packed along K plus scale and
    shift ``[N/nt, blocks, nt]``), then the optional bias. Returns (params, bias or None)."""
    if bits == 32:
        params = [x, te.placeholder((n // nt, k, nt), "float32", name="w")]
    else:
        per, nb = 8 // bits, -(-k // block)
        params = [x, te.placeholder((n // nt, -(-nb * block // per), nt), "uint8", name="w"),
                  te.placeholder((n // nt, nb, nt), "float32", name="scale"),
                  te.placeholder((n // nt, nb, nt), "float32", name="shift")]
    bias = te.placeholder((n,), "float32", name="bias") if has_bias else None
    if bias is not None:
        params.append(bias)
    return params, bias


def _act_quant(te: Any, tirx: Any, x: Any, m: int, k: int, block: int, act_bits: int) -> Any:
    """ORT's ``accuracy_level=4`` activation of ``x [m, k]``: per row and block of ``block``
    along K, ``round(x / s) * s`` with ``s = amax / (2^(act_bits-1) - 1)`` (stages ``amax``,
    ``aq``); one expression for the GEMM and the one-row kernel, so both round alike."""
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

    return te.compute((m, k), _aq, name="aq")


def qmatmul_func(m: int, k: int, n: int, bits: int, block: int, act_bits: int = 0,
                 has_bias: bool = False, nt: int = 1) -> Any:
    """The unscheduled PrimFunc (see module doc). ``bits`` in (2, 4, 8, 32); weights tiled
    ``[N / nt, rows, nt]`` (``rows`` = K for fp32, ``ceil(K_padded / per)`` bytes otherwise),
    scale / shift ``[N / nt, blocks, nt]``, so a tile streams contiguously along K."""
    te, tirx = _te()
    if n % nt:
        raise ValueError(f"N={n} is not a multiple of the tile {nt}")
    x = te.placeholder((m, k), "float32", name="x")
    params, bias = _weights(te, x, k, n, bits, block, nt, has_bias)
    w, sc, sh = params[1:4] if bits < 32 else (params[1], None, None)

    a = _act_quant(te, tirx, x, m, k, block, act_bits) if act_bits else x

    if bits == 32:
        wd = w
        rk = te.reduce_axis((0, k), name="rk")
        y = te.compute((m, n), lambda i, j: te.sum(a[i, rk] * wd[j // nt, rk, j % nt], axis=rk),
                       name="mm")
    else:
        per = 8 // bits

        def _w(t, kk, c):
            byte = w[t, kk // per, c]
            code = (byte >> ((kk % per) * bits).astype("uint8")) & tirx.const(2**bits - 1, "uint8")
            return code.astype("float32") * sc[t, kk // block, c] + sh[t, kk // block, c]

        wd = te.compute((n // nt, k, nt), _w, name="wdeq")
        rk = te.reduce_axis((0, k), name="rk")
        y = te.compute((m, n), lambda i, j: te.sum(a[i, rk] * wd[j // nt, rk, j % nt], axis=rk),
                       name="mm")
    if bias is not None:
        y = te.compute((m, n), lambda i, j: y[i, j] + bias[j], name="bias_add")
    spec = {"k": k, "bits": bits, "block": block, "act_bits": act_bits, "bias": int(has_bias)}
    return te.create_prim_func([*params, y]).with_attr("rotaq.qmatmul", spec)


# N tiles run in parallel from this many multiply-adds (m * K * N) on; below it one thread
# does the work: waking the pool costs more than the halved work saves, and far more when other
# processes hold the cores (the k/v projection at one token: 2.1 ms per call in a profile taken
# beside a compile job, for ~10 us of work). Was 1M, measured while TVM's pool had one thread
# (its default on 2 vCPUs, see tvm_build.cpu_cores); with 2 threads on an idle machine the
# factored one-row int4 kernel takes 10.2 / 15.0 us parallel / serial for 576 x 576 (332k),
# 21.3 / 35.4 for 576 x 1536, 6.0 / 7.0 for 576 x 192 (110k, kept serial).
PARALLEL_MACS = 1 << 18


def pick_tile(n: int) -> int:
    """The N tile of the weight layout: 64 lanes when N allows it."""
    for nt in (64, 32, 16, 8, 4, 2, 1):
        if n % nt == 0:
            return nt
    return 1


def schedule_qmatmul_cpu(func: Any, m: int, n: int, nt: int, mt: int = 0,
                         kunroll: int = 0, avx512: bool = False) -> Any:
    """CPU schedule: parallel N tiles (the weight tile ``nt``); for one row of a quantized
    weight (with or without activation quantization), :func:`qgemv_func` (the affine
    dequantization factored out of the K loop: -10% to -17% on SmolLM2's int4 shapes); for one
    row of an fp32 weight the weight is read inline (GEMV); for more rows it is decoded once per
    tile into a local buffer and reused by every ``mt``-row register tile (GEMM); K outermost
    inside the tile, N vectorized;
    the optional activation quantizer is computed once. ``avx512`` (32 vector registers of 16
    lanes): ``mt`` up to 4, so the 4 x 64 accumulator tile takes 16 registers instead of
    spilling as 8 x 64 does, and K unrolled by 4 for one row (znver4, SmolLM2's int4 linears:
    -20% for 576 x 1536 and 1536 x 576 at 16 rows, up to -12% at one row); otherwise ``mt`` up
    to 8, K unrolled by 2."""
    from tvm import s_tir

    spec = func.attrs.get("rotaq.qmatmul") if func.attrs is not None else None
    if m == 1 and spec is not None and int(spec["bits"]) < 32:
        k, bits, block = int(spec["k"]), int(spec["bits"]), int(spec["block"])
        gemv = qgemv_func(k, n, bits, block, bool(int(spec["bias"])), nt, int(spec["act_bits"]))
        return schedule_qgemv_cpu(gemv, k, n, nt, parallel=k * n >= PARALLEL_MACS)
    if not kunroll:
        kunroll = 4 if avx512 and m == 1 else 2

    sch = s_tir.Schedule(func)
    names = _block_names(sch, ("aq", "amax", "bias_add", "wdeq"))
    if "aq" in names and m > 1:
        sch.parallel(sch.get_loops(sch.get_sblock("amax"))[0])
        sch.parallel(sch.get_loops(sch.get_sblock("aq"))[0])
    mm = sch.get_sblock("mm")
    i, j, rk = sch.get_loops(mm)
    k = _extent(sch, rk)
    tiles = (4, 2, 1) if avx512 else (8, 4, 2, 1)
    mt = mt if mt and m % mt == 0 else (1 if m == 1 else next(t for t in tiles if m % t == 0))
    jo, ji = sch.split(j, [None, nt])
    io, ii = sch.split(i, [None, mt])
    if kunroll > 1 and _extent(sch, rk) % kunroll == 0:
        rk, rki = sch.split(rk, [None, kunroll])
        sch.reorder(jo, io, rk, rki, ii, ji)
        sch.unroll(rki)
    else:
        sch.reorder(jo, io, rk, ii, ji)
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, io)
    staged = "wdeq" in names and m > 1
    if "wdeq" in names and not staged:
        sch.compute_inline(sch.get_sblock("wdeq"))
    if m * k * n >= PARALLEL_MACS:
        sch.parallel(jo if staged or m == 1 else sch.fuse(jo, io))
    if nt >= 4:
        sch.vectorize(ji)
    if mt > 1:
        sch.unroll(ii)
    sch.decompose_reduction(mm, rk)
    sch.vectorize(sch.get_loops(acc)[-1])
    if staged:
        wdeq = sch.get_sblock("wdeq")
        sch.compute_at(wdeq, jo)
        sch.set_scope(wdeq, 0, "local")
        sch.vectorize(sch.get_loops(wdeq)[-1])
    if "bias_add" in names:
        badd = sch.get_sblock("bias_add")
        sch.reverse_compute_at(badd, sch.get_loops(acc)[0])
        sch.vectorize(sch.get_loops(badd)[-1])
    return sch.mod["main"]


def schedule_qmatmul_gpu(func: Any, m: int, n: int, nt: int = 0) -> Any:
    """GPU schedule: one thread per output element (blocks of 128 or 32 along N, rows on
    blockIdx.y), the K reduction serial in registers with the weight decoded inline; the
    activation quantizer and bias one thread per element."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = _block_names(sch, ("aq", "amax", "bias_add", "wdeq"))
    if "wdeq" in names:
        sch.compute_inline(sch.get_sblock("wdeq"))
    for name in ("amax", "aq", "bias_add"):
        if name in names:
            loops = sch.get_loops(sch.get_sblock(name))
            bx, tx = sch.split(sch.fuse(*loops[:2]), [None, 64])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
    mm = sch.get_sblock("mm")
    i, j, rk = sch.get_loops(mm)
    jo, ji = sch.split(j, [None, 128 if n % 128 == 0 else 32])
    sch.reorder(i, jo, ji, rk)
    sch.bind(i, "blockIdx.y")
    sch.bind(jo, "blockIdx.x")
    sch.bind(ji, "threadIdx.x")
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, ji)
    sch.decompose_reduction(mm, rk)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _extent(sch: Any, loop: Any) -> int:
    return int(sch.get(loop).extent)


def _block_names(sch: Any, candidates: tuple[str, ...]) -> set[str]:
    found = set()
    for name in candidates:
        try:
            sch.get_sblock(name)
            found.add(name)
        except Exception:  # noqa: BLE001, S110 - a missing block raises a ScheduleError
            pass
    return found


def gpu_rules() -> list:
    """dlight GPU schedule rules, most specific first, each guarded: a rule that fails on a
    function (e.g. dlight's GEMV analysis on a reduction of extent 1) passes it on to the next
    rule instead of failing the build."""
    from tvm.s_tir import dlight as dl

    class Guarded(dl.ScheduleRule):
        def __init__(self, rule: Any):
            self.rule = rule

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return self.rule.apply(func, target, tunable)
            except Exception as err:  # noqa: BLE001 - fall through to the next rule
                log.debug("dlight %s skipped a function: %s", type(self.rule).__name__, err)
                return None

    return [Guarded(r) for r in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                 dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                 dl.gpu.Fallback())]


def qgemv_func(k: int, n: int, bits: int, block: int, has_bias: bool = False,
               nt: int = 64, act_bits: int = 0) -> Any:
    """One-row quantized matmul with the affine dequantization factored out of the K loop:
    ``y[j] = sum_b scale[b, j] * sum_r x[b, r] code[b, r, j] + shift[b, j] * sum_r x[b, r]``
    (``r`` over a block of ``block`` codes): one multiply-add per weight instead of two, and
    scale / shift read once per block instead of once per code. Same parameters and layout as
    :func:`qmatmul_func` (``bits`` < 32); ``x`` is zero-padded to whole blocks once, after the
    optional activation quantizer (``act_bits``, the same rounding as :func:`qmatmul_func`)."""
    te, tirx = _te()
    per, nb = 8 // bits, -(-k // block)
    x = te.placeholder((1, k), "float32", name="x")
    params, bias = _weights(te, x, k, n, bits, block, nt, has_bias)
    w, sc, sh = params[1:4]
    a = _act_quant(te, tirx, x, 1, k, block, act_bits) if act_bits else x
    xp = te.compute((nb * block,), lambda kk: tirx.if_then_else(
        kk < k, a[0, tirx.min(kk, k - 1)], tirx.const(0.0, "float32")), name="xpad")
    r = te.reduce_axis((0, block), name="r")
    xs = te.compute((nb,), lambda b: te.sum(xp[b * block + r], axis=r), name="xsum")

    def _code(t, kk, c):
        byte = w[t, kk // per, c]
        return ((byte >> ((kk % per) * bits).astype("uint8"))
                & tirx.const(2**bits - 1, "uint8")).astype("float32")

    r2 = te.reduce_axis((0, block), name="r2")
    part = te.compute((nb, n), lambda b, j: te.sum(
        xp[b * block + r2] * _code(j // nt, b * block + r2, j % nt), axis=r2), name="part")
    rb = te.reduce_axis((0, nb), name="rb")
    y = te.compute((1, n), lambda i, j: te.sum(
        part[rb, j] * sc[j // nt, rb, j % nt] + xs[rb] * sh[j // nt, rb, j % nt], axis=rb),
        name="mm")
    if bias is not None:
        y = te.compute((1, n), lambda i, j: y[i, j] + bias[j], name="bias_add")
    return te.create_prim_func([*params, y])


def schedule_qgemv_cpu(func: Any, k: int, n: int, nt: int = 64, kunroll: int = 4,
                       parallel: bool = False) -> Any:
    """CPU schedule of :func:`qgemv_func`: per N tile (parallel when asked), per block, the
    ``nt``-lane partial sum in registers over the block's codes (unrolled by ``kunroll``,
    vectorized along N), then scale / shift applied into the tile's accumulator."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = _block_names(sch, ("bias_add",))
    mm = sch.get_sblock("mm")
    i, j, rb = sch.get_loops(mm)
    jo, ji = sch.split(j, [None, nt])
    sch.reorder(i, jo, rb, ji)
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, jo)
    if parallel:  # before decompose_reduction: a parallel loop takes whole reduction blocks
        sch.parallel(jo)
    part = sch.get_sblock("part")
    sch.compute_at(part, rb)
    sch.set_scope(part, 0, "local")
    pj, pr = sch.get_loops(part)[-2:]
    if kunroll > 1:
        pr, pri = sch.split(pr, [None, kunroll])
        sch.reorder(pr, pri, pj)
        sch.unroll(pri)
    else:
        sch.reorder(pr, pj)
    sch.vectorize(pj)
    sch.decompose_reduction(part, pr)
    sch.vectorize(ji)
    sch.decompose_reduction(mm, rb)
    sch.vectorize(sch.get_loops(acc)[-1])
    if "bias_add" in names:
        badd = sch.get_sblock("bias_add")
        sch.reverse_compute_at(badd, sch.get_loops(acc)[-2])
        sch.vectorize(sch.get_loops(badd)[-1])
    return sch.mod["main"]
