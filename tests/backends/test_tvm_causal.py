"""Causal prefill attention skipping the masked keys (TVM backend): which masks are proven
causal (by running their subgraph on probes), and the chunked kernel against ORT."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from onnx import TensorProto, helper, numpy_helper

import rotaq
from rotaq.backends import tvm as tb
from rotaq.backends import tvm_causal as C
from rotaq.backends.tvm_attention import ATTN_OP
from tests.tiny import loaded


def _mask_graph(causal: bool, n: int = 6, past: int = 2, fill: float = -np.inf):
    """attention_mask [1, m] -> additive mask [1, 1, n, m] (padding, plus causal when asked),
    read by a RotaqAttention node."""
    m = n + past
    tri = np.triu(np.ones((n, m), np.float32), past + 1) if causal else np.zeros((n, m))
    inits = [numpy_helper.from_array(tri.astype(np.float32).reshape(1, 1, n, m), "tri"),
             numpy_helper.from_array(np.array(fill, np.float32), "fill"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1, 1, 1, m], np.int64), "shp")]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["am"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["am", "shp"], ["am4"]),
        helper.make_node("Sub", ["am4", "tri"], ["keep"]),  # 1 visible, <= 0 hidden
        helper.make_node("Greater", ["keep", "zero"], ["vis"]),
        helper.make_node("Where", ["vis", "zero", "fill"], ["mask"]),
        helper.make_node(ATTN_OP, ["q", "kt", "v", "mask"], ["o"], scale=1.0, has_mask=1),
    ]
    ins = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, m])]
    ins += [helper.make_tensor_value_info(k, TensorProto.FLOAT, [1, 1, n, 4])
            for k in ("q", "kt", "v")]
    outs = [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)]
    vis = [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, n, m])]
    g = helper.make_graph(nodes, "m", ins, outs, inits, value_info=vis)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _off(proto):
    attrs = {a.name: helper.get_attribute_value(a) for a in proto.graph.node[-1].attribute}
    return attrs.get("causal_off")


def test_mark_causal_proves_by_probes():
    for fill in (-np.inf, np.finfo(np.float32).min):
        proto = _mask_graph(causal=True, fill=fill)
        assert C.mark_causal(proto) == 1 and _off(proto) == 2
    for kw in ({"causal": False}, {"causal": True, "fill": -1e9}):  # bidirectional; finite
        proto = _mask_graph(**kw)
        assert C.mark_causal(proto) == 0 and _off(proto) is None


def test_chunks():
    assert C.chunks(3 * C.CHUNK_ROWS, 3 * C.CHUNK_ROWS, 0) == [
        (0, C.CHUNK_ROWS, C.CHUNK_ROWS), (C.CHUNK_ROWS, 2 * C.CHUNK_ROWS, 2 * C.CHUNK_ROWS),
        (2 * C.CHUNK_ROWS, 3 * C.CHUNK_ROWS, 3 * C.CHUNK_ROWS)]
    assert C.chunks(C.CHUNK_ROWS, C.CHUNK_ROWS, 0) == []  # one chunk: nothing to skip
    assert C.chunks(2 * C.CHUNK_ROWS, 2 * C.CHUNK_ROWS, None) == []  # not proven causal


def test_causal_prefill_matches_ort(tmp_path, monkeypatch):
    """A tiny llama's causal prefill in chunks of 4 rows (16 tokens, 13 real, 3 padded)."""
    monkeypatch.setattr(C, "CHUNK_ROWS", 4)
    path = str(tmp_path / "llama.onnx")
    model = rotaq.optimize(loaded("llama", "onnx", kv_cache=True), "w4a16-rotated", verify=False)
    model.model.save(path, tokenizer=False)
    meta = tb.compile_tvm(path, str(tmp_path / "art"), tokens=[16], decode=(), progress=False)
    stats = meta["buckets"]["16"]["stats"]
    assert stats["causal"] == stats["attention"] == 2
    art, ref = tb.load(str(tmp_path / "art")), rotaq.load(path)
    ids = np.random.default_rng(2).integers(0, 200, (1, 13))
    (a, *_), (b, *_) = art.graph.run(art.token_feeds(ids)), ref.graph.run(ref.token_feeds(ids))
    assert a.shape == b.shape and float(np.abs(a - b).max() / np.abs(b).max()) < 1e-4
