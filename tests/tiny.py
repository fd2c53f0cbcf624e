"""Tiny random-weight transformers built from configs (offline), for structural tests."""

from __future__ import annotations

import functools

import torch
import transformers as T

VOCAB = 256
_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=VOCAB)


def _ids(seq: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, VOCAB, (1, seq), generator=g)}


def _bert_inputs(seq: int = 8) -> dict[str, torch.Tensor]:
    d = _ids(seq)
    d["attention_mask"] = torch.ones_like(d["input_ids"])
    return d


def _randomize_norms(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give norms non-trivial scales and all biases values, so folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):  # all biases (zero at init: exporters would drop them)
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ("norm" in name.lower() or ".ln_" in name) and p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return m.eval()


def build(family: str, **over) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    kw = {**_KW, **over}
    if family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(tie_word_embeddings=True, **kw))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**kw))
    elif family == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**kw))
    elif family == "gemma":
        m = T.GemmaForCausalLM(T.GemmaConfig(head_dim=16, **kw))
    elif family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                           bos_token_id=0, eos_token_id=0))
    elif family in ("bert", "bert-eager"):
        cfg = T.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=VOCAB,
                           attn_implementation="eager" if family == "bert-eager" else "sdpa")
        return _randomize_norms(T.BertModel(cfg)), _bert_inputs()
    else:
        raise ValueError(family)
    m.config.use_cache = False
    return _randomize_norms(m), _ids()


@functools.lru_cache(maxsize=None)
def _loaded(family: str, ir: str, kv_cache: bool, over: tuple):
    import rotaq

    m, inputs = build(family, **dict(over))
    return rotaq.load(m, inputs, ir=ir, kv_cache=kv_cache)


def loaded(family: str, ir: str = "fx", kv_cache: bool = True, **over):
    """``rotaq.load(build(family, **over), ir=ir)``, captured once per test session.

    ``rotaq.optimize`` works on a copy, so tests that only optimize, run or analyse the result
    share one capture (an ONNX capture of a tiny model costs ~10-25 s of torch.export +
    torch.onnx.export on 2 cores). A test that edits a model's graph must ``clone()`` it first.
    """
    return _loaded(family, ir, kv_cache, tuple(sorted(over.items())))
