"""Generation from decoder graphs with a KV cache: rotaq's ORT loop, the genai folder, the
generate CLI, eval / bench on cache graphs, the genai example.

Two graphs with the contract I/O, both from one tiny random Llama (byte-level BPE tokenizer,
so onnxruntime-genai can read it; weights at std 0.2 so greedy decoding does not repeat one
token): onnxruntime-genai's model builder output (GroupQueryAttention, no position_ids, head
size symbolic) and a torch.onnx.export with explicit past inputs (Concat-style attention,
position_ids). The reference is the Hugging Face model's full forward without a cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rotaq.decoder_io import CacheRunner, cache_spec
from rotaq.errors import RotaqError

og = pytest.importorskip("onnxruntime_genai", reason="rotaq[genai] extra (.ci/install has it)")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox"
_TEXT = ["The quick brown fox jumps over the lazy dog. A man is eating food.",
         "Rotations spread outliers across channels so that quantization loses less.",
         "Hadamard matrices are orthogonal, and their entries are plus or minus one."]
_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1"}


def _make_hf(folder: Path) -> str:
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TEXT * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(fast),
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                        initializer_range=0.2, max_position_embeddings=1024)
    T.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return str(folder)


def _export_with_cache(hf_dir: str, out: str) -> str:
    """torch.onnx.export of the HF model with explicit past inputs, named per the contract."""
    import transformers as T
    from transformers import DynamicCache

    m = T.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    cfg = m.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, k0, v0, k1, v1):
            cache = DynamicCache(config=cfg)
            for i, (k, v) in enumerate(((k0, v0), (k1, v1))):
                cache.update(k, v, i)
            o = self.m(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, past_key_values=cache, use_cache=True)
            lay = o.past_key_values.layers
            return o.logits, lay[0].keys, lay[0].values, lay[1].keys, lay[1].values

    args = (torch.randint(0, 100, (1, 3)), torch.ones(1, 7, dtype=torch.long),
            torch.arange(4, 7)[None], *(torch.randn(1, kv, 4, hd) for _ in range(4)))
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dyn = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, *({0: b, 2: p},) * 4)
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    torch.onnx.export(WithCache().eval(), args, out, input_names=names, output_names=outs,
                      dynamo=True, dynamic_shapes=dyn, external_data=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gen")
    hf = _make_hf(root / "hf")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o",
                    str(root / "builder"), "-p", "fp32", "-e", "cpu"], env=_ENV, check=True,
                   capture_output=True, timeout=600)
    torch_onnx = _export_with_cache(hf, str(root / "torch_cache.onnx"))
    return {"root": str(root), "hf": hf, "builder": str(root / "builder" / "model.onnx"),
            "torch": torch_onnx}


@pytest.fixture(scope="module")
def folder(tiny) -> str:
    from rotaq.genai import write_genai_folder

    out = os.path.join(tiny["root"], "folder")
    write_genai_folder(tiny["builder"], out, tiny["hf"])
    return out


@pytest.fixture(scope="module")
def hf_model(tiny):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(tiny["hf"]).eval()


def _prompt_ids(tiny) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["hf"])(PROMPT)["input_ids"]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rotaq.cli", *args], env=_ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def _json(*parts: str) -> dict:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


# ---- the ORT loop ---------------------------------------------------------------------------
@pytest.mark.parametrize("graph", ["builder", "torch"])
def test_greedy_loop_equals_full_forward_argmax(tiny, hf_model, graph):
    """Every generated token is the argmax of the no-cache forward over prompt + tokens so far,
    in the HF model and in the same graph fed the whole sequence from an empty past."""
    from rotaq.generate import generate

    res = generate(tiny[graph], PROMPT, max_new_tokens=16, tokenizer=tiny["hf"])
    ids = _prompt_ids(tiny)
    assert res.prompt_tokens == len(ids) and len(res.tokens) == 16 and res.stopped == "length"
    assert len(set(res.tokens)) >= 8  # not one repeated token: the check below can fail
    full = CacheRunner(tiny[graph])
    for i, tok in enumerate(res.tokens):
        seq = torch.tensor([ids + res.tokens[:i]])
        with torch.no_grad():
            ref = hf_model(seq).logits[0, -1].numpy()
        assert int(np.argmax(ref)) == tok, f"step {i}"
        assert int(np.argmax(full.prefill(seq.numpy())[0, -1])) == tok, f"step {i} (graph)"


@pytest.mark.parametrize("graph", ["builder", "torch"])
def test_cache_steps_match_full_forward_logits(tiny, hf_model, graph):
    r = CacheRunner(tiny[graph])
    ids = np.array([[5, 17, 200, 33, 90, 61]])
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    scale = np.abs(ref).max()
    assert np.abs(r.prefill(ids[:, :3]) - ref[:, :3]).max() <= 1e-5 * scale
    for t in range(3, 6):  # one token at a time, presents fed back
        assert np.abs(r.run(ids[:, t : t + 1])[0, 0] - ref[0, t]).max() <= 1e-5 * scale
    assert r.length == 6


def test_cache_spec_sources(tiny, tmp_path):
    """Head size: from genai_config.json beside the builder's graph, from the
    GroupQueryAttention + qkv projection without it, from the declared shapes for torch's."""
    for path in (tiny["builder"], tiny["torch"]):
        s = cache_spec(path)
        assert (s.num_layers, s.kv_heads, s.head_dim) == (2, 2, 16)
    shutil.copy(tiny["builder"], tmp_path / "model.onnx")
    shutil.copy(tiny["builder"] + ".data", tmp_path / "model.onnx.data")
    s = cache_spec(str(tmp_path / "model.onnx"))  # no genai_config.json here
    assert (s.num_layers, s.kv_heads, s.head_dim, s.has_position_ids) == (2, 2, 16, False)
    assert cache_spec(tiny["torch"]).has_position_ids


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    from rotaq.generate import generate, sample_next

    kw = {"max_new_tokens": 8, "tokenizer": tiny["hf"]}
    a = generate(tiny["torch"], PROMPT, temperature=1.5, top_p=0.9, seed=3, **kw).tokens
    b = generate(tiny["torch"], PROMPT, temperature=1.5, top_p=0.9, seed=3, **kw).tokens
    greedy = generate(tiny["torch"], PROMPT, **kw).tokens
    assert a == b and a != greedy
    assert generate(tiny["torch"], PROMPT, top_k=1, seed=0, **kw).tokens == greedy
    logits = np.array([0.0, 3.0, 1.0])
    assert sample_next(logits) == 1 and sample_next(logits, temperature=0.0) == 1


# ---- the genai folder -----------------------------------------------------------------------
def _genai_tokens(folder: str, ids: list[int], n: int) -> list[int]:
    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_genai_folder_contents_and_4_tokens(tiny, folder):
    import onnx

    from rotaq.generate import generate

    conf = _json(folder, "genai_config.json")
    dec = conf["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"],
            dec["num_attention_heads"], dec["hidden_size"]) == (2, 2, 16, 4, 64)
    vocab = _json(tiny["hf"], "config.json")["vocab_size"]
    assert conf["model"]["eos_token_id"] == 2 and conf["model"]["vocab_size"] == vocab
    assert conf["model"]["type"] == "llama" and conf["search"]["past_present_share_buffer"]
    assert "position_ids" not in dec["inputs"]
    proto = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    locs = {e.value for t in proto.graph.initializer for e in t.external_data
            if e.key == "location"}
    assert locs == {"model.onnx.data"}  # relative
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rotaq.kv_cache"] == "1" and meta["rotaq.head_dim"] == "16"
    assert _json(folder, "config.json")["use_cache"] is True
    ours = generate(tiny["builder"], PROMPT, max_new_tokens=4, tokenizer=tiny["hf"]).tokens
    assert _genai_tokens(folder, _prompt_ids(tiny), 4) == ours
    assert generate(folder, PROMPT, max_new_tokens=4, backend="genai").tokens == ours


def test_folder_from_torch_export(tiny, tmp_path):
    """A Concat-style graph with position_ids: no shared buffer, position_ids fed by genai."""
    from rotaq.genai import write_genai_folder
    from rotaq.generate import generate

    out = str(tmp_path / "f")
    write_genai_folder(tiny["torch"], out, tiny["hf"])
    conf = _json(out, "genai_config.json")
    assert conf["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert conf["search"]["past_present_share_buffer"] is False
    ours = generate(tiny["torch"], PROMPT, max_new_tokens=12, tokenizer=tiny["hf"]).tokens
    assert _genai_tokens(out, _prompt_ids(tiny), 12) == ours


def test_copied_folder_runs_example(tiny, folder, tmp_path):
    """examples/genai_generate.py on a copy, with the original renamed away."""
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(folder, copy)
    moved = folder + ".away"
    os.rename(folder, moved)
    try:
        r = subprocess.run([sys.executable, "examples/genai_generate.py", str(copy), PROMPT,
                            "6"], cwd=ROOT, env=_ENV, capture_output=True, text=True,
                           timeout=300, check=False)
    finally:
        os.rename(moved, folder)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT)
    tokens = [int(t) for t in r.stderr.split("tokens:")[1].split()]
    from rotaq.generate import generate

    assert tokens == generate(tiny["builder"], PROMPT, max_new_tokens=6,
                              tokenizer=tiny["hf"]).tokens


def test_folder_target_refuses(tiny, tmp_path):
    from rotaq.genai import write_genai_folder

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(RotaqError, match="not empty and is not a generation folder"):
        write_genai_folder(tiny["builder"], str(busy), tiny["hf"])
    assert (busy / "notes.txt").read_text() == "keep me"
    with pytest.raises(RotaqError, match="vocab_size=9 but the graph's logits have"):
        write_genai_folder(tiny["builder"], str(tmp_path / "x"), tiny["hf"],
                           {**_json(tiny["hf"], "config.json"),
                            "vocab_size": 9})
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folder left


# ---- CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_cache_onnx(tiny) -> str:
    """The same HF model exported without a cache (input_ids only)."""
    import transformers as T

    m = T.AutoModelForCausalLM.from_pretrained(tiny["hf"]).eval()
    m.config.use_cache = False
    out = os.path.join(tiny["root"], "no_cache.onnx")

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    torch.onnx.export(Logits().eval(), (torch.randint(0, 100, (1, 5)),), out,
                      input_names=["input_ids"], output_names=["logits"], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},),
                      external_data=False)
    return out


def test_generate_cli(tiny, folder, no_cache_onnx, tmp_path):
    r = _cli(["generate", folder, "--prompt", PROMPT, "--max-new-tokens", "5"])
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "decode" in r.stderr and "tokens/s" in r.stderr
    j = json.loads(_cli(["generate", folder, "--prompt", PROMPT, "--max-new-tokens", "5",
                         "--backend", "genai", "--json"]).stdout)
    assert len(j["tokens"]) == 5 and j["decode_tokens_per_s"] > 0 and j["backend"] == "genai"
    assert r.stdout.strip() == j["text"].strip()
    bad = [
        ([no_cache_onnx, "--tokenizer", tiny["hf"]], "this graph has no KV cache"),
        ([folder, "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        ([str(tmp_path / "nope.onnx")], "no such file"),
        ([tiny["torch"], "--backend", "genai", "--tokenizer", tiny["hf"]],
         "runs a generation folder"),
        ([tiny["torch"]], "no tokenizer is known"),
        ([folder, "--top-p", "1.5"], "top_p must be in"),
    ]
    for args, msg in bad:
        r = _cli(["generate", *args[:1], "--prompt", PROMPT, *args[1:]])
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_optimize_to_folder(tiny, no_cache_onnx, tmp_path):
    """`rotaq optimize X.onnx --recipe w8a8 -o DIR/` on a cache graph -> a folder genai runs;
    a graph without a cache is refused before any pass runs."""
    import onnx

    src = tmp_path / "with_meta.onnx"  # rotaq metadata names the tokenizer / config folder
    proto = onnx.load(tiny["torch"])
    for k, v in (("rotaq.tokenizer", tiny["hf"]), ("rotaq.name", tiny["hf"]),
                 ("rotaq.kind", "causal-lm")):
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, src)
    rng = np.random.default_rng(0)
    n, s, p = 4, 8, 4
    feeds = {"input_ids": rng.integers(0, 300, (n, s)),
             "attention_mask": np.ones((n, p + s), np.int64),
             "position_ids": np.tile(np.arange(p, p + s), (n, 1))}
    for i in range(2):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = rng.standard_normal((n, 2, p, 16)).astype("f4")
    np.savez(tmp_path / "in.npz", **feeds)
    out = str(tmp_path / "w8a8") + "/"
    r = _cli(["optimize", str(src), "--recipe", "w8a8", "--inputs", str(tmp_path / "in.npz"),
              "-o", out, "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    written, rewrite = (rep["verify"][k]["max_rel_error"] for k in ("written", "rewrite"))
    assert written == pytest.approx(rewrite, rel=1e-4) and written < 0.1  # int8: ~0.05 here
    assert {os.path.basename(f["path"]) for f in rep["files"]} >= {
        "model.onnx", "genai_config.json", "config.json", "tokenizer.json"}
    from rotaq.generate import generate

    ours = generate(out, PROMPT, max_new_tokens=6).tokens
    assert generate(out, PROMPT, max_new_tokens=6, backend="genai").tokens == ours
    r = _cli(["optimize", os.path.join(out, "model.onnx"), "--recipe", "w8a8", "-o", out])
    assert r.returncode == 2 and "refusing to overwrite the input model" in r.stderr
    r = _cli(["optimize", no_cache_onnx, "--recipe", "w8a8", "-o", str(tmp_path / "n") + "/"])
    assert r.returncode == 2 and "needs a decoder with a KV cache" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "n").exists()
    (tmp_path / "plain").mkdir()  # an existing folder (no trailing slash) is a folder target
    r = _cli(["optimize", no_cache_onnx, "--recipe", "w8a8", "-o", str(tmp_path / "plain")])
    assert r.returncode == 2 and "is a directory; a folder output is a generation" in r.stderr
    assert not any((tmp_path / "plain").iterdir())


# ---- eval and bench -------------------------------------------------------------------------
def test_ppl_cache_graphs_equal_no_cache(tiny, hf_model, no_cache_onnx):
    import rotaq
    from rotaq.eval.quality import perplexity_from_windows

    wins = np.random.default_rng(0).integers(3, 300, (2, 64))  # vocab: 385 ids
    with torch.no_grad():
        logits = hf_model(torch.tensor(wins)).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.tensor(wins[:, 1:]).reshape(-1))
    ref = float(torch.exp(nll))
    for path in (tiny["builder"], tiny["torch"], no_cache_onnx):
        got = perplexity_from_windows(rotaq.load(path), wins, progress=False)["ppl"]
        assert abs(got - ref) <= 1e-5 * ref, path


def test_bench_decode_figures(tiny, no_cache_onnx):
    from rotaq.eval.latency import bench

    res = bench(tiny["builder"], tokens=[1, 32], contexts=[16, 64], repeats=3, warmup=1,
                progress=False)
    assert res["kv_cache"] is True and set(res["tokens"]) == {"1", "32"}
    assert set(res["decode"]) == {"16", "64"}
    for t in res["decode"].values():
        assert t["tokens_per_s"] == pytest.approx(1e3 / t["median_ms"]) and t["median_ms"] > 0
    assert res["peak_rss_mib"] > 50
    plain = bench(no_cache_onnx, tokens=[4], repeats=2, warmup=0, progress=False)
    assert plain["kv_cache"] is False and "decode" not in plain
    r = _cli(["bench", tiny["torch"], "--tokens", "8", "--contexts", "16", "--repeats", "2"])
    assert r.returncode == 0, r.stderr
    assert "decode ms/token" in r.stdout and "peak RSS" in r.stdout
    r = _cli(["bench", tiny["torch"], "--contexts", "0"])
    assert r.returncode == 2 and "--contexts expects positive integers" in r.stderr


def test_decode_bench_pieces(tiny, folder, hf_model):
    """benchmarks/decode_bench.py's measurements on the tiny folder."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.decode_bench import GenaiRunner, cpu_info, perplexity
    finally:
        sys.path.remove(str(ROOT))
    from pathlib import Path as P

    wins = np.random.default_rng(1).integers(3, 300, (2, 32))
    with torch.no_grad():
        logits = hf_model(torch.tensor(wins)).logits.double()
    ref = float(torch.exp(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(wins[:, 1:]).reshape(-1))))
    assert perplexity(P(folder), wins, 1) == pytest.approx(ref, rel=1e-5)
    g = GenaiRunner(P(folder), 1)
    ms = g.decode_ms(wins[0], 5)
    assert len(ms) == 5 and min(ms) > 0 and g.prefill_ms(wins[0]) > 0
    assert cpu_info()["cores"] >= 1


def test_eval_cli_on_folder_equals_no_cache(tiny, folder, no_cache_onnx):
    """`rotaq eval DIR` (a generation folder, its own tokenizer) = the no-cache graph's ppl."""
    args = ["--tokens", "256", "--window", "64", "--json"]
    a = _cli(["eval", folder, *args])
    b = _cli(["eval", no_cache_onnx, "--tokenizer", tiny["hf"], *args])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pa, pb = json.loads(a.stdout)["ppl"], json.loads(b.stdout)["ppl"]
    assert pa == pytest.approx(pb, rel=1e-5) and json.loads(a.stdout)["windows"] == 4
