"""The TVM backend's ONNX-side lowerings as onnxscript rewrite rules: exact counts of replaced
patterns on small graphs, the near misses left alone (count 0, graph unchanged), the repacked
weights against ONNX Runtime, and the whole lowering on a tiny rotated Llama (no TVM needed)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rotaq import tags
from rotaq.backends.tvm_attention import ATTN_OP, lower_attention
from rotaq.backends.tvm_hadamard import KRON_OP, lower_kron, sylvester
from rotaq.backends.tvm_matmul import QOP, lower_matmuls, repack_nbits, tile

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opset=20):
    ins = [helper.make_tensor_value_info(k, F, s) for k, s in inputs]
    outs = [helper.make_tensor_value_info(k, F, None) for k in outputs]
    inits = [numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()]
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                              helper.make_opsetid("com.microsoft", 1)])


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---- Kronecker chains ------------------------------------------------------------------------
def _kron_nodes(k, x, out, untag=(), b_name=None):
    """Reshape x [1, 4, 48] -> [1, 4, 3, 16] -> MatMul(., B) -> MatMul(At, .) -> Reshape."""
    names = [f"{k}_r0", f"{k}_mb", f"{k}_ma", f"{k}_r1"]
    nodes = [helper.make_node("Reshape", [x, "s_split"], [f"{k}_t0"], name=names[0]),
             helper.make_node("MatMul", [f"{k}_t0", b_name or f"{k}_b"], [f"{k}_t1"],
                              name=names[1]),
             helper.make_node("MatMul", [f"{k}_at", f"{k}_t1"], [f"{k}_t2"], name=names[2]),
             helper.make_node("Reshape", [f"{k}_t2", "s_merge"], [out], name=names[3])]
    for i, nd in enumerate(nodes):
        if i not in untag:
            helper.set_metadata_props(nd, {tags.ROLE: tags.ROLE_TRANSFORM})
    return nodes


def _kron_graph(**kw):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 3)).astype(np.float32)
    inits = {"s_split": np.array([1, 4, 3, 16]), "s_merge": np.array([1, 4, 48]),
             "k1_b": sylvester(16).astype(np.float32), "k1_at": a.T.copy(),
             "k2_b": rng.standard_normal((16, 16)).astype(np.float32),
             "k2_at": a.T.copy()}
    extra_out = kw.pop("extra_out", None)
    nodes = _kron_nodes("k1", "x", "y1", **kw.pop("k1", {})) + _kron_nodes("k2", "y1", "y")
    inputs = [("x", [1, 4, 48])]
    if "b_input" in kw:
        inputs.append(("k1_bx", [16, 16]))
    outs = ["y"] + ([extra_out] if extra_out else [])
    return _model(nodes, inputs, outs, inits)


def test_kron_rule_replaces_each_tagged_chain():
    proto = _kron_graph()
    assert lower_kron(proto) == 2
    assert _ops(proto) == [KRON_OP, KRON_OP]
    first, second = proto.graph.node
    assert list(first.input) == ["x", "k1_at", "k1_b", "s_split", "s_merge"]
    assert second.input[0] == first.output[0] == "y1"
    assert first.name == "k1_r1"  # named as the last Reshape (the importer's shape table)
    assert _attrs(first) == {"a": 3, "b": 16, "fwht_a": 0, "fwht_b": 1}
    assert _attrs(second) == {"a": 3, "b": 16, "fwht_a": 0, "fwht_b": 0}


@pytest.mark.parametrize("kw", [
    {"k1": {"untag": (1,)}},            # one node of the chain not rotaq's
    {"k1": {"untag": (0, 1, 2, 3)}},    # an untagged chain (a model's own reshape-matmuls)
    {"k1": {"b_name": "k1_bx"}, "b_input": True},  # factor B not a constant
    {"extra_out": "k1_t1"},             # an intermediate value read outside the chain
])
def test_kron_rule_near_misses(kw):
    proto = _kron_graph(**kw)
    before = _ops(proto)
    assert lower_kron(proto) == 1  # the second chain only
    ops = _ops(proto)
    assert ops.count(KRON_OP) == 1 and len(ops) == len(before) - 3
    assert [n.name for n in proto.graph.node if n.op_type == KRON_OP] == ["k2_r1"]


# ---- matmuls ---------------------------------------------------------------------------------
def _nbits_weights(k, n, bits=4, block=32, seed=0):
    rng = np.random.default_rng(seed)
    nb = k // block
    packed = rng.integers(0, 256, (n, nb, block * bits // 8)).astype(np.uint8)
    scales = (rng.random((n * nb,)) * 0.1 + 0.01).astype(np.float32)
    zp = rng.integers(0, 256, (n * ((nb * bits + 7) // 8),)).astype(np.uint8)
    return packed, scales, zp


def _matmul_graph(nbits_b_const=True, g_idx=False):
    k, n = 64, 32
    packed, scales, zp = _nbits_weights(k, n)
    rng = np.random.default_rng(1)
    inits = {"wd": rng.standard_normal((n, 48)).astype(np.float32),     # dense, 1536 >= 256
             "ws": rng.standard_normal((48, 4)).astype(np.float32),     # 192 < 256: stays
             "w64": rng.standard_normal((4, 64)).astype(np.float64),    # not fp32: stays
             "scales": scales, "zp": zp}
    ins = ["x", "B" if nbits_b_const else "bx", "scales", "zp"] + (["gi"] if g_idx else [])
    if nbits_b_const:
        inits["B"] = packed
    if g_idx:
        inits["gi"] = np.zeros(k, np.int32)
    nodes = [helper.make_node("MatMulNBits", ins, ["h"], domain="com.microsoft", K=k, N=n,
                              bits=4, block_size=32, accuracy_level=4, name="q"),
             helper.make_node("MatMul", ["h", "wd"], ["h2"], name="dense"),
             helper.make_node("MatMul", ["h2", "ws"], ["h3"], name="small"),
             helper.make_node("MatMul", ["wd2", "h3"], ["y"], name="left"),  # weight first
             helper.make_node("MatMul", ["h3", "w64"], ["y64"], name="f64")]
    inputs = [("x", [2, k]), ("wd2", [5, 2])] + ([] if nbits_b_const else [("bx", None)])
    graph = _model(nodes, inputs, ["y"], inits)
    return graph, (packed, scales, zp, k, n), inits


def test_matmul_rules_counts_and_weights():
    proto, (packed, scales, zp, k, n), inits = _matmul_graph()
    ref = proto.SerializeToString()
    counts = lower_matmuls(proto)
    assert counts == {"nbits": 1, "dense": 1, "int8": 0}
    assert _ops(proto) == [QOP, QOP, "MatMul", "MatMul", "MatMul"]
    q, dense = proto.graph.node[:2]
    assert (q.name, dense.name) == ("q", "dense")
    assert _attrs(q) == {"K": k, "N": n, "bits": 4, "block_size": 32, "act_bits": 8,
                         "tile": 32}
    assert _attrs(dense) == {"K": n, "N": 48, "bits": 32, "block_size": 1, "act_bits": 0,
                             "tile": 16}
    got = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert list(q.input) == ["x", "rotaq_q0_codes", "rotaq_q0_scale", "rotaq_q0_shift"]
    assert list(dense.input) == ["h", "rotaq_w1"]
    # the originals are dropped once unread; the small and float64 weights stay
    assert {"B", "scales", "zp", "wd"}.isdisjoint(got) and {"ws", "w64"} <= set(got)
    assert np.array_equal(got["rotaq_w1"], tile(inits["wd"], 16))
    # the repacked int4 weight decodes to what ORT's MatMulNBits multiplies by
    codes, scale, shift = (got[f"rotaq_q0_{s}"] for s in ("codes", "scale", "shift"))
    assert np.array_equal(codes, tile(repack_nbits(packed, scales, zp, k, n, 4, 32)[0], 32))
    codes = codes.transpose(1, 0, 2).reshape(codes.shape[1], -1)  # untile: [K/2, N]
    w = np.stack([codes & 15, codes >> 4], axis=1).reshape(k, n).astype(np.float32)
    untile = [a.transpose(1, 0, 2).reshape(a.shape[1], -1) for a in (scale, shift)]
    w = w * np.repeat(untile[0], 32, axis=0) + np.repeat(untile[1], 32, axis=0)
    sess = ort.InferenceSession(_nbits_only(ref), providers=["CPUExecutionProvider"])
    eye = np.eye(k, dtype=np.float32)
    ort_w = sess.run(None, {"x": eye})[0]
    assert np.abs(ort_w - w).max() <= 1e-5 * np.abs(ort_w).max()


def _nbits_only(serialized):
    """The test graph cut after its MatMulNBits (x -> h), accuracy level 0 (exact fp32)."""
    from onnx import ModelProto

    m = ModelProto()
    m.ParseFromString(serialized)
    node = m.graph.node[0]
    for a in node.attribute:
        if a.name == "accuracy_level":
            a.i = 0
    del m.graph.node[1:]
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("h", F, None))
    del m.graph.input[1:]
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 64
    return m.SerializeToString()


@pytest.mark.parametrize("kw,msg", [({"nbits_b_const": False}, "needs constant weights"),
                                    ({"g_idx": True}, "g_idx")])
def test_matmul_rules_refuse_what_they_cannot_lower(kw, msg):
    proto, *_ = _matmul_graph(**kw)
    with pytest.raises(ValueError, match=msg):
        lower_matmuls(proto)


def test_matmul_rules_nothing_to_do():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    proto = _model(nodes, [("x", [2, 8]), ("w", [8, 64])], ["y"], {})
    assert lower_matmuls(proto) == {"nbits": 0, "dense": 0, "int8": 0}
    assert _ops(proto) == ["MatMul"]


# ---- attention -------------------------------------------------------------------------------
def _attn_nodes(k, scale_op="Mul", mask_first=False, zero="zero", c="c"):
    nodes = [helper.make_node("MatMul", [f"{k}q", f"{k}kt"], [f"{k}s"]),
             helper.make_node(scale_op, [f"{k}s", c], [f"{k}s2"]),
             helper.make_node("Add", ["mask", f"{k}s2"] if mask_first else [f"{k}s2", "mask"],
                              [f"{k}s3"]),
             helper.make_node("Softmax", [f"{k}s3"], [f"{k}p"], axis=-1),
             helper.make_node("IsNaN", [f"{k}p"], [f"{k}nan"]),
             helper.make_node("Where", [f"{k}nan", zero, f"{k}p"], [f"{k}p2"]),
             helper.make_node("MatMul", [f"{k}p2", f"{k}v"], [f"{k}o"], name=f"{k}pv")]
    return nodes


def _attn_graph(second=None):
    nodes = _attn_nodes("a_") + _attn_nodes("b_", **(second or {}))
    inputs = [(f"{k}{x}", None) for k in ("a_", "b_") for x in ("q", "kt", "v")]
    inputs.append(("cx", None))
    inits = {"c": np.array(0.125, np.float32), "zero": np.array(0.0, np.float32),
             "one": np.array(1.0, np.float32), "c0": np.array(0.0, np.float32),
             "mask": np.zeros((1, 1, 4, 4), np.float32)}
    return _model(nodes, inputs, ["a_o", "b_o"], inits)


def test_attention_rule_replaces_each_chain():
    proto = _attn_graph({"scale_op": "Div", "mask_first": True})
    assert lower_attention(proto) == 2
    assert _ops(proto) == [ATTN_OP, ATTN_OP]
    a, b = proto.graph.node
    assert (a.name, b.name) == ("a_pv", "b_pv")
    assert list(a.input) == ["a_q", "a_kt", "a_v", "mask"]
    assert list(b.input) == ["b_q", "b_kt", "b_v", "mask"]
    assert _attrs(a) == pytest.approx({"scale": 0.125, "has_mask": 1})
    assert _attrs(b) == pytest.approx({"scale": 8.0, "has_mask": 1})


@pytest.mark.parametrize("second", [
    {"zero": "one"},   # Where(IsNaN(p), 1, p): not the guard
    {"c": "cx"},       # scale not a constant
    {"c": "c0"},       # scale 0
    {"scale_op": "Sub"},
])
def test_attention_rule_near_misses(second):
    proto = _attn_graph(second)
    n = len(proto.graph.node)
    assert lower_attention(proto) == 1  # the first chain only
    assert _ops(proto).count(ATTN_OP) == 1 and len(proto.graph.node) == n - 6
    assert [x.name for x in proto.graph.node if x.op_type == ATTN_OP] == ["a_pv"]


# ---- the whole lowering on a tiny model ------------------------------------------------------
def test_lowering_counts_on_tiny_rotated_llama(tmp_path):
    import collections

    import onnx

    import rotaq
    from rotaq.backends import tvm_import as I
    from tests.tiny import loaded

    path = str(tmp_path / "m.onnx")
    rotaq.optimize(loaded("llama", "onnx", kv_cache=False), "rotate", verify=False
                   ).model.save(path)
    proto = onnx.load(path)
    # 256 tokens: the causal mask is proven (at 8 the optimizer leaves none to mark)
    spec = I.specialize(proto, I.static_shapes(proto, 256, I.pad_axes(proto), {}))
    names = {nd.name for nd in spec.graph.node}
    cpu, stats = I.lower(spec, True)
    ops = collections.Counter(_ops(cpu))
    # 2 layers: 2 online Hadamards (down projections), 2 attentions (GQA-folded, causal),
    # 7 linears per layer + the head through the matmul kernel, no MatMul left
    assert (ops[KRON_OP], ops[ATTN_OP], ops[QOP], ops["MatMul"]) == (2, 2, 15, 0)
    assert stats == {"gqa_folded": 2, "causal": 2}
    assert {nd.name for nd in cpu.graph.node if nd.op_type.startswith("Rotaq")} <= names
    gpu, stats = I.lower(spec, False)  # no fused kernels: the Kronecker factors stay MatMuls
    ops = collections.Counter(_ops(gpu))
    assert (ops[KRON_OP], ops[ATTN_OP], ops[QOP], ops["MatMul"]) == (0, 0, 15, 8)
    assert stats == {}


def test_kron_rule_nothing_to_do():
    nodes = _kron_nodes("k1", "x", "y", untag=(0, 1, 2, 3))
    inits = {"s_split": np.array([1, 4, 3, 16]), "s_merge": np.array([1, 4, 48]),
             "k1_b": sylvester(16).astype(np.float32), "k1_at": np.eye(3, dtype=np.float32)}
    proto = _model(nodes, [("x", [1, 4, 48])], ["y"], inits)
    before = proto.SerializeToString()
    assert lower_kron(proto) == 0
    assert proto.SerializeToString() == before  # not even re-serialized


# ---- MatMul over DequantizeLinear of an int8 weight (the int8 head of w4a8-rotated) ---------
def _dq_graph(zp_dtype=np.int8, per_column=True, scale_input=False):
    rng = np.random.default_rng(3)
    k, n = 64, 96
    q = rng.integers(-127, 128, (k, n)).astype(np.int8) if zp_dtype == np.int8 else \
        rng.integers(0, 256, (k, n)).astype(np.uint8)
    s = (rng.random(n if per_column else ()) * 0.01 + 1e-3).astype(np.float32)
    zp = (np.full(n if per_column else (), 3)).astype(zp_dtype)
    inits = {"wq": q, "wzp": zp}
    ins = [("x", [2, k])]
    if scale_input:
        ins.append(("ws", [n] if per_column else []))
    else:
        inits["ws"] = s
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="head")]
    return _model(nodes, ins, ["y"], inits), (q, s, zp)


@pytest.mark.parametrize("zp_dtype,per_column", [(np.int8, True), (np.uint8, True),
                                                 (np.int8, False)])
def test_matmul_rule_folds_a_dequantized_int8_weight(zp_dtype, per_column):
    proto, _ = _dq_graph(zp_dtype, per_column)
    so = ort.SessionOptions()  # the graph as written: ORT's default level fuses DQ + MatMul
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # into int8 math
    ref = ort.InferenceSession(proto.SerializeToString(), so,
                               providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    want = ref.run(None, {"x": x})[0]
    assert lower_matmuls(proto) == {"nbits": 0, "dense": 0, "int8": 1}
    assert _ops(proto) == [QOP] and proto.graph.node[0].name == "head"
    assert _attrs(proto.graph.node[0]) == {"K": 64, "N": 96, "bits": 8, "block_size": 64,
                                           "act_bits": 0, "tile": 32}
    got = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    # the int8 weight, scale and zero point are dropped; 8-bit codes and per-column scale/shift
    assert set(got) == {"rotaq_q0_codes", "rotaq_q0_scale", "rotaq_q0_shift"}
    assert got["rotaq_q0_codes"].dtype == np.uint8
    untile = lambda a: a.transpose(1, 0, 2).reshape(a.shape[1], -1)  # [N/nt, rows, nt] -> [rows, N]
    w = untile(got["rotaq_q0_codes"]).astype(np.float32) * untile(got["rotaq_q0_scale"]) \
        + untile(got["rotaq_q0_shift"])
    assert np.abs(x @ w - want).max() <= 1e-5 * np.abs(want).max()
    if _has_tvm():  # the kernel TVM builds from them, one row (factored) and GEMM
        from rotaq.backends import tvm_kernels as K

        for m in (1, 2):
            xs = x[:m]
            func = K.schedule_qmatmul_cpu(K.qmatmul_func(m, 64, 96, 8, 64, nt=32), m, 96, 32)
            out = _run_tvm(func, [xs, *(got[f"rotaq_q0_{t}"] for t in ("codes", "scale",
                                                                       "shift"))], (m, 96))
            assert np.abs(out - want[:m]).max() <= 1e-5 * np.abs(want).max()


def _has_tvm() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def _run_tvm(func, args, shape):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def test_matmul_rule_leaves_a_dequantized_weight_with_a_runtime_scale():
    proto, _ = _dq_graph(scale_input=True)
    assert lower_matmuls(proto) == {"nbits": 0, "dense": 0, "int8": 0}
    assert _ops(proto) == ["DequantizeLinear", "MatMul"]
    assert {t.name for t in proto.graph.initializer} == {"wq", "wzp"}
