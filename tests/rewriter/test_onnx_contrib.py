"""Hand-built graphs with ORT contrib ops: how each is lifted into the view (no builder needed)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rotaq.errors import RewriteError
from rotaq.passes.folds import refuse_fused_rope as _refuse_fused_rope
from rotaq.rewriter.analysis import analyze
from rotaq.rewriter.onnx import OnnxGraph

F = TensorProto.FLOAT
D, HEADS, KV, HD = 64, 4, 2, 16
RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inits, inputs, outputs):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("com.microsoft", 1)])


def _skip_ln_model():
    """y = (MatMul(SkipLayerNorm(x, MatMul(x, W1), g, b), W2) + s), s the fused sum."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("SkipLayerNormalization", ["x", "h", "g", "b"], ["n", "", "", "s"],
                         name="skipln", domain="com.microsoft", epsilon=1e-5),
        helper.make_node("MatMul", ["n", "W2"], ["o"], name="mm2"),
        helper.make_node("Add", ["s", "o"], ["y"], name="res"),
    ]
    inits = [_w("W1", D, D), _w("W2", D, D), numpy_helper.from_array(
        (0.5 + RNG.random(D)).astype(np.float32), "g"), _w("b", D)]
    x = helper.make_tensor_value_info("x", F, [1, 5, D])
    y = helper.make_tensor_value_info("y", F, [1, 5, D])
    return _model(nodes, inits, [x], [y])


def test_skip_layer_norm_lifted_as_add_then_norm():
    g = OnnxGraph.from_proto(_skip_ln_model())
    v = g.view()
    add, norm = v.by_key["skipln::add"], v.by_key["skipln"]
    assert (add.op, add.inputs, add.outputs) == ("add", ["x", "h"], ["s"])
    assert (norm.op, norm.inputs, norm.outputs) == ("layer_norm", ["s", "g", "b"], ["n"])
    assert norm.params["skip"] and norm.params["dim"] == D
    a = analyze(v)
    assert list(a.norms) == ["skipln"] and a.norms["skipln"].bias == ("skipln", 2)
    # view inputs 1 / 2 (scale, bias) are the node's inputs 2 / 3
    x = RNG.standard_normal((1, 5, D)).astype(np.float32)
    before = g.run({"x": x})[0]
    gamma = g.get_const("g")
    g.set_const("skipln", 1, 2 * gamma)
    g.set_const("skipln", 2, np.zeros(D))
    node = next(n for n in g.model.graph if n.name == "skipln")
    np.testing.assert_allclose(node.inputs[2].const_value.numpy(), 2 * gamma, rtol=1e-6)
    assert not node.inputs[3].const_value.numpy().any() and node.inputs[0].name == "x"
    after = g.run({"x": x})[0]
    assert np.abs(after - before).max() > 0.1  # the edit reached the node's scale and bias


def _gqa_model(packed: bool, do_rotary: int):
    width = (HEADS + 2 * KV) * HD
    if packed:
        nodes = [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv")]
        inits, qkv = [_w("Wqkv", D, width)], ["qkv", "", ""]
    else:
        nodes = [helper.make_node("MatMul", ["x", f"W{c}"], [c], name=f"{c}_proj")
                 for c in "qkv"]
        inits = [_w("Wq", D, HEADS * HD), _w("Wk", D, KV * HD), _w("Wv", D, KV * HD)]
        qkv = ["q", "k", "v"]
    extra = ["cos", "sin"] if do_rotary else []
    nodes += [
        helper.make_node("GroupQueryAttention", [*qkv, "past_k", "past_v", "seqlens_k",
                                                 "total_len", *extra],
                         ["attn", "present_k", "present_v"], name="gqa", domain="com.microsoft",
                         num_heads=HEADS, kv_num_heads=KV, do_rotary=do_rotary),
        helper.make_node("MatMul", ["attn", "Wo"], ["y"], name="o_proj"),
    ]
    inits.append(_w("Wo", HEADS * HD, D))
    if do_rotary:
        inits += [_w("cos", 16, HD // 2), _w("sin", 16, HD // 2)]
    ins = [helper.make_tensor_value_info("x", F, [1, "s", D]),
           helper.make_tensor_value_info("past_k", F, [1, KV, "p", HD]),
           helper.make_tensor_value_info("past_v", F, [1, KV, "p", HD]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total_len", TensorProto.INT32, [1])]
    outs = [helper.make_tensor_value_info(n, F, None) for n in ("y", "present_k", "present_v")]
    return _model(nodes, inits, ins, outs)


@pytest.mark.parametrize("packed", [True, False])
def test_gqa_attention_site(packed):
    a = analyze(OnnxGraph.from_proto(_gqa_model(packed, do_rotary=0)).view())
    (s,) = a.attention
    assert (s.kind, s.num_heads, s.num_kv_heads, s.head_dim) == ("gqa", HEADS, KV, HD)
    assert s.o_proj == "o_proj"
    if packed:
        assert s.q_proj == s.k_proj == s.v_proj == "qkv"
    else:
        assert (s.q_proj, s.k_proj, s.v_proj) == ("q_proj", "k_proj", "v_proj")
    assert len(a.linears) == (2 if packed else 4)


def test_gqa_runs_in_ort_as_lifted():
    """The hand-built graph is one ORT runs (so the lifting is tested on a valid op)."""
    g = OnnxGraph.from_proto(_gqa_model(packed=True, do_rotary=1))
    feeds = {"x": RNG.standard_normal((1, 3, D)).astype(np.float32),
             "past_k": np.zeros((1, KV, 0, HD), np.float32),
             "past_v": np.zeros((1, KV, 0, HD), np.float32),
             "seqlens_k": np.array([2], np.int32), "total_len": np.array([3], np.int32)}
    y, pk, _ = g.run(feeds)
    assert y.shape == (1, 3, D) and pk.shape == (1, KV, 3, HD)


@pytest.mark.parametrize("do_rotary,why", [(1, r"do_rotary=1"), (0, r"\[batch, seq, heads")])
def test_rotate_qk_refusal_names_the_node(do_rotary, why):
    a = analyze(OnnxGraph.from_proto(_gqa_model(packed=True, do_rotary=do_rotary)).view())
    with pytest.raises(RewriteError, match=rf"GroupQueryAttention node 'gqa'.*{why}"):
        _refuse_fused_rope(a)
