"""Online Hadamard / Kronecker transforms for the TVM backend.

rotaq emits ``x -> x @ kron(A, B)`` on the last axis as Reshape ``[.., a, b]`` -> MatMul ``B``
-> MatMul ``A^T`` (left) -> Reshape (nodes tagged ``rotaq.role=online_transform``).
:func:`kron_rule` (an onnxscript rewrite rule; :func:`lower_kron` applies it) replaces that
chain by one ``RotaqKron`` node, and :func:`kron_func` is its
kernel: per row, a fast Walsh-Hadamard transform (log2(b) butterfly stages in registers /
L1, no multiplications) along ``b`` when ``B`` is the normalized Sylvester matrix ``H_b /
sqrt(b)`` (a dense ``b x b`` product otherwise), then the ``a`` factor, again by FWHT when it is
Sylvester, else as a small dense product (e.g. 48 for SmolLM2's 1536 = 48 x 32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rotaq import tags
from rotaq.backends.tvm_graph import apply_rules, init_array, on_proto

KRON_OP = "RotaqKron"


def sylvester(n: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix ``H_n / sqrt(n)`` (n a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def _is_sylvester(m: np.ndarray) -> bool:
    n = m.shape[0]
    return n >= 2 and not n & (n - 1) and np.allclose(m, sylvester(n), atol=1e-6)


def _tagged(context: Any, node: Any) -> bool:
    return tags.is_transform(node.metadata_props)


def _kron_pattern(op: Any, x: Any, shape_in: Any, at: Any, bm: Any, shape_out: Any) -> Any:
    t = op.Reshape(x, shape_in, _check=_tagged)
    t = op.MatMul(t, bm, _check=_tagged)
    t = op.MatMul(at, t, _check=_tagged)
    return op.Reshape(t, shape_out, _check=_tagged, _outputs=["y"])


def _kron_check(context: Any, at: Any, bm: Any, **_: Any) -> bool:
    """Both factors are 2-D initializers."""
    return all(arr is not None and arr.ndim == 2 for arr in (init_array(at), init_array(bm)))


def _kron_rewrite(op: Any, x: Any, shape_in: Any, at: Any, bm: Any, shape_out: Any, y: Any
                  ) -> Any:
    a_t = init_array(at).astype(np.float32)
    b_m = init_array(bm).astype(np.float32)
    return op.RotaqKron(x, at, bm, shape_in, shape_out, a=int(a_t.shape[0]),
                        b=int(b_m.shape[0]), fwht_a=int(_is_sylvester(a_t.T)),
                        fwht_b=int(_is_sylvester(b_m)), _name=y.producer().name)


def kron_rule() -> Any:
    """The rewrite rule: a tagged Reshape -> MatMul(., B) -> MatMul(A^T, .) -> Reshape chain
    with constant factors (intermediate values read only inside it) -> ``RotaqKron(x, At, B,
    shape_in, shape_out)`` (attributes ``a``, ``b``, ``fwht_a``, ``fwht_b``), named as the last
    Reshape."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRule(_kron_pattern, _kron_rewrite, _kron_check, name="rotaq_kron")


def lower_kron_ir(model: Any) -> int:
    """Apply :func:`kron_rule` to an ``onnx_ir.Model``; returns the number of chains replaced."""
    return apply_rules(model, [kron_rule()])


def lower_kron(proto: Any) -> int:
    """:func:`lower_kron_ir` on an ``onnx.ModelProto``, in place."""
    return on_proto(proto, lower_kron_ir)


def _fwht_stages(te: Any, tirx: Any, src: Any, m: int, a: int, b: int, axis: int,
                 tag: str) -> Any:
    """log2(n) butterfly stages along ``axis`` (1: the a axis, 2: the b axis) of ``[m, a, b]``,
    scaled by 1/sqrt(n) in the last stage."""
    n = a if axis == 1 else b
    cur = src
    stages = int(math.log2(n))
    for p in range(stages):
        cur = te.compute((m, a, b), _butterfly(tirx, cur, a, b, axis, 1 << p,
                                              1.0 / math.sqrt(n) if p == stages - 1 else 1.0),
                         name=f"{tag}{p}")
    return cur


def _butterfly(tirx: Any, cur: Any, a: int, b: int, axis: int, h: int, scale: float) -> Any:
    def body(r: Any, i: Any, c: Any) -> Any:
        pos = i if axis == 1 else c
        lo = (pos & h) == 0
        if axis == 1:
            up, dn = cur[r, tirx.min(i + h, a - 1), c], cur[r, tirx.max(i - h, 0), c]
        else:
            up, dn = cur[r, i, tirx.min(c + h, b - 1)], cur[r, i, tirx.max(c - h, 0)]
        val = tirx.if_then_else(lo, cur[r, i, c] + up, dn - cur[r, i, c])
        return val * tirx.const(scale, "float32") if scale != 1.0 else val

    return body


def kron_func(m: int, a: int, b: int, fwht_a: bool, fwht_b: bool) -> Any:
    """PrimFunc ``(x [m, a*b], at [a, a], bm [b, b]) -> y [m, a*b]``, ``y = x @ kron(A, B)``
    with ``at = A^T``. With a dense ``a`` factor, ``y`` is that product itself (block ``y``, a
    reduction over the ``a`` axis), so no copy follows it."""
    from tvm import te, tirx

    x = te.placeholder((m, a * b), "float32", name="x")
    at = te.placeholder((a, a), "float32", name="at")
    bm = te.placeholder((b, b), "float32", name="bm")
    x3 = te.compute((m, a, b), lambda r, i, c: x[r, i * b + c], name="xin")
    if fwht_b:
        t = _fwht_stages(te, tirx, x3, m, a, b, 2, "hb")
    else:
        lb = te.reduce_axis((0, b), name="lb")
        t = te.compute((m, a, b), lambda r, i, c: te.sum(x3[r, i, lb] * bm[lb, c], axis=lb),
                       name="db")
    if fwht_a:
        u = _fwht_stages(te, tirx, t, m, a, b, 1, "ha")
        y = te.compute((m, a * b), lambda r, q: u[r, q // b, q % b], name="y")
    else:
        la = te.reduce_axis((0, a), name="la")
        y = te.compute((m, a * b), lambda r, q: te.sum(at[q // b, la] * t[r, la, q % b],
                                                        axis=la), name="y")
    return te.create_prim_func([x, at, bm, y])


# Rows split across threads only from this many on. A row of 1536 = 48 x 32 costs ~1.7 us on one
# Zen 4 core (1.35 us of it the dense 48 x 48 factor, about the AVX-512 FMA peak), so 16 rows
# are ~27 us: measured on a shared 2-core host, waking the pool's second thread and waiting for
# it when another process holds that core cost more than the halved work saves (16 rows: 27.5 us
# on one thread, 35-45 us on two when timed between ORT runs; 17 us on two only when the pool
# is already spinning, as between back-to-back TVM kernels).
PARALLEL_ROWS = 64
# FWHT lines up to this length get their butterflies unrolled per line (LLVM turns them into
# in-register shuffles); longer lines keep row-wide vectorized stages (code size).
LINE_UNROLL = 64


def schedule_kron_cpu(func: Any, m: int, jt: int = 8, parallel: bool | None = None) -> Any:
    """One row at a time, every stage of a row computed at the row loop into a local ``[a, b]``
    buffer (L1-resident); rows in parallel when ``parallel`` (default: ``m >=``
    :data:`PARALLEL_ROWS`).

    - FWHT along ``b``: the first log2(b) - 1 butterfly stages are computed per ``[b]`` line
      (tiny local buffers, unrolled: LLVM keeps them in registers and shuffles), the last one
      into the row buffer, vectorized along ``b``;
    - dense ``a`` factor: ``y[r, j, c] = sum_l At[j, l] t[l, c]`` written straight into ``y``,
      ``jt`` output lines x the ``c`` vector held in registers across ``l``;
    - FWHT along ``a`` (power-of-two ``a``): stages over whole ``[b]`` lines, vectorized."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    r = sch.get_loops(y)[0]
    if m > 1 and (m >= PARALLEL_ROWS if parallel is None else parallel):
        sch.parallel(r)
    names = _stage_blocks(sch)
    stages = [nm for nm in names if nm not in ("y", "xin")]
    for name in reversed(stages):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, r)
        sch.set_scope(blk, 0, "local")
    hb = [nm for nm in stages if nm.startswith("hb")]
    if hb and _extent(sch, sch.get_loops(sch.get_sblock(hb[-1]))[-1]) > LINE_UNROLL:
        hb = []  # long lines: every stage over the row buffer, vectorized along b
    if hb:
        sch.compute_inline(sch.get_sblock("xin"))
        line = sch.get_loops(sch.get_sblock(hb[-1]))[1]
        for name in reversed(hb[:-1]):
            blk = sch.get_sblock(name)
            sch.compute_at(blk, line)
            sch.unroll(sch.get_loops(blk)[-1])
    else:
        blk = sch.get_sblock("xin")
        sch.compute_at(blk, r)
        sch.set_scope(blk, 0, "local")
        stages = ["xin", *stages]
    for name in stages:
        blk = sch.get_sblock(name)
        if name == "db":
            _dense_tiles(sch, blk, sch.get_loops(blk)[1:], jt)
        elif name not in hb[:-1]:
            sch.vectorize(sch.get_loops(blk)[-1])
    if any(nm.startswith("ha") for nm in names):
        sch.vectorize(sch.get_loops(y)[-1])
    else:
        _, q, red = sch.get_loops(y)
        j, c = sch.split(q, [None, _extent(sch, q) // _extent(sch, red)])  # [a * b] -> [a, b]
        _dense_tiles(sch, y, [j, c, red], jt)
    return sch.mod["main"]


def _dense_tiles(sch: Any, blk: Any, loops: list, jt: int) -> None:
    """[j, c, l] -> [jo, l, ji, c]: ``jt`` output lines x the ``c`` vector held across ``l``."""
    j, c, red = loops
    ext = _extent(sch, j)
    t = jt if jt > 1 and ext % jt == 0 else 1
    jo, ji = sch.split(j, [None, t])
    sch.reorder(jo, red, ji, c)
    sch.vectorize(c)
    if t > 1:
        sch.unroll(ji)
    sch.decompose_reduction(blk, red)


def _extent(sch: Any, loop: Any) -> int:
    return int(sch.get(loop).extent)


def _stage_blocks(sch: Any) -> list[str]:
    names = []
    for prefix, limit in (("xin", 1), ("hb", 16), ("db", 1), ("ha", 16), ("da", 1)):
        cands = [prefix] if limit == 1 else [f"{prefix}{p}" for p in range(limit)]
        for name in cands:
            try:
                sch.get_sblock(name)
                names.append(name)
            except Exception:  # noqa: BLE001, S112 - absent stage
                continue
    return names
