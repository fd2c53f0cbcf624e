"""ONNX Runtime lowering of quantized linears: numerics against simulations, fused ORT kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as oir
import pytest
from onnx import TensorProto, helper, numpy_helper

import rotaq.backends.ort as ort_backend
from rotaq.errors import RewriteError
from rotaq.linalg.quant import (
    QFormat,
    calibrate_per_tensor,
    quantize_per_tensor,
    quantize_per_token,
    quantize_rtn,
)
from rotaq.rewriter import onnx_quant as oq
from rotaq.rewriter.onnx import OnnxGraph
from rotaq.rewriter.sites import ActQuant

EXACT = ort_backend.EXACT  # ORT by default fuses weight-only DQ+MatMul with int8 activations
A8 = ActQuant(8, "dynamic")
W8 = QFormat("int", 8)
W4 = QFormat("int", 4, True, 32)
W4_ASYM = QFormat("int", 4, False, 32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------ hand-built graphs
def _model(k=256, n=64, *, kind="matmul", bias=True, shape=("b", "s"), opset=20, seed=0):
    """x -> linear -> y. kind: matmul (W [k, n]), transpose (MatMul(x, Transpose(W [n, k]))),
    gemm (transB=1, alpha, beta, C), reducemean (x - ReduceMean(x, axes attr) first; opset 17)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "b")]
    nodes = []
    x = "x"
    if kind == "reducemean":
        nodes += [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1),
                  helper.make_node("Sub", ["x", "mu"], ["xc"])]
        x = "xc"
    if kind == "gemm":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "W"))
        ins = [x, "W", "b"] if bias else [x, "W"]
        nodes.append(helper.make_node("Gemm", ins, ["y"], name="lin", transB=1, alpha=0.5,
                                      beta=2.0))
    else:
        if kind == "transpose":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt"))
            nodes.append(helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]))
        else:
            inits.append(numpy_helper.from_array(w, "W"))
        nodes.append(helper.make_node("MatMul", [x, "W"], ["h" if bias else "y"], name="lin"))
        if bias:
            nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="add"))
    dims = [*shape, k]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return OnnxGraph.from_proto(proto)


def _x(shape=(2, 5), k=256, seed=1):
    return np.random.default_rng(seed).standard_normal((*shape, k)).astype(np.float32)


def _quantized(fmt, act=None, lowering="auto", **kw):
    g = _model(**kw)
    w, b = g.get_linear("lin")
    qw = quantize_rtn(w, fmt)
    name = oq.quantize_linear(g, "lin", qw, act, lowering)
    assert name == "y"
    return g, qw, b


def _float_ref(x, qw, b):
    y = x.astype(np.float64) @ qw.dequantize().T
    return y if b is None else y + b


def _dynamic_u8(x):
    """ONNX DynamicQuantizeLinear + DequantizeLinear in float32, per tensor."""
    x = np.asarray(x, np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zp = np.clip(np.rint(np.float32(-lo) / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return (q - zp).astype(np.float64) * np.float64(scale)


@pytest.mark.parametrize(
    ("fmt", "lowering", "kernel"),
    [
        (W8, "qdq", "com.microsoft.MatMulNBits"),
        (W8, "matmulnbits", "com.microsoft.MatMulNBits"),
        (W8, "dequant", "MatMul"),
        (W4, "qdq", "com.microsoft.MatMulNBits"),
        (W4, "matmulnbits", "com.microsoft.MatMulNBits"),
        (W4_ASYM, "qdq", "com.microsoft.MatMulNBits"),
        (W4_ASYM, "matmulnbits", "com.microsoft.MatMulNBits"),
        (QFormat("int", 4, False, 64), "auto", "com.microsoft.MatMulNBits"),
        (QFormat("int", 4, True, 128), "auto", "com.microsoft.MatMulNBits"),
        (QFormat("int", 2, False, 32), "matmulnbits", "com.microsoft.MatMulNBits"),
        (QFormat("int", 3, True, 32), "auto", "com.microsoft.MatMulNBits"),  # int4 QDQ
        (QFormat("int", 8, True, 128), "matmulnbits", "com.microsoft.MatMulNBits"),
        (QFormat("int", 4, True, -1), "matmulnbits", "com.microsoft.MatMulNBits"),  # block = K
        (QFormat("nvfp4"), "auto", "MatMul"),
    ],
)
def test_weight_only_matches_dequantized_weights(fmt, lowering, kernel):
    g, qw, b = _quantized(fmt, None, lowering)
    x = _x()
    ref = _float_ref(x, qw, b)
    assert _rel(ort_backend.ort_session(g, "all", EXACT).run(None, {"x": x})[0], ref) < 1e-5
    assert _rel(ort_backend.ort_session(g, "disable").run(None, {"x": x})[0], ref) < 1e-5
    # the adapter's own session (ORT defaults): exact for MatMulNBits we emit (accuracy_level 0);
    # a QDQ weight is fused with ORT's default accuracy_level 4 (int8 activations inside)
    out = g.run({"x": x})[0]
    exact = lowering == "matmulnbits" or fmt.kind != "int" or lowering == "dequant" or (
        lowering == "auto" and fmt.bits in (2, 4))
    assert _rel(out, ref) < (1e-5 if exact else 2e-2)
    report = ort_backend.ort_kernel_report(g)
    assert report.get(kernel) == 1
    assert "Gemm" not in report
    if kernel != "MatMul":
        assert "MatMul" not in report and "DequantizeLinear" not in report


def test_matmulnbits_layout_and_metadata():
    g, qw, b = _quantized(W4_ASYM, None, "matmulnbits", k=256, n=64)
    (node,) = [n for n in g.model.graph if n.op_type == "MatMulNBits"]
    assert node.domain == "com.microsoft" and node.name == "lin"
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs == {"K": 256, "N": 64, "bits": 4, "block_size": 32, "accuracy_level": 0}
    bw, scales, zp = (node.inputs[i].const_value.numpy() for i in (1, 2, 3))
    assert bw.shape == (64, 8, 16) and bw.dtype == np.uint8
    assert scales.shape == (64, 8) and zp.shape == (64, 4)
    # element 2j of a block in the low nibble, 2j+1 in the high nibble
    codes = qw.codes.reshape(64, 8, 32)
    np.testing.assert_array_equal(bw & 0x0F, codes[..., 0::2])
    np.testing.assert_array_equal(bw >> 4, codes[..., 1::2])
    np.testing.assert_array_equal(zp & 0x0F, qw.zero[:, 0::2])
    np.testing.assert_array_equal(zp >> 4, qw.zero[:, 1::2])
    np.testing.assert_allclose(node.inputs[5].const_value.numpy(), b, rtol=1e-6)
    assert node.metadata_props[oq.ROLE_KEY] == "quant"
    assert node.metadata_props[oq.LINEAR_KEY] == "lin"
    assert "Add" not in {n.op_type for n in g.model.graph}  # the bias moved into MatMulNBits
    assert g.model.opset_imports["com.microsoft"] == 1
    assert "lin" not in {n.key for n in g.view().nodes if n.op == "linear"}


@pytest.mark.parametrize("shape", [("b", "s"), (2, 5)])  # static shapes meet MatMulAddFusion
@pytest.mark.parametrize("fmt", [W8, QFormat("int", 8, False, -1)])
def test_w8a8_dynamic_fuses_and_matches_per_tensor_simulation(fmt, shape):
    g, qw, b = _quantized(fmt, A8, "qdq", shape=shape)
    x = _x()
    y = g.run({"x": x})[0]
    assert _rel(y, _dynamic_u8(x) @ qw.dequantize().T + b) < 1e-5
    assert 1e-4 < _rel(y, _float_ref(x, qw, b)) < 2e-2
    report = ort_backend.ort_kernel_report(g)
    assert report.get("com.microsoft.DynamicQuantizeMatMul") == 1
    assert not {"MatMul", "Gemm", "DequantizeLinear", "DynamicQuantizeLinear"} & set(report)
    ops = [n.op_type for n in g.model.graph]
    assert ops[:2] == ["DynamicQuantizeLinear", "DequantizeLinear"]
    assert all(n.metadata_props.get(oq.ROLE_KEY) == "quant" for n in g.model.graph)
    wq = next(v for v in g.model.graph.initializers.values() if v.name.endswith("weight_q"))
    assert wq.dtype == oir.DataType.UINT8  # U8U8: ORT's U8S8 saturates on AVX2


def test_w8a8_static_fuses_to_qlinearmatmul_with_output_quantizer():
    g0 = _model()
    w, b = g0.get_linear("lin")
    qw = quantize_rtn(w, W8)
    x = _x()
    xs, xz = calibrate_per_tensor(x, 8)
    h = quantize_per_tensor(x, xs, xz) @ qw.dequantize().T
    ys, yz = calibrate_per_tensor(h, 8)
    act, out_act = ActQuant(8, "static", False, xs, xz), ActQuant(8, "static", False, ys, yz)

    g = g0.clone()
    oq.quantize_linear(g, "lin", qw, act, "qdq")
    report = ort_backend.ort_kernel_report(g)
    assert report.get("com.microsoft.MatMulIntegerToFloat") == 1 and report["QuantizeLinear"] == 1
    assert not {"MatMul", "Gemm", "DequantizeLinear"} & set(report)
    assert _rel(g.run({"x": x})[0], h + b) < 1e-5

    g = g0.clone()
    oq.quantize_linear(g, "lin", qw, act, "qdq", output_act=out_act)
    report = ort_backend.ort_kernel_report(g)
    assert report.get("QLinearMatMul") == 1
    assert not {"MatMul", "Gemm", "com.microsoft.MatMulIntegerToFloat"} & set(report)
    ref = quantize_per_tensor(h, ys, yz) + b
    assert _rel(g.run({"x": x})[0], ref) < 1e-5
    assert _rel(g.run({"x": x})[0], _float_ref(x, qw, b)) < 2e-2


@pytest.mark.parametrize("fmt", [W4, QFormat("int", 4, False, 128)])
def test_w4a8_matmulnbits_accuracy_level_4(fmt):
    g, qw, b = _quantized(fmt, A8, "auto")
    (node,) = [n for n in g.model.graph if n.op_type == "MatMulNBits"]
    assert node.attributes["accuracy_level"].value == 4
    x = _x()
    y = g.run({"x": x})[0]
    # the CPU kernel quantizes A per row and block: symmetric int8, scale amax / 127
    bs = qw.group_size
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, bs)
    s = np.abs(xb).max(-1, keepdims=True) / 127
    xq = (np.rint(xb / s) * s).reshape(x.shape)
    assert _rel(y, xq @ qw.dequantize().T + b) < 1e-4
    assert 1e-4 < _rel(y, _float_ref(x, qw, b)) < 2e-2
    assert ort_backend.ort_kernel_report(g) == {"com.microsoft.MatMulNBits": 1}


@pytest.mark.parametrize("kind", ["gemm", "transpose"])
@pytest.mark.parametrize(("fmt", "act", "lowering"),
                         [(W8, None, "qdq"), (W4, None, "matmulnbits"), (W8, A8, "qdq"),
                          (W8, None, "dequant")])
def test_gemm_and_transposed_weights(kind, fmt, act, lowering):
    shape = ("m",) if kind == "gemm" else ("b", "s")
    g = _model(kind=kind, shape=shape)
    x = _x(shape=(7,) if kind == "gemm" else (2, 5))
    y0 = g.run({"x": x})[0]
    w, b = g.get_linear("lin")
    assert _rel(x @ w.T + b, y0) < 1e-5  # alpha / beta folded by get_linear
    qw = quantize_rtn(w, fmt)
    assert oq.quantize_linear(g, "lin", qw, act, lowering) == "y"
    xin = x if act is None else _dynamic_u8(x)
    tol = 1e-5
    assert _rel(ort_backend.ort_session(g, "all", EXACT).run(None, {"x": x})[0],
                xin @ qw.dequantize().T + b) < tol
    ops = {n.op_type for n in g.model.graph}
    assert "Transpose" not in ops and ("Gemm" in ops) == (lowering == "dequant" and kind == "gemm")
    assert "Wt" not in g.model.graph.initializers or lowering == "dequant"


def test_refusals():
    g = _model(k=192)  # 192 is not a power of two
    w, _ = g.get_linear("lin")
    with pytest.raises(RewriteError, match="power of two"):
        oq.quantize_linear(g, "lin", quantize_rtn(w, QFormat("int", 4, True, -1)), None,
                           "matmulnbits")
    with pytest.raises(RewriteError, match="2, 4, 8"):
        oq.quantize_linear(g, "lin", quantize_rtn(w, QFormat("int", 3, True, 64)), None,
                           "matmulnbits")
    with pytest.raises(RewriteError, match="dequant"):
        oq.quantize_linear(g, "lin", quantize_rtn(w, QFormat("mxfp4")), None, "qdq")
    with pytest.raises(RewriteError, match="blocked scales"):
        oq.quantize_linear(g, "lin", quantize_rtn(w, QFormat("int", 8, True, 64)), A8, "qdq")
    with pytest.raises(RewriteError, match="shape"):
        oq.quantize_linear(g, "lin", quantize_rtn(w[:, :64], W8), None, "qdq")
    # nothing was left behind by the refusals: the float graph is intact and runs
    assert {n.op_type for n in g.model.graph} == {"MatMul", "Add"}
    assert set(g.model.graph.initializers) == {"W", "b"}
    assert g.run({"x": _x(k=192)})[0].shape == (2, 5, 64)
    # "auto": per-channel int4 with in=192 is QDQ; grouped int8 with int8 activations -> dequant
    assert oq.choose_lowering(quantize_rtn(w, QFormat("int", 4, True, -1)), None) == "qdq"
    assert oq.choose_lowering(quantize_rtn(w, QFormat("int", 8, True, 64)), A8) == "matmulnbits"
    assert oq.choose_lowering(quantize_rtn(w, QFormat("int", 8, True, 48)), A8) == "dequant"


def test_opset_raised_and_old_reduce_ops_migrated():
    g = _model(kind="reducemean", opset=17)
    x = _x()
    w, b = g.get_linear("lin")
    qw = quantize_rtn(w, W4)
    oq.quantize_linear(g, "lin", qw, None, "qdq")
    assert oq.default_opset(g) == 21
    (rm,) = [n for n in g.model.graph if n.op_type == "ReduceMean"]
    assert "axes" not in rm.attributes and rm.inputs[1].const_value.numpy().tolist() == [-1]
    xc = x - x.mean(-1, keepdims=True)
    ref = _float_ref(xc, qw, b)
    assert _rel(ort_backend.ort_session(g, "all", EXACT).run(None, {"x": x})[0], ref) < 1e-5
    assert ort_backend.ort_kernel_report(g).get("com.microsoft.MatMulNBits") == 1


# ------------------------------------------------------------------------------ fake quant
def _fq_graph():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])
    nodes = [helper.make_node("Relu", ["x"], ["y1"], name="relu"),
             helper.make_node("Identity", ["x"], ["y2"], name="ident")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y1", 1, None),
                                                helper.make_tensor_value_info("y2", 1, None)])
    return OnnxGraph.from_proto(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 20)]))


def _per_token_f32(x, bits, symmetric, clip):
    """The emitted ops, step by step in float32."""
    f = np.float32
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    if symmetric:
        s = np.maximum(np.abs(x).max(-1, keepdims=True) * f(clip / qmax), f(1e-30))
        return np.clip(np.rint(x / s), -qmax - 1, qmax) * s
    lo = np.minimum(x.min(-1, keepdims=True), f(0)) * f(clip)
    hi = np.maximum(x.max(-1, keepdims=True), f(0)) * f(clip)
    s = np.maximum((hi - lo) / f(qmax), f(1e-30))
    z = np.clip(np.rint(-lo / s), 0, qmax)
    return (np.clip(np.rint(x / s) + z, 0, qmax) - z) * s


@pytest.mark.parametrize(("bits", "symmetric", "clip"),
                         [(8, True, 1.0), (4, True, 0.9), (4, False, 1.0), (6, False, 0.95)])
def test_fake_quant_per_token(bits, symmetric, clip):
    g = _fq_graph()
    act = ActQuant(bits, "dynamic", symmetric, clip_ratio=clip)
    out = oq.insert_fake_quant(g, "x", ["relu"], act)
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    x[0, 0] = 0.0  # a zero token stays zero
    y1, y2 = g.run({"x": x})
    np.testing.assert_array_equal(y2, x)  # the other consumer still reads x
    sim = np.maximum(_per_token_f32(x, bits, symmetric, clip), 0)
    assert np.abs(y1 - sim).max() <= 1e-6 * np.abs(sim).max()
    ref = np.maximum(quantize_per_token(x, bits, symmetric, clip), 0)  # float64 reference
    assert np.mean(np.abs(y1 - ref) > 1e-5) < 0.01
    assert y1[0, 0].max() == 0.0
    nodes = [n for n in g.model.graph if n.op_type not in ("Relu", "Identity")]
    assert nodes and all(n.metadata_props[oq.ROLE_KEY] == "quant" for n in nodes)
    assert {n.op for n in g.view().nodes if n.outputs == [out]} == {"quant"}


@pytest.mark.parametrize(("bits", "symmetric", "zp"), [(8, True, 0), (8, False, 100), (4, True, 0),
                                                       (4, False, 7), (6, True, 0)])
def test_fake_quant_static(bits, symmetric, zp):
    g = _fq_graph()
    oq.insert_fake_quant(g, "x", ["relu", "ident"], ActQuant(bits, "static", symmetric, 0.03, zp))
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    y1, y2 = g.run({"x": x})
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    sim = (np.clip(np.rint(x / np.float32(0.03)) + zp, qmin, qmax) - zp) * np.float32(0.03)
    assert np.abs(y2 - sim).max() <= 1e-6
    np.testing.assert_allclose(y1, np.maximum(y2, 0))
    assert np.mean(np.abs(y2 - quantize_per_tensor(x, 0.03, zp, bits, symmetric)) > 1e-6) < 0.01
    assert oq.default_opset(g) == (21 if bits == 4 else 20)


# ------------------------------------------------------------------------------ ORT reports
def test_kernel_report_levels_and_external_data(tmp_path):
    g, _, _ = _quantized(W4, None, "qdq", k=512, n=256)
    assert ort_backend.ort_kernel_report(g, "disable") == {"Add": 1, "DequantizeLinear": 1, "MatMul": 1}
    path = tmp_path / "m.onnx"
    oir.save(g.model, str(path), external_data="m.onnx.data", size_threshold_bytes=1024)
    assert (tmp_path / "m.onnx.data").stat().st_size > 64 * 1024
    assert ort_backend.ort_kernel_report(str(path), "all") == {"com.microsoft.MatMulNBits": 1}
    proto = oir.serde.serialize_model(g.model).SerializeToString()
    assert ort_backend.ort_kernel_report(proto, "extended") == {"com.microsoft.MatMulNBits": 1}
    assert ort_backend.ort_kernel_report(str(path), "basic") == {"Add": 1, "DequantizeLinear": 1,
                                                        "MatMul": 1}
    with pytest.raises(ValueError):
        ort_backend.ort_kernel_report(g, "max")


# ------------------------------------------------------------------------------ tiny LM (ONNX)
@pytest.fixture(scope="module")
def lm():
    import rotaq
    from tests.tiny import build

    module, inputs = build("qwen2", tie_word_embeddings=True)  # q/k/v biases, tied head
    model = rotaq.load(module, inputs, ir="onnx")
    g = model.graph
    keys = list(model.analysis().linears)
    base = ort_backend.ort_kernel_report(g)
    view = g.view()
    act_inputs = g.capture(model.sample_inputs, [view.by_key[k].inputs[0] for k in keys])
    return g, model.sample_inputs, keys, base, {k: act_inputs[view.by_key[k].inputs[0]]
                                                for k in keys}


CASES = {
    "w8": (W8, None, "qdq", {"com.microsoft.MatMulNBits"}),
    "w8a8": (W8, A8, "qdq",
             {"com.microsoft.DynamicQuantizeMatMul", "com.microsoft.MatMulIntegerToFloat"}),
    "w8a8-static": (W8, "static", "qdq", {"com.microsoft.MatMulIntegerToFloat"}),
    "w4": (W4, None, "auto", {"com.microsoft.MatMulNBits"}),
    "w4-asym": (W4_ASYM, None, "matmulnbits", {"com.microsoft.MatMulNBits"}),
    "w4a8": (W4, A8, "auto", {"com.microsoft.MatMulNBits"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_lm_lowerings(lm, case, tmp_path):
    g0, feeds, keys, base, xs = lm
    fmt, act, lowering, kernels = CASES[case]
    sim, g = g0.clone(), g0.clone()
    for k in keys:
        w, b = g.get_linear(k)
        qw = quantize_rtn(w, fmt)
        sim.set_linear(k, qw.dequantize(), b)
        a = act
        if act == "static":
            s, z = calibrate_per_tensor(xs[k], 8)
            a = ActQuant(8, "static", False, s, z)
        g.quantize_linear(k, qw, a, lowering)
    ref = sim.run(feeds)[0]
    y = g.run(feeds)[0]
    if act is None:
        assert _rel(ort_backend.ort_session(g, "all", EXACT).run(None, feeds)[0], ref) < 1e-5
    else:
        assert 1e-4 < _rel(y, ref) < 2e-2
    if case in ("w8a8", "w8a8-static"):  # fused int8 kernels == the QDQ graph they came from
        assert _rel(y, ort_backend.ort_session(g, "disable").run(None, feeds)[0]) < 1e-5

    report = ort_backend.ort_kernel_report(g)
    assert sum(report.get(k, 0) for k in kernels) == len(keys) == 15
    float_mm = ("MatMul", "com.microsoft.FusedMatMul", "Gemm")
    assert sum(report.get(k, 0) for k in float_mm) == sum(base.get(k, 0) for k in float_mm) - 15
    if case == "w4a8":
        nodes = [n for n in g.model.graph if n.op_type == "MatMulNBits"]
        assert [n.attributes["accuracy_level"].value for n in nodes] == [4] * 15
    assert {g.view().by_key[k].op for k in keys} == {"quant"}  # the compute node keeps the key
    # saved and reloaded, it runs the same
    g.save(tmp_path / "q.onnx")
    again = OnnxGraph.load(tmp_path / "q.onnx")
    np.testing.assert_allclose(again.run(feeds)[0], y, rtol=0, atol=1e-6 * np.abs(y).max())
    assert ort_backend.ort_kernel_report(tmp_path / "q.onnx") == report


def test_tiny_lm_fake_quant_and_dequant(lm):
    g0, feeds, keys, _, _ = lm
    g = g0.clone()
    fmt = QFormat("mxfp4")
    for k in keys:
        w, _ = g.get_linear(k)
        g.quantize_linear(k, quantize_rtn(w, fmt), ActQuant(8, "dynamic"), "auto")
    assert len([n for n in g.view().nodes if n.op == "linear"]) == 15  # simulated: still linears
    assert sum(n.op_type == "ReduceMax" for n in g.model.graph) == 15
    y = g.run(feeds)[0]
    assert np.isfinite(y).all() and _rel(y, g0.run(feeds)[0]) < 0.2
    proto = oir.serde.serialize_model(g.model)
    onnx.checker.check_model(proto)


@pytest.mark.parametrize("lowering", ["matmulnbits", "qdq", "dequant"])
def test_ragged_last_group(lowering):
    """K = 96 in groups of 64: the quantizer pads to 128; every lowering matches the
    dequantized (cropped) weights."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 96))
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
        [numpy_helper.from_array(w.T.astype(np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 21)])
    g = OnnxGraph.from_proto(model)
    qw = quantize_rtn(np.pad(w, ((0, 0), (0, 32))), QFormat(bits=4, group_size=64))
    oq.quantize_linear(g, "mm", qw, None, lowering)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    ref = x @ qw.dequantize()[:, :96].T
    out = ort_backend.ort_session(g, "all", EXACT).run(None, {"x": x})[0]
    assert _rel(out, ref) < 1e-5
