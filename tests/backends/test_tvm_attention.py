"""The fused attention kernel of the TVM backend against numpy, and the ONNX chain it replaces
(matched by structure, with the no-match cases)."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from onnx import TensorProto, helper, numpy_helper

from rotaq.backends import tvm as tb
from rotaq.backends.tvm_attention import (
    ATTN_OP,
    attention_func,
    fast_sigmoid,
    lower_attention,
    schedule_attention_cpu,
)


def _reference(q, kt, v, mask, scale):
    s = scale * (q.astype(np.float64) @ kt) + (mask if mask is not None else 0.0)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.nan_to_num(p, nan=0.0) @ v  # rows masked entirely give 0, as Where(IsNaN) does


@pytest.mark.parametrize("g,n,m,d,mg,scale", [
    (3, 8, 8, 16, 1, 1.0),      # causal prefill
    (2, 1, 40, 64, 1, 0.125),   # one query over a longer past (decode)
    (4, 33, 33, 8, 4, 1.0),     # odd lengths: untiled keys, a mask per group
    (9, 128, 128, 64, 1, 1.0),  # SmolLM2's heads: parallel blocks of rows, register tiles
    (2, 16, 48, 32, 0, 0.5),    # no mask
])
def test_attention_kernel(g, n, m, d, mg, scale):
    rng = np.random.default_rng(n + m)
    q = rng.standard_normal((g, n, d)).astype(np.float32)
    kt = rng.standard_normal((g, d, m)).astype(np.float32)
    v = rng.standard_normal((g, m, d)).astype(np.float32)
    mask = None
    if mg:
        causal = np.triu(np.full((n, m), -np.inf, np.float32), m - n + 1)
        mask = np.broadcast_to(causal, (mg, n, m)).copy()
        mask[0, -1, 0] = -3.0  # a finite additive bias
        if n > 1:
            mask[-1, 0, :] = -np.inf  # one row masked entirely
    f = schedule_attention_cpu(attention_func(g, n, m, d, scale, mg), n, m, d)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tb.make_target("llvm"))
    arrays = [q, kt, v] + ([mask] if mask is not None else [])
    out = tvm.runtime.tensor(np.zeros((g, n, d), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    ref = _reference(q, kt, v, mask[0] if mg == 1 else mask, scale)
    got = out.numpy()
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()
    if mg == 1 and n > 1:  # the fully masked row gives zeros in every group
        assert not got[:, 0].any() and got[:, 1].any()
    elif mg and n > 1:  # only in the group whose mask hides it
        assert not got[-1, 0].any() and got[0, 0].any()


@pytest.mark.parametrize("g,n,m,d,rep,mg,rows", [
    (9, 1, 192, 64, 3, 1, 4),   # SmolLM2 decode: 9 query heads over 3 KV heads, keys as cached
    (3, 3, 1152, 64, 1, 1, 3),  # its 3 query heads of a KV head as the rows of one block
    (4, 2, 33, 8, 2, 4, 4),     # odd key count (untiled), a mask per group, two rows
    (6, 1, 64, 64, 3, 0, 4),    # no mask
    (2, 1, 1, 16, 1, 1, 4),     # a single key
])
def test_attention_kernel_key_rows(g, n, m, d, rep, mg, rows):
    """Keys read in the cache's layout ``[g / rep, m, d]`` (no transpose) against numpy."""
    rng = np.random.default_rng(m + d)
    q = rng.standard_normal((g, n, d)).astype(np.float32)
    k = rng.standard_normal((g // rep, m, d)).astype(np.float32)
    v = rng.standard_normal((g // rep, m, d)).astype(np.float32)
    mask = None
    if mg:
        mask = np.zeros((mg, n, m), np.float32)
        if m > 3:
            mask[:, :, m // 2: m - 1] = -np.inf  # empty cache slots, then the new token
            mask[-1, 0, 0] = -2.5
    f = schedule_attention_cpu(attention_func(g, n, m, d, 0.125, mg, rep, k_rows=True), n, m,
                               d, rows=rows, k_rows=True)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tb.make_target("llvm"))
    out = tvm.runtime.tensor(np.zeros((g, n, d), np.float32))
    arrays = [q, k, v] + ([mask] if mask is not None else [])
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    kt = np.repeat(np.swapaxes(k, 1, 2), rep, axis=0)
    ref = _reference(q, kt, np.repeat(v, rep, axis=0),
                     (mask[0] if mg == 1 else mask) if mg else None, 0.125)
    got = out.numpy()
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()
    if mg and m > 3:  # the masked slots change nothing: zeroing their keys gives the same
        k2 = k.copy()
        k2[:, m // 2: m - 1] = 0.0
        out2 = tvm.runtime.tensor(np.zeros((g, n, d), np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in [q, k2, v, mask]], out2)
        assert np.abs(out2.numpy() - got).max() <= 1e-6 * np.abs(ref).max()


def test_fast_sigmoid():
    from tvm import te

    x = te.placeholder((1000,), "float32", name="x")
    f = te.create_prim_func([x, fast_sigmoid(x)])
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tb.make_target("llvm"))
    a = np.linspace(-90, 90, 1000).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(1000, np.float32))
    lib["main"](tvm.runtime.tensor(a), out)
    ref = 1.0 / (1.0 + np.exp(-a.astype(np.float64)))
    assert np.abs(out.numpy() - ref).max() < 1e-6


def _chain(scale_op="Mul", mask=True, guard=True, axis=-1, extra_reader=False):
    """MatMul(q, kt) -> scale -> Add(mask) -> Softmax -> [IsNaN/Where] -> MatMul(., v)."""
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"])]
    cur = "s"
    if scale_op:
        nodes.append(helper.make_node(scale_op, [cur, "c"], ["s2"]))
        cur = "s2"
    if mask:
        nodes.append(helper.make_node("Add", [cur, "mask"], ["s3"]))
        cur = "s3"
    nodes.append(helper.make_node("Softmax", [cur], ["p"], axis=axis))
    cur = "p"
    if guard:
        nodes += [helper.make_node("IsNaN", ["p"], ["nan"]),
                  helper.make_node("Where", ["nan", "zero", "p"], ["p2"])]
        cur = "p2"
    nodes.append(helper.make_node("MatMul", [cur, "v"], ["o"]))
    outs = [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("q", "kt", "v")]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "c"),
             numpy_helper.from_array(np.zeros((1, 1, 4, 4), np.float32), "mask"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    g = helper.make_graph(nodes, "attn", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("kw,scale", [({}, 0.5), ({"scale_op": "Div"}, 2.0),  # c = 0.5
                                      ({"scale_op": None, "mask": False, "guard": False}, 1.0)])
def test_lower_attention_matches(kw, scale):
    proto = _chain(**kw)
    assert lower_attention(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert ops == [ATTN_OP]
    node = proto.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["scale"] == pytest.approx(scale)
    assert list(node.input)[:3] == ["q", "kt", "v"]
    assert attrs["has_mask"] == int(kw.get("mask", True))


@pytest.mark.parametrize("kw", [{"axis": 1}, {"extra_reader": True}])
def test_lower_attention_leaves_other_graphs(kw):
    proto = _chain(**kw)
    before = [n.op_type for n in proto.graph.node]
    assert lower_attention(proto) == 0
    assert [n.op_type for n in proto.graph.node] == before
