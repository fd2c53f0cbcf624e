"""Loaders: GGUF files, Hugging Face encoder-decoder directories (T5, BART, Whisper) without a
tokenizer, and ONNX models with linears inside control-flow subgraphs (refused by name)."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
import transformers as T
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import rotaq
from rotaq import assets
from rotaq.cli import main
from rotaq.errors import LoadError

gguf = pytest.importorskip("gguf")

VOCAB, D, FF, LAYERS, HEADS, KV = 256, 64, 128, 2, 4, 2


# ------------------------------------------------------------------------------------- GGUF
def _write_gguf(path, seed=0):
    """A tiny Llama GGUF (f32, with blk.0.ffn_down stored as Q8_0); returns that tensor as
    gguf itself dequantizes it."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(D // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)

    def t(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    w.add_tensor("token_embd.weight", t(VOCAB, D))
    kv, down_q8 = KV * D // HEADS, None
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        for name, shape in (("attn_q", (D, D)), ("attn_k", (kv, D)), ("attn_v", (kv, D)),
                            ("attn_output", (D, D)), ("ffn_gate", (FF, D)), ("ffn_up", (FF, D))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        down = t(D, FF)
        if i == 0:
            q8 = gguf.quants.quantize(down, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blk.{i}.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            down_q8 = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(f"blk.{i}.ffn_down.weight", down)
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", t(VOCAB, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return down_q8


def test_gguf_inspect_rotate_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "tiny.gguf"
    down_q8 = _write_gguf(f)
    before = f.read_bytes()
    assert main(["inspect", str(f), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == str(f) and d["num_linears"] == 7 * LAYERS + 1
    assert [(a["num_heads"], a["num_kv_heads"], a["head_dim"]) for a in d["attention"]] == \
        [(HEADS, KV, D // HEADS)] * LAYERS
    assert d["residual"]["head"] == ["lm_head"] and d["pre_norm"]
    # de-quantized like transformers' GGUF loader, cached as fp32 safetensors
    (conv,) = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    from safetensors.numpy import load_file

    sd = load_file(conv / "model.safetensors")
    assert sd["model.layers.0.mlp.down_proj.weight"].dtype == np.float32
    np.testing.assert_array_equal(sd["model.layers.0.mlp.down_proj.weight"], down_q8)
    assert f.read_bytes() == before  # never modified
    # the second load reads the caches: no conversion, no capture
    monkeypatch.setattr(assets, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    m = rotaq.load(str(f))
    assert len(m.analysis().linears) == 7 * LAYERS + 1
    res = rotaq.optimize(m, "rotate")
    assert res.report["passes"][0]["modified"] and res.report["max_rel_error"] < 1e-4
    # a changed file (new mtime) is converted again
    os.utime(f, ns=(1, 1))
    with pytest.raises(pytest.fail.Exception, match="converted again"):
        rotaq.load(str(f))


def test_gguf_errors(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.gguf" in err and "cannot read GGUF" in err and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


# ---------------------------------------------------------------------------- encoder-decoder
def _seq2seq(family):
    torch.manual_seed(0)
    common = {"vocab_size": 128, "d_model": 64, "pad_token_id": 0}
    if family == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(
            d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, **common))
    layers = {"encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
              "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
    if family == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(max_position_embeddings=64,
                                                           **layers, **common))
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        num_mel_bins=16, max_source_positions=32, max_target_positions=32,
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, suppress_tokens=[],
        begin_suppress_tokens=[], **layers, **common))


@pytest.fixture(scope="module")
def seq2seq_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    out = {}
    for fam in ("t5", "bart", "whisper"):
        m = _seq2seq(fam)
        m.save_pretrained(str(root / fam))  # config + weights only: no tokenizer
        out[fam] = (root / fam, sum(isinstance(x, torch.nn.Linear) for x in m.modules()))
    return out


@pytest.mark.parametrize("family,main_input", [("t5", "input_ids"), ("bart", "input_ids"),
                                               ("whisper", "input_features")])
def test_seq2seq_dir_loads_and_rotates(seq2seq_dirs, family, main_input):
    path, n_linear = seq2seq_dirs[family]
    m = rotaq.load(str(path))
    assert m.source["kind"] == "seq2seq" and "tokenizer" not in m.source
    assert set(m.sample_inputs) >= {main_input, "decoder_input_ids"}
    if family == "whisper":
        assert m.sample_inputs["input_features"].shape == (1, 16, 64)
    d = rotaq.inspect(m)
    assert n_linear == 33 and d["num_linears"] == n_linear
    assert len(d["attention"]) == 6  # 2 encoder self, 2 decoder self, 2 cross
    assert {(a["num_heads"], a["head_dim"]) for a in d["attention"]} == {(4, 16)}
    res = rotaq.optimize(m, "rotate", options={"mode": "online"})
    assert res.report["passes"][0]["modified"]
    assert res.report["passes"][0]["stats"]["linears_rotated"] > 0
    assert res.report["max_rel_error"] < 1e-4


@pytest.mark.parametrize("family", ["t5", "whisper"])
def test_seq2seq_cli_onnx(seq2seq_dirs, tmp_path, capsys, family):
    """Through the CLI to ONNX, verified in ONNX Runtime (T5's SDPA path breaks the ONNX
    exporter: encoder-decoders load with eager attention); the written file loads back with
    sample inputs of the right shapes (Whisper's mel bins are a numeric symbol in the export)
    and is rewritten again in the ONNX IR."""
    out = tmp_path / f"{family}.onnx"
    assert main(["optimize", str(seq2seq_dirs[family][0]), "--recipe", "rotate", "--set",
                 "mode=online", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verify"]["written"]["max_rel_error"] < 1e-4 and out.exists()
    back = rotaq.load(str(out))
    if family == "whisper":  # 8 synthetic samples (rotaq.inputs.VERIFY_ROWS)
        assert back.sample_inputs["input_features"].shape == (8, 16, 64)
    res = rotaq.optimize(back, "rotate", options={"mode": "online"})
    assert res.report["max_rel_error"] < 1e-4


def test_image_encoder_dir(tmp_path):
    """A ViT directory (no tokenizer, main input pixel_values) gets images from its config."""
    torch.manual_seed(0)
    m = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, image_size=32, patch_size=8))
    m.save_pretrained(str(tmp_path / "vit"))
    model = rotaq.load(str(tmp_path / "vit"))
    assert {k: v.shape for k, v in model.sample_inputs.items()} == {
        "pixel_values": (1, 3, 32, 32)}
    assert len(model.analysis().linears) == sum(
        isinstance(x, torch.nn.Linear) for x in m.modules()) == 13


def test_unexportable_family_is_named(seq2seq_dirs, monkeypatch):
    from rotaq.rewriter import fx

    def fail(*a, **k):
        raise LoadError("torch.export failed: AttributeError: 'NoneType' object has no "
                        "attribute 'shape'")

    monkeypatch.setattr(fx.FxGraph, "from_module", classmethod(fail))
    with pytest.raises(LoadError, match="the bart model \\(BartForConditionalGeneration\\) "
                                        "cannot be captured: torch.export failed"):
        rotaq.load(str(seq2seq_dirs["bart"][0]))


# ------------------------------------------------------------------------------ control flow
def _if_model(path, linear_in=("then", "else"), op="If"):
    """x -> MatMul -> If(sum > 0) -> MatMul -> y; branch bodies hold MatMul with a weight from
    the outer graph (then) or their own initializer (else), or Relu / Neg."""
    rng = np.random.default_rng(0)

    def w(name):
        return nh.from_array(rng.standard_normal((8, 8)).astype(np.float32), name)

    b = oh.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8])
    then_nodes = [oh.make_node("MatMul", ["h", "w_outer"], ["b"], name="then_mm")] \
        if "then" in linear_in else [oh.make_node("Relu", ["h"], ["b"])]
    else_nodes = [oh.make_node("MatMul", ["h", "w_inner"], ["b"], name="else_mm")] \
        if "else" in linear_in else [oh.make_node("Neg", ["h"], ["b"])]
    then = oh.make_graph(then_nodes, "then", [], [b])
    other = oh.make_graph(else_nodes, "else", [], [b],
                          initializer=[w("w_inner")] if "else" in linear_in else [])
    nodes = [oh.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             oh.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
             oh.make_node("Greater", ["s", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other,
                          name="branch"),
             oh.make_node("MatMul", ["b", "w1"], ["y"], name="mm1")]
    inits = [w("w0"), w("w1"), w("w_outer"), nh.from_array(np.array(0, np.float32), "zero")]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                      initializer=inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(onnx.shape_inference.infer_shapes(m), str(path))
    return path


@pytest.mark.parametrize("linear_in,branch,inner", [
    (("then", "else"), "else_branch", "else_mm"), (("then",), "then_branch", "then_mm")])
def test_if_with_linears_is_refused(tmp_path, capsys, linear_in, branch, inner):
    src = _if_model(tmp_path / "if.onnx", linear_in)
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "--recipe", "rotate", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "If node 'branch'" in err and f"'{branch}' subgraph" in err and f"'{inner}'" in err
    assert not out.exists() and src.read_bytes() == before


def test_loop_body_with_gemm_is_refused(tmp_path):
    body_in = [oh.make_tensor_value_info("i", TensorProto.INT64, []),
               oh.make_tensor_value_info("cond", TensorProto.BOOL, []),
               oh.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8])]
    body_out = [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                oh.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])]
    body = oh.make_graph([oh.make_node("Identity", ["cond"], ["cond_out"]),
                          oh.make_node("Gemm", ["h", "w"], ["h_out"], name="step")],
                         "body", body_in, body_out)
    w = nh.from_array(np.eye(8, dtype=np.float32), "w")
    trip = nh.from_array(np.array(3, np.int64), "trip")
    true = nh.from_array(np.array(True), "true")
    g = oh.make_graph([oh.make_node("Loop", ["trip", "true", "x"], ["y"], body=body,
                                    name="repeat")], "g",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                      initializer=[w, trip, true])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "loop.onnx"))
    from rotaq.errors import RewriteError
    from rotaq.rewriter.onnx import OnnxGraph

    g = OnnxGraph.load(str(tmp_path / "loop.onnx"))
    with pytest.raises(RewriteError, match="Loop node 'repeat'.*'body' subgraph \\(Gemm 'step'"):
        g.view()


def test_if_without_linears_still_rewritten(tmp_path, capsys):
    src = _if_model(tmp_path / "if.onnx", linear_in=())
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "--recipe", "rotate", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["passes"][0]["modified"] and rep["passes"][0]["stats"]["linears_rotated"] >= 1
    assert rep["verify"]["written"]["max_rel_error"] < 1e-5
