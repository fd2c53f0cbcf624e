"""One-row quantized matmul (decode steps): the factored GEMV kernel
(:func:`tvm_kernels.qgemv_func`) against the unfactored kernel and numpy, with K padded to
whole blocks, bias, 2/4/8 bits, serial and parallel; and its dispatch from
``schedule_qmatmul_cpu``."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from rotaq.backends import tvm_kernels as K


def _inputs(k, n, bits, block, nt, seed):
    rng = np.random.default_rng(seed)
    per, nb = 8 // bits, -(-k // block)
    rows = -(-nb * block // per)
    w = rng.integers(0, 256, (n // nt, rows, nt)).astype(np.uint8)
    sc = rng.standard_normal((n // nt, nb, nt)).astype(np.float32) * 0.1
    sh = rng.standard_normal((n // nt, nb, nt)).astype(np.float32) * 0.1
    x = rng.standard_normal((1, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    # reference dequantized weight [K, N]
    kk = np.arange(k)
    codes = (w[:, kk // per, :] >> ((kk % per) * bits)[None, :, None].astype(np.uint8)) \
        & (2**bits - 1)
    wd = codes * sc[:, kk // block, :] + sh[:, kk // block, :]  # [N/nt, K, nt]
    wd = wd.transpose(1, 0, 2).reshape(k, n)
    return x, w, sc, sh, bias, wd


def _run(func, args, n):
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("k,n,bits,block,bias,parallel", [
    (80, 128, 4, 32, False, False), (80, 128, 4, 32, True, True), (200, 64, 2, 64, True, False),
    (96, 192, 8, 32, False, True), (576, 192, 4, 128, False, False)])
def test_qgemv_matches_numpy(k, n, bits, block, bias, parallel):
    nt = 64
    x, w, sc, sh, b, wd = _inputs(k, n, bits, block, nt, k + n + bits)
    ref = x.astype(np.float64) @ wd + (b if bias else 0)
    func = K.schedule_qgemv_cpu(K.qgemv_func(k, n, bits, block, bias, nt), k, n, nt,
                                parallel=parallel)
    got = _run(func, [x, w, sc, sh, *([b] if bias else [])], n)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("bits,act,expect_gemv", [(4, 0, True), (8, 8, True), (4, 8, True),
                                                 (32, 0, False)])
def test_one_row_dispatch(bits, act, expect_gemv):
    """``schedule_qmatmul_cpu`` takes the factored kernel for one row of a quantized weight
    (also with int8 activations), and gives the same result as the unfactored schedule."""
    k, n, block, nt = 80, 128, 32, 64
    func = K.qmatmul_func(1, k, n, bits, block, act_bits=act, nt=nt)
    sched = K.schedule_qmatmul_cpu(func, 1, n, nt)
    assert ("part" in sched.script()) == expect_gemv
    if bits == 32:
        return
    x, w, sc, sh, _, wd = _inputs(k, n, bits, block, nt, 3)
    got = _run(sched, [x, w, sc, sh], n)
    old = _run(K.schedule_qmatmul_cpu(func.without_attr("rotaq.qmatmul"), 1, n, nt),
               [x, w, sc, sh], n)
    assert np.abs(got - old).max() / np.abs(old).max() < 1e-5
    if not act:
        ref = x.astype(np.float64) @ wd
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_tvm_thread_pool_uses_the_physical_cores():
    """TVM's default pool size halves the logical CPUs on x86 (one thread on a 2-vCPU
    machine); after ``require_tvm`` it has one thread per physical core."""
    import os
    import subprocess
    import sys

    from rotaq.backends.tvm_build import cpu_cores

    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    code = ("from rotaq.backends.tvm import require_tvm; require_tvm(); import tvm_ffi; "
            "print(tvm_ffi.get_global_func('runtime.NumThreads')())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert int(out) == cpu_cores() <= len(os.sched_getaffinity(0))
