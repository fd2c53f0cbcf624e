"""Decoders captured with their KV cache (tiny random-weight Llama, Qwen2, Gemma, GPT-2; FX and
ONNX in ORT): the cache graph's prefill and step-by-step greedy decoding equal the no-cache
graph; rotations stay exact over a prefill plus decode steps fed the rewritten model's own
presents; every recipe meets the error it has without the cache; inspect finds the same
structure."""

import numpy as np
import onnxruntime as ort
import pytest

import rotaq
from rotaq.linalg.hadamard import normalized_hadamard
from rotaq.model import max_rel_error
from rotaq.rewriter import kv_capture
from tests.tiny import VOCAB, build

FAMILIES = ["llama", "qwen2", "gemma", "gpt2"]
BOTH = [(f, ir) for f in FAMILIES for ir in ("fx", "onnx")]
_MODELS: dict = {}


def _models(fam: str, ir: str, **over):
    """(torch module, cache Model, no-cache Model), built once per module."""
    key = (fam, ir, tuple(sorted(over.items())))
    if key not in _MODELS:
        m, ids = build(fam, **over) if fam != "gpt2" else build(fam)
        _MODELS[key] = (m, rotaq.load(m, ids, ir=ir), rotaq.load(m, ids, ir=ir, kv_cache=False))
    return _MODELS[key]


def _ids(rows: int, seq: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, seq)).astype(np.int64)


def _dims(fam: str) -> tuple[int, int, int]:
    return {"llama": (2, 2, 16), "qwen2": (2, 2, 16), "gemma": (2, 2, 16),
            "gpt2": (2, 4, 16)}[fam]


@pytest.mark.parametrize(("fam", "ir"), BOTH)
def test_contract_io(fam, ir):
    _, cache, nocache = _models(fam, ir)
    layers, kvh, hd = _dims(fam)
    pasts = [f"past_key_values.{i}.{w}" for i in range(layers) for w in ("key", "value")]
    assert cache.graph.input_names == ["input_ids", "attention_mask", "position_ids", *pasts]
    assert nocache.graph.input_names == ["input_ids"]
    meta = cache.graph.metadata
    assert (meta["rotaq.kv_cache"], meta["rotaq.num_layers"], meta["rotaq.kv_heads"],
            meta["rotaq.head_dim"]) == ("1", str(layers), str(kvh), str(hd))
    if ir == "onnx":
        assert cache.graph.output_names == kv_capture.output_names(layers)
    # sample inputs are a full prefill: empty pasts
    assert cache.sample_inputs["past_key_values.0.key"].shape == (1, kvh, 0, hd)


@pytest.mark.parametrize(("fam", "ir"), BOTH)
def test_prefill_equals_no_cache(fam, ir):
    _, cache, nocache = _models(fam, ir)
    layers, kvh, hd = _dims(fam)
    ids = _ids(2, 9)
    out = cache.graph.run(kv_capture.token_feeds(cache.graph, ids))
    ref = nocache.graph.run({"input_ids": ids})
    assert max_rel_error(ref[:1], out[:1]) <= 1e-5
    assert len(out) == 1 + 2 * layers
    assert all(o.shape == (2, kvh, 9, hd) for o in out[1:])
    one = _ids(1, 1)  # a 1-token prompt, empty past: below the sizes the export was traced at
    out = cache.graph.run(kv_capture.token_feeds(cache.graph, one))
    assert max_rel_error(nocache.graph.run({"input_ids": one}), out[:1]) <= 1e-5


def _step(g, ids, mask, pos, past):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feeds.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p
                  for i, p in enumerate(past)})
    out = g.run(feeds)
    return out[0], out[1:]


@pytest.mark.parametrize(("fam", "ir"), BOTH)
def test_greedy_generation_equals_full_forward(fam, ir):
    """8 tokens, one at a time with the cache (first step: empty past): every step's argmax and
    logits equal those of the full no-cache forward over the sequence so far."""
    _, cache, nocache = _models(fam, ir)
    g = cache.graph
    seq = _ids(1, 5, seed=7)
    first = kv_capture.token_feeds(g, seq)
    past = [first[k] for k in g.input_names if kv_capture.is_past(k)]
    logits, past = _step(g, seq, first["attention_mask"], first["position_ids"], past)
    for _ in range(8):
        full = nocache.graph.run({"input_ids": seq})[0]
        assert max_rel_error([full[:, -1]], [logits[:, -1]]) <= 1e-5
        nxt = int(np.argmax(logits[0, -1]))
        assert nxt == int(np.argmax(full[0, -1]))
        seq = np.concatenate([seq, [[nxt]]], axis=1)
        n = seq.shape[1]
        logits, past = _step(g, seq[:, -1:], np.ones((1, n), np.int64),
                             np.array([[n - 1]], np.int64), past)
        assert past[0].shape[2] == n


def _presents(g, ids, steps):
    return kv_capture.prefill_decode(g, kv_capture.token_feeds(g, ids), steps=steps)


@pytest.mark.parametrize(("fam", "ir"), BOTH)
@pytest.mark.parametrize("recipe", ["rotate", "rotate-qk"])
def test_rotation_exact_over_decode_steps(fam, ir, recipe):
    _, cache, _ = _models(fam, ir)
    res = rotaq.optimize(cache, recipe)
    st = res.report["passes"][0]["stats"]
    v = res.report["verify"]
    compared = v["rewrite"]["presents_compared"]
    assert not compared if st["kv_cache"] != "unchanged" else compared
    assert v["rewrite"]["logits_max_rel_error"] <= 1e-4
    ids = _ids(2, 10, seed=11)
    ref = _presents(cache.graph, ids, steps=3)  # prefill 7 tokens, then 3 decode steps
    out = _presents(res.model.graph, ids, steps=3)
    assert max_rel_error(ref[:1], out[:1]) <= 1e-4
    h = normalized_hadamard(_dims(fam)[2])
    keys_rotated = recipe == "rotate-qk"
    assert st["qk_rotated"] == (2 if keys_rotated else 0)
    for i in range(2):  # the cache stores K H (rotate-qk) and V H (per-head V/O rotation)
        k_ref, v_ref, k_out, v_out = ref[1 + 2 * i], ref[2 + 2 * i], out[1 + 2 * i], out[2 + 2 * i]
        assert max_rel_error([k_ref @ h if keys_rotated else k_ref], [k_out]) <= 1e-4
        v_rotated = st.get("ov_heads_rotated", 0) > 0
        assert max_rel_error([v_ref @ h if v_rotated else v_ref], [v_out]) <= 1e-4
        if keys_rotated:  # and really differs from the unrotated keys
            assert max_rel_error([k_ref], [k_out]) > 0.1


RECIPES = ["w8a8", "w8a8-rotated", "w4a16", "w4a16-rotated", "w4a8-rotated", "w4a4-rotated",
           "lowrank-20", "kron-w4a4"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_on_cache_graph(recipe):
    """Same logits error with and without the cache (the cache graph's measured over a prefill
    plus two decode steps), and a lossy rewrite really happened."""
    _, cache, nocache = _models("llama", "fx")
    with_cache = rotaq.optimize(cache, recipe).report
    without = rotaq.optimize(nocache, recipe).report
    assert with_cache["verify"]["rewrite"]["presents_compared"] is False
    assert 1e-3 < with_cache["rel_rms_error"] <= 1.05 * without["rel_rms_error"] + 1e-4
    assert with_cache["max_rel_error"] <= 1.05 * without["max_rel_error"] + 1e-4
    kv = [p["stats"].get("kv_cache", "") for p in with_cache["passes"]]
    assert any("fake-quant" in k for k in kv) == (recipe in ("w4a4-rotated", "kron-w4a4"))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4-rotated"])
def test_recipe_on_cache_graph_onnx(recipe):
    _, cache, nocache = _models("llama", "onnx")
    with_cache = rotaq.optimize(cache, recipe).report
    without = rotaq.optimize(nocache, recipe).report
    assert 1e-3 < with_cache["rel_rms_error"] <= 1.05 * without["rel_rms_error"] + 1e-4


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_kv4_quantizes_what_the_cache_stores(ir):
    """w4a4-rotated (kv_bits 4): every new key / value vector written to present.* is on a
    16-level grid (fake quantization: float values), where the original's are not."""
    over = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    _, cache, _ = _models("llama", ir, **over)
    res = rotaq.optimize(cache, "w4a4-rotated")
    ids = _ids(1, 6)
    ref = _presents(cache.graph, ids, steps=2)
    out = _presents(res.model.graph, ids, steps=2)

    def levels(t):
        return max(len(np.unique(row)) for row in t.reshape(-1, t.shape[-1]))

    for r, o in zip(ref[1:], out[1:]):
        assert o.shape[-1] == 64 and o.dtype == np.float32
        assert levels(o) <= 16 < levels(r)


@pytest.mark.parametrize(("fam", "ir"), BOTH)
def test_inspect_same_as_no_cache(fam, ir):
    _, cache, nocache = _models(fam, ir)
    a, b = rotaq.inspect(cache), rotaq.inspect(nocache)
    for key in ("num_linears", "structure", "residual"):
        assert a[key] == b[key], key
    blocks = [[{k: v for k, v in x.items() if k != "add"} for x in d["block_structure"]]
              for d in (a, b)]  # the add's node name differs, not what it joins
    assert blocks[0] == blocks[1] and len(blocks[0]) == 4
    assert [x["name"] for x in a["linears"]] == [x["name"] for x in b["linears"]]
    fields = ("num_heads", "num_kv_heads", "head_dim", "q_proj", "k_proj", "v_proj", "o_proj")
    assert [[x[f] for f in fields] for x in a["attention"]] == \
        [[x[f] for f in fields] for x in b["attention"]]
    assert len(a["attention"]) == 2 and len(a["norms"]) == len(b["norms"])


def test_saved_cache_graph_runs_in_ort_and_reloads(tmp_path):
    """A rotated FX cache graph written as ONNX (re-exported with dynamic batch, seq and past)
    keeps the contract names and metadata and runs a decode step in ORT; .pt2 round trip too."""
    _, cache, _ = _models("qwen2", "fx")
    res = rotaq.optimize(cache, "rotate-qk")
    path = str(tmp_path / "m.onnx")
    report = res.save(path)
    assert report["verify"]["written"]["logits_max_rel_error"] <= 1e-4
    sess = ort.InferenceSession(path)
    assert [o.name for o in sess.get_outputs()] == kv_capture.output_names(2)
    ids = _ids(3, 6)
    full = kv_capture.token_feeds(res.model.graph, ids)
    outs = sess.run(None, full)
    step = {"input_ids": ids[:, :1], "attention_mask": np.ones((3, 7), np.int64),
            "position_ids": np.full((3, 1), 6, np.int64)}
    step.update({k: outs[1 + i] for i, k in enumerate(
        n for n in res.model.graph.input_names if kv_capture.is_past(n))})
    dec = sess.run(None, step)
    assert dec[1].shape == (3, 2, 7, 16)
    ref = res.model.graph.run(step)
    assert max_rel_error(ref[:1], dec[:1]) <= 1e-5
    pt2 = str(tmp_path / "m.pt2")
    res.model.save(pt2)
    back = rotaq.load(pt2)
    assert back.graph.input_names == res.model.graph.input_names
    assert back.sample_inputs["past_key_values.1.value"].shape[2] == 0
    assert max_rel_error(back.graph.run(step)[:1], ref[:1]) <= 1e-6


def test_no_cache_for_encoders_and_seq2seq():
    from tests.families import build_family

    m, inputs = build("bert")
    assert rotaq.load(m, inputs).graph.input_names == ["input_ids", "attention_mask"]
    m, inputs = build_family("bart")
    assert rotaq.load(m, inputs).graph.input_names == ["input_ids", "decoder_input_ids"]
