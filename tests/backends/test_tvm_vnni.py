"""The int4 x int8 VNNI prefill kernel (:mod:`rotaq.backends.tvm_vnni`): against numpy's
``accuracy_level=4`` reference and rotaq's fp32 kernel on the same repacked weights (K with a
zero-padded last block, several tiles and row groups), and its dispatch from the importer.
The numbers need a CPU with AVX-512 VNNI; the build for such a CPU is checked everywhere."""

import numpy as np
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from rotaq.backends import tvm_kernels as K
from rotaq.backends import tvm_vnni as V
from rotaq.backends.tvm_build import cpu_features
from rotaq.backends.tvm_matmul import tile
from tests.backends.nbits import act_int8, random_nbits

VNNI_CPU = "znver4"  # any AVX-512 VNNI CPU: code for it builds on every host


def _host_target():
    from rotaq.backends import tvm as tb

    return tb.make_target("llvm")


@pytest.mark.parametrize("m,k,n,block,nt", [(16, 80, 64, 32, 32), (32, 128, 128, 64, 64),
                                            (48, 64, 48, 16, 16)])
def test_vnni_kernel_matches_the_reference_and_the_fp32_kernel(m, k, n, block, nt):
    target = _host_target()
    if V.FEATURE not in cpu_features(target):
        pytest.skip(f"this CPU ({target.attrs.get('mcpu')}) has no AVX-512 VNNI to run the "
                    "kernel on; its build is tested by test_vnni_kernel_builds_anywhere")
    rep, w = random_nbits(np.random.default_rng(m + k), k, n, 4, block)
    x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
    x[3, :] = 0.0  # a row whose scale is zero
    args = [x, *(tile(a, nt) for a in rep)]
    outs = []
    for func in (V.qmatmul_vnni_func(m, k, n, block, nt),
                 K.schedule_qmatmul_cpu(K.qmatmul_func(m, k, n, 4, block, 8, nt=nt), m, n, nt)):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        outs.append(out.numpy())
    ref = act_int8(x, k, block) @ w
    scale = np.abs(ref).max()
    assert np.abs(outs[0] - ref).max() < 1e-5 * scale
    assert np.abs(outs[0] - outs[1]).max() < 1e-5 * scale
    assert np.all(outs[0][3] == 0)


def test_vnni_kernel_builds_anywhere():
    func = V.qmatmul_vnni_func(16, 64, 64, 32, 64)
    target = tvm.target.Target({"kind": "llvm", "mcpu": VNNI_CPU})
    assert V.FEATURE in cpu_features(target)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    # 16 rows x 64 columns x 2 blocks of 8 groups of four: 16 unrolled 8-column steps x 4
    assert lib.mod.inspect_source("asm").count("vpdpbusd") >= 8


@pytest.mark.parametrize("m,k,bits,block,act,nt,ok", [
    (16, 576, 4, 128, 8, 64, True), (128, 1536, 4, 128, 8, 64, True),
    (1, 576, 4, 128, 8, 64, False),  # one row: the one-row kernel
    (24, 576, 4, 128, 8, 64, False),  # rows not a multiple of 16
    (16, 576, 4, 128, 0, 64, False),  # float activations
    (16, 576, 8, 128, 8, 64, False), (16, 72, 4, 24, 8, 64, False), (16, 576, 4, 128, 8, 4, False)])
def test_vnni_applies(m, k, bits, block, act, nt, ok):
    assert V.applies(m, k, bits, block, act, nt) is ok


def test_importer_sends_int8_activation_matmuls_to_the_vnni_kernel(tmp_path):
    """A MatMulNBits at accuracy level 4 on 16 rows: the VNNI kernel when the target has the
    feature, rotaq's fp32 kernel otherwise; the bias added after it. Compiled for this CPU, the
    artefact agrees with ORT's own int8 kernel on the same node."""
    from rotaq.backends.tvm_import import import_onnx

    k, n, block = 64, 64, 32
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // block, block // 2)).astype(np.uint8)
    inits = [helper.make_tensor("b", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("s", TensorProto.FLOAT, [n * k // block],
                                (rng.random(n * k // block) * 0.1).astype(np.float32)),
             helper.make_tensor("bias", TensorProto.FLOAT, [n],
                                rng.standard_normal(n).astype(np.float32))]
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "", "", "bias"], ["y"], name="q",
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [16, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [16, n])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    for features, vnni in ((frozenset({"avx512f", V.FEATURE}), 1), (frozenset({"avx512f"}), 0)):
        mod, _, _, stats = import_onnx(proto.__deepcopy__(), cpu=True, features=features)
        assert (stats["qmatmul_vnni"], stats["qmatmul"]) == (vnni, 1 - vnni)
        names = [gv.name_hint for gv in mod.functions]
        assert any(nm.startswith("qmatmul_vnni") for nm in names) == bool(vnni)
    if V.FEATURE not in cpu_features(_host_target()):
        return  # the dispatch is checked above; running it needs the feature
    import onnxruntime as ort

    from rotaq.backends import tvm as tb

    path = str(tmp_path / "q.onnx")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    meta = tb.compile_tvm(path, str(tmp_path / "art"), progress=False)
    assert next(iter(meta["buckets"].values()))["stats"]["qmatmul_vnni"] == 1
    x = np.random.default_rng(1).standard_normal((16, k)).astype(np.float32)
    got = tb.load(str(tmp_path / "art")).graph.run({"x": x})[0]
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
