"""ONNX adapter: structure lifted from torch.onnx.export(dynamo=True) graphs, exact edits."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rotaq.rewriter.onnx as onnx_adapter
from rotaq.errors import LoadError, RewriteError
from rotaq.rewriter.onnx import OnnxGraph
from rotaq.rewriter.sites import Kronecker

SEQ = 8
IDS = np.random.default_rng(0).integers(0, 256, (1, SEQ)).astype(np.int64)
FEEDS = {"input_ids": IDS}


def _export(model: torch.nn.Module, path: str, opset: int | None = None) -> str:
    model.config.use_cache = False
    model.eval()
    kwargs = {"opset_version": opset} if opset else {}
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.from_numpy(IDS),), path, dynamo=True, verbose=False, **kwargs
        )
    return path


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def _random_biases(model: torch.nn.Module) -> torch.nn.Module:
    # HF initializes biases to zero; the exporter then merges them into one initializer
    # (and drops a zero Gemm C). Random biases give the graph a trained model has.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("onnx")
    out = {
        "llama_tied": _export(_llama(True), str(d / "llama_tied.onnx")),
        "llama": _export(_llama(False), str(d / "llama.onnx")),
        "llama23": _export(_llama(True), str(d / "llama23.onnx"), opset=23),
    }
    torch.manual_seed(1)
    bert = BertModel(
        BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=64,
        )
    )
    out["bert"] = _export(_random_biases(bert), str(d / "bert.onnx"))
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    )
    out["gpt2"] = _export(_random_biases(gpt2), str(d / "gpt2.onnx"))
    return out


def _ops(g: OnnxGraph) -> Counter:
    return Counter(n.op for n in g.view().nodes)


def _linears(g: OnnxGraph):
    return [n for n in g.view().nodes if n.op == "linear"]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _orth(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


# ----------------------------------------------------------------------------- structure
def test_llama_tied_structure(paths):
    g = OnnxGraph.load(paths["llama_tied"])
    v = g.view()
    ops = _ops(g)
    lins = _linears(g)
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head (MatMul(x, Transpose(E)))
    assert len(lins) == 2 * 7 + 1
    assert ops["embedding"] == 1
    # explicit attention from opset 20: per layer QK^T and PV matmuls, one softmax
    assert ops["matmul"] == 4 and ops["softmax"] == 2 and ops["sdpa"] == 0
    # RMSNorm decomposed at opset 20: pow / mean / sqrt / reciprocal, x5 (2 per layer + final)
    assert ops["mean"] == ops["sqrt"] == ops["reciprocal"] == ops["pow"] == 5
    assert {tuple(n.params["axes"]) for n in v.nodes if n.op == "mean"} == {(-1,)}
    # one-element constant operands are reported as ``scalar`` (as the FX adapter does)
    assert {n.params.get("scalar") for n in v.nodes if n.op == "pow"} == {2.0}
    eps = [n.params["scalar"] for n in v.nodes if n.op == "add" and "scalar" in n.params]
    assert eps == pytest.approx([1e-6] * 5)  # the RMSNorm epsilons
    # the lm_head Transpose is absorbed: only the 4-D head transposes remain
    assert all(n.params["perm"] != [1, 0] for n in v.nodes if n.op == "transpose")
    head = lins[-1]
    emb = next(n for n in v.nodes if n.op == "embedding")
    assert head.params == {
        "in_features": 64,
        "out_features": 256,
        "has_bias": False,
        "weight_shared": True,
    }
    assert emb.params == {"num_embeddings": 256, "dim": 64, "weight_shared": True}
    assert [n.params["weight_shared"] for n in lins[:-1]] == [False] * 14
    # per layer q 64, k 32, v 32 (GQA: 2 kv heads), o 64, gate 128, up 128, down 64
    assert Counter(n.params["out_features"] for n in lins) == {64: 6, 32: 4, 128: 4, 256: 1}
    # scopes come from pkg.torch.onnx.name_scopes
    assert lins[0].scope == "model.layers.0.self_attn.q_proj"
    assert head.scope == "lm_head" and emb.scope == "model.embed_tokens"
    assert v.inputs == ["input_ids"] and v.outputs == g.output_names == [head.outputs[0]]
    assert v.shapes["input_ids"] == (1, SEQ) and v.shape(head.outputs[0]) == (1, SEQ, 256)
    # weights are constants, activations are not
    assert not v.is_const(lins[0].inputs[0])
    assert sum(1 for c in v.consts if v.shape(c) == (64, 64)) == 4  # q and o of 2 layers
    w, b = g.get_linear(head.key)
    np.testing.assert_array_equal(w, g.get_embedding(emb.key))
    assert b is None and w.dtype == np.float64
    assert g.view() is v  # cached until an edit
    keys = [n.key for n in v.nodes]
    assert len(set(keys)) == len(keys)


def test_llama_untied_structure(paths):
    g = OnnxGraph.load(paths["llama"])
    lins = _linears(g)
    assert len(lins) == 15
    assert not any(n.params["weight_shared"] for n in lins)
    emb = next(n for n in g.view().nodes if n.op == "embedding")
    assert emb.params["weight_shared"] is False
    assert not np.allclose(g.get_linear(lins[-1].key)[0], g.get_embedding(emb.key))


def test_llama_opset23_fused_ops(paths):
    g = OnnxGraph.load(paths["llama23"])
    ops = _ops(g)
    assert ops["linear"] == 15 and ops["sdpa"] == 2 and ops["rms_norm"] == 5
    assert ops["softmax"] == 0 and ops["mean"] == 0
    sdpa = next(n for n in g.view().nodes if n.op == "sdpa")
    # 4-D inputs (K/V already repeated to 4 heads by the exporter): heads read off the shapes
    assert sdpa.params["num_heads"] == 4 and sdpa.params["num_kv_heads"] == 4
    assert len(sdpa.inputs) == 4 and sdpa.scope == "model.layers.0.self_attn"
    norm = next(n for n in g.view().nodes if n.op == "rms_norm")
    assert norm.params["dim"] == 64 and norm.params["eps"] == pytest.approx(1e-6)
    assert norm.inputs[2] == "" and g.view().is_const(norm.inputs[1])
    assert g.run(FEEDS)[0].shape == (1, SEQ, 256)


def test_bert_structure_bias_absorbed(paths):
    g = OnnxGraph.load(paths["bert"])
    ops = _ops(g)
    lins = _linears(g)
    # 2 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense)
    # = 12 MatMul+Add, plus the pooler: Gemm(transB=1) with C = 13
    assert len(lins) == 13 and all(n.params["has_bias"] for n in lins)
    assert lins[-1].scope == "pooler.dense"
    # word and token-type embeddings; position embeddings of a static-shape export are folded
    # into a constant by the exporter
    assert ops["embedding"] == 2 and ops["layer_norm"] == 5
    # the 12 bias Adds are absorbed: the 8 left are residual / embedding / mask adds
    assert ops["add"] == 20 - 12
    assert lins[0].outputs == ["linear"] and lins[0].params["in_features"] == 64
    ln = next(n for n in g.view().nodes if n.op == "layer_norm")
    assert ln.params["eps"] == pytest.approx(1e-12) and ln.params["dim"] == 64
    w, b = g.get_linear(lins[-1].key)
    assert w.shape == (64, 64) and b.shape == (64,)


def test_gpt2_structure_gemm(paths):
    g = OnnxGraph.load(paths["gpt2"])
    lins = _linears(g)
    # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) as Gemm with C, + tied lm_head
    assert len(lins) == 9
    assert [n.params["has_bias"] for n in lins] == [True] * 8 + [False]
    assert [n.params["out_features"] for n in lins[:4]] == [192, 64, 256, 64]
    assert lins[-1].params["weight_shared"] is True
    assert _ops(g)["embedding"] == 1


# ----------------------------------------------------------------------------- exact edits
@pytest.mark.parametrize("name", ["llama_tied", "bert", "gpt2"])
def test_set_linear_roundtrip_is_exact(paths, name):
    g = OnnxGraph.load(paths[name])
    ref = g.run(FEEDS)
    for n in _linears(g):
        g.set_linear(n.key, *g.get_linear(n.key))
    out = g.run(FEEDS)
    for a, b in zip(ref, out):
        assert _rel(a, b) < 1e-6
    assert len(_linears(g)) == len(_linears(OnnxGraph.load(paths[name])))


def test_set_linear_on_tied_head_unties(paths):
    g = OnnxGraph.load(paths["llama_tied"])
    head = _linears(g)[-1]
    emb = next(n for n in g.view().nodes if n.op == "embedding")
    x_name, e_out = head.inputs[0], emb.outputs[0]
    before = g.capture(FEEDS, [e_out, x_name])
    table = g.get_embedding(emb.key)
    w_new = np.random.default_rng(3).standard_normal((256, 64)) * 0.02
    g.set_linear(head.key, w_new, None)
    after = g.capture(FEEDS, [e_out, x_name])
    logits = g.run(FEEDS)[0]
    np.testing.assert_array_equal(after[e_out], before[e_out])
    np.testing.assert_array_equal(g.get_embedding(emb.key), table)
    np.testing.assert_allclose(logits, after[x_name] @ w_new.T, rtol=1e-4, atol=1e-5)
    head2 = _linears(g)[-1]
    assert head2.key == head.key and head2.outputs == head.outputs
    assert head2.params["weight_shared"] is False
    assert next(n for n in g.view().nodes if n.op == "embedding").params["weight_shared"] is False
    np.testing.assert_allclose(g.get_linear(head.key)[0], w_new, atol=1e-7)
    assert Counter(n.op_type for n in g.model.graph)["Transpose"] == 10  # [1,0] one removed


def test_set_embedding_on_tied_table_leaves_head(paths):
    g = OnnxGraph.load(paths["llama_tied"])
    head = _linears(g)[-1]
    emb = next(n for n in g.view().nodes if n.op == "embedding")
    w_head = g.get_linear(head.key)[0]
    table = np.random.default_rng(4).standard_normal((256, 64))
    g.set_embedding(emb.key, table)
    got = g.capture(FEEDS, [emb.outputs[0]])[emb.outputs[0]]
    np.testing.assert_allclose(got[0], table[IDS[0]], rtol=1e-6)
    np.testing.assert_array_equal(g.get_linear(head.key)[0], w_head)
    assert not _linears(g)[-1].params["weight_shared"]
    with pytest.raises(RewriteError):
        g.set_embedding(emb.key, table[:10])


def _qkv_and_mlp_inputs(g: OnnxGraph):
    v = g.view()
    groups = {}
    for n in _linears(g):
        groups.setdefault(n.inputs[0], []).append(n.key)
    qkv = {x: ks for x, ks in groups.items() if len(ks) == 3}
    mlp = {x: ks for x, ks in groups.items() if len(ks) == 2}
    assert len(qkv) == 2 and len(mlp) == 2 and all(len(v.consumers[x]) == 3 for x in qkv)
    return qkv, mlp


def test_insert_two_factor_transform_is_exact(paths):
    g = OnnxGraph.load(paths["llama_tied"])
    ref = g.run(FEEDS)[0]
    a, b = _orth(4, 1), _orth(16, 2)
    k = np.kron(a, b)
    qkv, _ = _qkv_and_mlp_inputs(g)
    n_init = len(g.model.graph.initializers)
    new_values = {}
    for x, keys in qkv.items():
        new_values[x] = g.insert_transform(x, keys, Kronecker((a, b)))
        for key in keys:
            w, bias = g.get_linear(key)
            g.set_linear(key, w @ k, bias)
    out = g.run(FEEDS)[0]
    assert _rel(ref, out) < 1e-5
    # the transform is the Kronecker subgraph itself: x_new = x @ kron(A, B)
    x0 = next(iter(qkv))
    cap = g.capture(FEEDS, [x0, new_values[x0]])
    np.testing.assert_allclose(cap[new_values[x0]], cap[x0] @ k, rtol=1e-5, atol=1e-5)
    v = g.view()
    assert all([c.op for c in v.consumers[x]] == ["online"] for x in qkv)
    assert [c.key for c in v.consumers[new_values[x0]]] == qkv[x0]
    # small factors only (never the dense 64x64 product), 4 constants per transform
    new_consts = [c for c in v.consts if c.startswith("rotaq_")]
    # Reshape targets [0, 0, 4, 16] and [0, 0, 64], F1 (16x16) and F0^T (4x4), per transform
    assert sorted(v.shape(c) for c in new_consts) == sorted([(4,), (3,), (4, 4), (16, 16)] * 2)
    roles = Counter(n.params["target"] for n in v.nodes if n.op == "online")
    assert roles == {"Reshape": 4, "MatMul": 4}
    assert len(_linears(g)) == 15
    # 8 transform constants; the 6 replaced weights had no other reader and are dropped
    assert len(g.model.graph.initializers) == n_init + 8


def test_insert_one_factor_transform_is_exact(paths):
    g = OnnxGraph.load(paths["llama_tied"])
    ref = g.run(FEEDS)[0]
    q = _orth(64, 5)
    _, mlp = _qkv_and_mlp_inputs(g)
    for x, keys in mlp.items():
        new = g.insert_transform(x, keys, Kronecker((q,)))
        assert g.view().shape(new) == (1, SEQ, 64)
        for key in keys:
            w, bias = g.get_linear(key)
            g.set_linear(key, w @ q, bias)
    assert _rel(ref, g.run(FEEDS)[0]) < 1e-5
    assert len(_linears(g)) == 15  # the rotation MatMul is not reported as a model linear


def test_insert_transform_rejects_bad_requests(paths):
    g = OnnxGraph.load(paths["llama_tied"])
    qkv, _ = _qkv_and_mlp_inputs(g)
    x, keys = next(iter(qkv.items()))
    with pytest.raises(RewriteError, match="last dim"):
        g.insert_transform(x, keys, Kronecker((_orth(4, 0), _orth(4, 1))))
    n_init = len(g.model.graph.initializers)
    with pytest.raises(RewriteError, match="does not read"):
        g.insert_transform(x, [_linears(g)[-1].key], Kronecker((_orth(64, 0),)))
    assert len(g.model.graph.initializers) == n_init  # refused before any edit


def test_set_const_layernorm_scale_and_bias(paths):
    g = OnnxGraph.load(paths["bert"])
    norms = [n for n in g.view().nodes if n.op == "layer_norm"]
    last = norms[-1]
    assert last.outputs[0] == g.output_names[0]
    ref = g.run(FEEDS)[0]
    scale, bias = g.get_const(last.inputs[1]), g.get_const(last.inputs[2])
    shared_scale = last.inputs[1]
    assert norms[0].inputs[1] == shared_scale  # merged all-ones scales
    g.set_const(last.key, 1, 2.0 * scale)
    g.set_const(last.key, 2, 2.0 * bias)
    out = g.run(FEEDS)[0]
    np.testing.assert_allclose(out, 2.0 * ref, rtol=1e-5, atol=1e-5)
    v = g.view()
    assert v.by_key[last.key].inputs[1] != shared_scale
    assert all(
        n.inputs[1] == shared_scale for n in v.nodes if n.op == "layer_norm" and n.key != last.key
    )
    np.testing.assert_array_equal(g.get_const(shared_scale), scale)
    assert g.get_const(v.by_key[last.key].inputs[1]).dtype == np.float64
    assert (
        g.model.graph.initializers[v.by_key[last.key].inputs[1]].dtype
        == onnx_adapter.oir.DataType.FLOAT
    )
    with pytest.raises(RewriteError):
        g.set_const(_linears(g)[0].key, 0, np.zeros(3))


def test_clone_is_independent(paths):
    g = OnnxGraph.load(paths["gpt2"])
    ref = g.run(FEEDS)[0]
    c = g.clone()
    key = _linears(c)[0].key
    w, b = c.get_linear(key)
    c.set_linear(key, 0 * w, b)
    assert _rel(ref, c.run(FEEDS)[0]) > 1e-3
    np.testing.assert_array_equal(g.run(FEEDS)[0], ref)


# ----------------------------------------------------------------------------- files
def test_save_load_roundtrip(paths, tmp_path, monkeypatch):
    src = paths["llama_tied"]
    stat, data = os.stat(src), Path(src).read_bytes()
    g = OnnxGraph.load(src)
    head = _linears(g)[-1]
    w, _ = g.get_linear(head.key)
    g.set_linear(head.key, w * 0.5, np.full(256, 0.25))  # adds a bias Add
    assert _linears(g)[-1].params["has_bias"] is True
    ref = g.run(FEEDS)
    g.metadata["rotaq.source"] = "llama_tied.onnx"
    out = tmp_path / "out.onnx"
    g.save(str(out))
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # small: no side file, no temp left
    g2 = OnnxGraph.load(str(out))
    np.testing.assert_array_equal(g2.run(FEEDS)[0], ref[0])
    assert g2.metadata["rotaq.source"] == "llama_tied.onnx"
    assert len(_linears(g2)) == 15 and g2.output_names == g.output_names
    # unused initializers are gone on save (the old transposed head reader is dropped)
    assert all(list(v.uses()) for v in g2.model.graph.initializers.values())
    # external data path: weights in <name>.data, referenced relatively
    monkeypatch.setattr(onnx_adapter, "_EXTERNAL_DATA_BYTES", 0)
    ext = tmp_path / "sub" / "ext.onnx"
    g2.save(str(ext))
    assert sorted(os.listdir(ext.parent)) == ["ext.onnx", "ext.onnx.data"]
    proto = onnx.load(str(ext), load_external_data=False)
    locs = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locs == {"ext.onnx.data"}
    moved = tmp_path / "moved"
    shutil.copytree(ext.parent, moved)
    g3 = OnnxGraph.load(str(moved / "ext.onnx"))
    np.testing.assert_array_equal(g3.run(FEEDS)[0], ref[0])
    # an onnx_ir model (external tensors still on disk) is materialized in memory
    g4 = OnnxGraph.from_proto(onnx_adapter.oir.load(str(moved / "ext.onnx")))
    np.testing.assert_array_equal(g4.run(FEEDS)[0], ref[0])
    g3.save(str(moved / "ext.onnx"))  # over its own source: safe, everything is in memory
    np.testing.assert_array_equal(OnnxGraph.load(str(moved / "ext.onnx")).run(FEEDS)[0], ref[0])
    # the source was never touched
    assert Path(src).read_bytes() == data and os.stat(src).st_mtime_ns == stat.st_mtime_ns


def test_load_errors(paths, tmp_path):
    src = paths["llama_tied"]
    data = Path(src).read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.onnx").write_text("not a model\n")
    shutil.copy(src, tmp_path / "noext.onnx")  # its .onnx.data side file is not next to it
    for name in ["trunc", "garbage", "text", "noext", "missing"]:
        p = str(tmp_path / f"{name}.onnx")
        with pytest.raises(LoadError) as info:
            OnnxGraph.load(p)
        msg = str(info.value)
        assert p in msg and "\n" not in msg
    with pytest.raises(LoadError, match="external data"):
        OnnxGraph.load(str(tmp_path / "noext.onnx"))
    # a short side file is caught too
    shutil.copy(src, tmp_path / "short.onnx")
    side = Path(src + ".data").read_bytes()
    proto = onnx.load(str(tmp_path / "short.onnx"), load_external_data=False)
    locs = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    (tmp_path / locs.pop()).write_bytes(side[: len(side) // 2])
    with pytest.raises(LoadError, match="external data"):
        OnnxGraph.load(str(tmp_path / "short.onnx"))


# ----------------------------------------------------------------------------- hand-built
def _f32(a: np.ndarray, name: str) -> TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def test_hand_built_opset23_attention_and_norms():
    rng = np.random.default_rng(7)
    wq, wk, wv = (rng.standard_normal((64, n)).astype(np.float32) * 0.1 for n in (64, 32, 32))
    inits = [
        _f32(wq, "wq"),
        _f32(wk, "wk"),
        _f32(wv, "wv"),
        _f32(rng.random(64) + 0.5, "g"),
        _f32(rng.standard_normal(32), "bk"),
    ]
    nodes = [
        helper.make_node("RMSNormalization", ["x", "g"], ["h"], epsilon=1e-6),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k0"]),
        helper.make_node("Add", ["k0", "bk"], ["k"]),
        helper.make_node("Constant", [], ["wvc"], value=_f32(wv, "wvc")),
        helper.make_node("MatMul", ["h", "wvc"], ["v"]),
        helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2),
        # ORT registers this contrib op in the ONNX domain (com.microsoft is lifted as well)
        helper.make_node("SimplifiedLayerNormalization", ["y", "g"], ["z"], epsilon=1e-6),
    ]
    graph = helper.make_graph(
        nodes,
        "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, "s", 64])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    )
    model = onnx.shape_inference.infer_shapes(model)
    ms = onnx.ModelProto()
    ms.CopyFrom(model)
    ms.graph.node[-1].domain = "com.microsoft"
    assert OnnxGraph.from_proto(ms).view().nodes[-1].op == "rms_norm"
    g = OnnxGraph.from_proto(model)
    v = g.view()
    ops = [n.op for n in v.nodes]
    assert ops == ["rms_norm", "linear", "linear", "linear", "sdpa", "rms_norm"]  # unnamed: keyed
    sdpa = v.nodes[4]
    assert sdpa.inputs == ["q", "k", "v", ""]
    assert sdpa.params["num_heads"] == 4 and sdpa.params["num_kv_heads"] == 2
    assert v.nodes[0].inputs == ["x", "g", ""] and v.nodes[0].params["dim"] == 64
    assert v.nodes[2].params["has_bias"] and v.nodes[2].outputs == ["k"]
    assert "wvc" in v.consts and v.shapes["x"] == (1, -1, 64)
    assert len({n.key for n in v.nodes}) == 6
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    ref = g.run({"x": x})[0]
    assert ref.shape == (1, 5, 64) and np.isfinite(ref).all()
    # exact edits on the hand-built graph: constant-node weight, bias removed, bias added
    kq, kk, kv_ = v.nodes[1].key, v.nodes[2].key, v.nodes[3].key
    for key in (kq, kk, kv_):
        g.set_linear(key, *g.get_linear(key))
    np.testing.assert_allclose(g.run({"x": x})[0], ref, rtol=1e-6, atol=1e-6)
    wk_, _ = g.get_linear(kk)
    g.set_linear(kk, wk_, None)  # bias removed: k keeps its name
    g.set_linear(kq, *g.get_linear(kq)[:1], np.zeros(64))  # zero bias added
    v = g.view()
    assert v.by_key[kk].params["has_bias"] is False and v.by_key[kk].outputs == ["k"]
    assert v.by_key[kq].params["has_bias"] is True and v.by_key[kq].outputs == ["q"]
    cap = g.capture({"x": x}, ["h", "k"])
    np.testing.assert_allclose(cap["k"], cap["h"] @ wk, rtol=1e-5, atol=1e-5)
    assert "wvc" not in g.view().consts  # orphaned Constant node removed
    with pytest.raises(RewriteError):
        g.set_const(v.nodes[0].key, 2, np.zeros(64))  # RMS norm has no bias


def test_hand_built_gemm_and_unnamed_nodes():
    rng = np.random.default_rng(8)
    b = rng.standard_normal((16, 8)).astype(np.float32)
    c = rng.standard_normal(16).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Gemm", ["r", "B2"], ["o"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [3, 4])],
        [_f32(b, "B"), _f32(c, "C"), _f32(rng.standard_normal((16, 4)), "B2")],
    )
    g = OnnxGraph.from_proto(onnx.shape_inference.infer_shapes(helper.make_model(graph)))
    v = g.view()
    assert [n.op for n in v.nodes] == ["linear", "other", "linear"]
    assert v.nodes[1].params["target"] == "Relu"
    w, bias = g.get_linear(v.nodes[0].key)
    np.testing.assert_allclose(w, 0.5 * b, rtol=1e-6)
    np.testing.assert_allclose(bias, 2.0 * c, rtol=1e-6)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ref = g.run({"x": x})[0]
    for n in v.nodes:
        if n.op == "linear":
            g.set_linear(n.key, *g.get_linear(n.key))
    g.set_linear(v.nodes[2].key, g.get_linear(v.nodes[2].key)[0], np.ones(4))
    np.testing.assert_allclose(g.run({"x": x})[0], ref + 1.0, rtol=1e-5, atol=1e-5)
    assert g.view().nodes[2].params["has_bias"] is True
