"""The synthetic Llama writer and the block-by-block reference (rotaq.synthetic)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors import safe_open

from rotaq import synthetic as S

TINY = {"hidden": 64, "intermediate": 128, "layers": 3, "heads": 4, "kv_heads": 2, "vocab": 512,
        "std": 0.1, "norm_noise": 0.2}


def _ids(vocab: int, batch: int = 2, seq: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [True, False])
def test_blockwise_reference_equals_full_model(tmp_path, tie):
    cfg = S.SyntheticLlama(**TINY, tie_embeddings=tie, dtype="float32", shard_bytes=200_000)
    path = S.write_llama(tmp_path / "m", cfg)
    ids = _ids(cfg.vocab)
    ref = S.blockwise_logits(path, ids, vocab_chunk=100)  # head in uneven chunks
    model = T.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert model.num_parameters() == cfg.num_parameters()
    assert ref.shape == full.shape == (2, 13, cfg.vocab)
    assert full.std() > 0.1  # a non-degenerate network
    torch.testing.assert_close(ref, full, atol=1e-5, rtol=1e-5)


def test_writer_shards_index_and_dtype(tmp_path):
    cfg = S.SyntheticLlama(**TINY, shard_bytes=80_000)  # bfloat16
    path = S.write_llama(tmp_path / "m", cfg)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    assert set(index["weight_map"]) == {n for n, _ in cfg.tensors()}
    assert index["metadata"]["total_size"] == cfg.nbytes() == 2 * cfg.num_parameters()
    seen = 0
    for f in files:
        with safe_open(str(path / f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118
                t = fh.get_tensor(k)
                assert t.dtype == torch.bfloat16
                assert tuple(t.shape) == dict(cfg.tensors())[k]
                seen += 1
    assert seen == len(cfg.tensors())
    conf = json.loads((path / "config.json").read_text())
    assert conf["torch_dtype"] == "bfloat16" and conf["num_key_value_heads"] == 2
    assert (path / "tokenizer.json").is_file()
    w = S._Weights(path)
    q = w.get("model.layers.0.self_attn.q_proj.weight")
    norm = w.get("model.layers.2.input_layernorm.weight")
    assert abs(q.std().item() - 0.1) < 0.01 and abs(q.mean().item()) < 0.01
    assert abs(norm.mean().item() - 1.0) < 0.1 and 0.1 < norm.std().item() < 0.3


def test_writer_values_independent_of_chunking_and_reused(tmp_path, monkeypatch):
    cfg = S.SyntheticLlama(**TINY, dtype="float32")
    a = S.write_llama(tmp_path / "a", cfg)
    monkeypatch.setattr(S, "_CHUNK", 1000)  # many small chunks per tensor
    b = S.write_llama(tmp_path / "b", cfg)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert S.write_llama(tmp_path / "a", cfg) == a  # same config: reused, not rewritten
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    other = S.write_llama(tmp_path / "a", S.SyntheticLlama(**{**TINY, "seed": 1}))
    assert (other / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_default_is_the_issue_model():
    cfg = S.SyntheticLlama()
    n = cfg.num_parameters()
    assert 1.55e9 < n < 1.65e9
    assert cfg.nbytes("float32") > 6.2e9 and cfg.nbytes() == 2 * n
    assert max(len(s) for s in S._shards(cfg)) > 1 and all(
        sum(2 * S._numel(sh) for _, sh in s) <= cfg.shard_bytes for s in S._shards(cfg))
