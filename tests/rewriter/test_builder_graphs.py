"""Decoders built by onnxruntime-genai's model builder (fp32 and int4) from a tiny random Llama:
the analysis reads their fused ops (GroupQueryAttention with packed q|k|v, skip norms,
MatMulNBits) and ``rotate`` is exact on the fp32 graph, checked in an independent ORT run over
a prefill and a decode step that reads the rotated cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers as T

import rotaq
from rotaq.errors import RewriteError
from rotaq.rewriter.onnx import OnnxGraph

pytest.importorskip("onnxruntime_genai")  # the rotaq[genai] extra: the model builder

HEADS, KV, HD, LAYERS, HIDDEN, INTER, VOCAB = 4, 2, 16, 2, 64, 128, 512
TOKENIZER = Path.home() / ".cache" / "rotaq" / "smollm2-135m-instruct-fp32"


def _hf_dir(path: Path) -> Path:
    """A tiny random Llama saved like a Hugging Face checkpoint; the builder needs a tokenizer
    (it writes genai's processing files), so SmolLM2's is copied in."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                        eos_token_id=2)
    m = T.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm scales, so folding them is really tested
        g = torch.Generator().manual_seed(0)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    m.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, path / f)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("SmolLM2's tokenizer is not cached (rotaq.assets.builtin_model_dir)")
    from rotaq import assets

    root = tmp_path_factory.mktemp("builder")
    hf = _hf_dir(root / "hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROTAQ_CACHE", str(root / "cache"))
        out = {p: assets.builder_model_dir("tiny-llama", p, hf_dir=hf) / "model.onnx"
               for p in ("fp32", "int4")}
        again = assets.builder_model_dir("tiny-llama", "fp32", hf_dir=hf)  # cached: no rebuild
    assert again / "model.onnx" == out["fp32"]
    return out


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _check_structure(a, quantized: bool) -> None:
    assert len(a.linears) == LAYERS * 5 + 1  # qkv, o, gate, up, down per layer + head
    nbits = [k for k in a.linears if a.view.by_key[k].params.get("quantized") == "MatMulNBits"]
    assert len(nbits) == (len(a.linears) if quantized else 0)
    assert len(a.attention) == LAYERS
    for s in a.attention:
        assert (s.kind, s.num_heads, s.num_kv_heads, s.head_dim) == ("gqa", HEADS, KV, HD)
        assert s.q_proj == s.k_proj == s.v_proj  # one fused q|k|v projection
        assert a.linears[s.q_proj].out_features == (HEADS + 2 * KV) * HD
        assert s.o_proj is not None and a.linears[s.o_proj].in_features == HEADS * HD
    skip = [k for k in a.norms if a.view.by_key[k].params.get("skip")]
    assert len(a.norms) == 2 * LAYERS + 1 and len(skip) == 2 * LAYERS
    res = a.residual
    assert res.pre_norm and len(res.blocks) == 2 * LAYERS and res.streams == 1
    assert res.embedding is not None and res.final_norm in skip
    assert len(res.head) == 1 and a.linears[res.head[0]].out_features == VOCAB
    assert [w for b in res.blocks for w in b.writers] == [
        k for s in a.attention for k in (s.o_proj, _down(a, s))]


def _down(a, site) -> str:
    """The MLP writer of the block after ``site``'s (the linear reading HIDDEN x 2 inputs)."""
    keys = list(a.linears)
    i = keys.index(site.o_proj)
    return next(k for k in keys[i + 1:] if a.linears[k].in_features == INTER)


def test_fp32_builder_graph_analysis(built):
    ops = _ops(built["fp32"])
    assert ops["GroupQueryAttention"] == LAYERS and ops["SkipSimplifiedLayerNormalization"] == 4
    a = rotaq.load(str(built["fp32"])).analysis()
    _check_structure(a, quantized=False)


def test_int4_builder_graph_analysis(built):
    ops = _ops(built["int4"])
    assert ops["MatMulNBits"] == LAYERS * 5 + 1 and "MatMul" not in ops
    a = rotaq.load(str(built["int4"])).analysis()
    _check_structure(a, quantized=True)
    emb = a.view.by_key[a.residual.embedding]
    assert emb.params["quantized"] == "GatherBlockQuantized" and emb.params["dim"] == HIDDEN


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray] | None,
           total: int) -> dict:
    """Feeds for the inputs the graph declares (the builder's CPU graphs take no
    position_ids)."""
    b, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, total), np.int64),
             "position_ids": np.broadcast_to(np.arange(total - seq, total), (b, seq)).copy()}
    for i in range(LAYERS):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = (
                past[f"present.{i}.{kv}"] if past else np.zeros((b, KV, 0, HD), np.float32))
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _prefill_decode(sess: ort.InferenceSession, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Logits of a prefill of ids[:, :-1] and of one decode step on ids[:, -1:] that reads the
    cache the prefill wrote; and that cache."""
    names = [o.name for o in sess.get_outputs()]
    pre = dict(zip(names, sess.run(None, _feeds(sess, ids[:, :-1], None, ids.shape[1] - 1))))
    step = dict(zip(names, sess.run(None, _feeds(sess, ids[:, -1:], pre, ids.shape[1]))))
    return pre["logits"], step["logits"], pre["present.0.key"], pre["present.0.value"]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_rotate_exact_on_fp32_builder_graph(built, tmp_path):
    res = rotaq.optimize(str(built["fp32"]), "rotate")
    stats = res.report["passes"][0]["stats"]
    assert stats["mode"] == "residual" and stats["norms_folded"] == 2 * LAYERS + 1
    assert stats["ov_heads_rotated"] == LAYERS and stats["online_hadamards"] == LAYERS
    assert res.report["max_rel_error"] <= 1e-4
    out = tmp_path / "model.onnx"
    res.save(str(out))
    # every skip norm's gamma was folded forward: the written norms all have unit scales
    g = OnnxGraph.load(out)
    for n in g.model.graph:
        if n.op_type in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"):
            gamma = n.inputs[2 if n.op_type.startswith("Skip") else 1].const_value.numpy()
            np.testing.assert_array_equal(gamma, np.ones_like(gamma))
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(2, 12)).astype(np.int64)
    ref, new = _prefill_decode(_session(built["fp32"]), ids), _prefill_decode(_session(out), ids)
    assert _rel(ref[0], new[0]) <= 1e-4  # prefill logits
    assert _rel(ref[1], new[1]) <= 1e-4  # decode step on the rotated cache
    assert _rel(ref[2], new[2]) <= 1e-5  # keys: q/k projections keep their outputs
    assert _rel(ref[3], new[3]) > 0.1  # values: rotated per head (rotate_ov), by design


def test_rotate_qk_refused_on_gqa(built):
    with pytest.raises(RewriteError, match=r"GroupQueryAttention node '/model/layers\.0/attn/"
                                           r"GroupQueryAttention'.*do_rotary=1"):
        rotaq.optimize(str(built["fp32"]), "rotate", options={"rotate_qk": True}, verify=False)


@pytest.mark.parametrize("recipe", ["rotate", "w4a16"])
def test_int4_builder_graph_refused(built, recipe):
    # the first pre-quantized weight the recipe touches is named: the int4 tied embedding
    # (rotate folds the embedding first) or a MatMulNBits linear (w4a16)
    with pytest.raises(RewriteError, match=r"(MatMulNBits|GatherBlockQuantized) node \(4-bit "
                       r"weights in blocks of 32"):
        rotaq.optimize(str(built["int4"]), recipe, verify=False)


@pytest.mark.parametrize("recipe,bound", [("w8a8", 0.05), ("w4a16", 0.25)])
def test_quantize_fp32_builder_graph(built, recipe, bound):
    """The builder's fp32 linears are plain MatMuls: the quantize recipes lower all but the head
    (the recipes keep it float) and stay within their usual error on this tiny model."""
    res = rotaq.optimize(str(built["fp32"]), recipe)
    stats = res.report["passes"][-1]["stats"]
    assert stats["linears"] == LAYERS * 5
    assert 0 < res.report["max_rel_error"] <= bound


# ---- an Optimum-style export: plain ONNX ops, TorchScript exporter, past/present as inputs/outputs
class _WithCache(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``, the cache
    passed as tensors and rebuilt as a DynamicCache inside, as Optimum's exports do."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = T.DynamicCache()
        for i in range(LAYERS):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        return (out.logits, *[t for lay in layers for t in (lay.keys, lay.values)])


@pytest.fixture(scope="module")
def optimum_style(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                        max_position_embeddings=256, tie_word_embeddings=True)
    m = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape))
    past_len, seq = 3, 4
    past = [torch.randn(1, KV, past_len, HD) for _ in range(2 * LAYERS)]
    args = (torch.randint(0, VOCAB, (1, seq)), torch.ones(1, past_len + seq, dtype=torch.long),
            torch.arange(past_len, past_len + seq)[None], *past)
    cache = [f"{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    ins = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{c}" for c in cache)]
    outs = ["logits", *(f"present.{c}" for c in cache)]
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
           "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    dyn.update({n: {0: "batch", 2: "past"} for n in ins[3:]})
    dyn.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    path = tmp_path_factory.mktemp("optimum") / "model.onnx"
    torch.onnx.export(_WithCache(m), args, str(path), input_names=ins, output_names=outs,
                      dynamic_axes=dyn, opset_version=17, dynamo=False)
    return path


def test_optimum_style_analysis_and_rotate(optimum_style, tmp_path):
    a = rotaq.load(str(optimum_style)).analysis()
    assert len(a.linears) == LAYERS * 7 + 1  # q, k, v, o, gate, up, down + head
    assert len(a.attention) == LAYERS
    for s in a.attention:  # the exporter's Div(1, Sqrt(.)) RMSNorm and Shape reads are matched
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (HEADS, KV, HD)
        assert None not in (s.q_proj, s.k_proj, s.v_proj, s.o_proj)
    assert len(a.norms) == 2 * LAYERS + 1 and a.residual.pre_norm
    assert len(a.residual.blocks) == 2 * LAYERS and a.residual.final_norm is not None
    res = rotaq.optimize(str(optimum_style), "rotate")
    assert res.report["passes"][0]["stats"]["ov_heads_rotated"] == LAYERS
    assert res.report["max_rel_error"] <= 1e-4
    out = tmp_path / "rot.onnx"
    res.save(str(out))
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(2, 9)).astype(np.int64)
    ref = _prefill_decode(_session(optimum_style), ids)
    new = _prefill_decode(_session(out), ids)
    assert _rel(ref[0], new[0]) <= 1e-4 and _rel(ref[1], new[1]) <= 1e-4
    assert _rel(ref[3], new[3]) > 0.1  # the cache holds V rotated per head
