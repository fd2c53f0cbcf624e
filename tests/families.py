"""Tiny random-weight models of twenty families, built from transformers configs (offline), with
the structure each one must be found to have. The expected figures are written from the configs
(layers, heads, KV heads, head size) and the families' published block layouts, never read back
from rotaq; the linear names are cross-checked against the torch modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as T

from tests.tiny import _randomize_norms

V = 256
_KW = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V}
_DEC = {"vocab_size": V, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128}


@dataclass(frozen=True)
class Family:
    build: object  # () -> torch module
    linears: int  # every linear, head included
    blocks: int  # residual adds (two per layer; one per layer for parallel blocks)
    sites: int  # attention sites (cross attention included)
    heads: tuple[int, int, int]  # heads, KV heads, head size
    structure: str
    head: tuple[str, ...]
    final_norm: str | None
    inputs: str = "ids"  # ids | seq2seq | audio | image
    streams: int = 1
    experts: int = 0  # grouped expert weights (MoE)
    routers: int = 0


def _seq2seq() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, V, (1, 8), generator=g),
            "decoder_input_ids": torch.randint(0, V, (1, 5), generator=g)}


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "ids":
        return {"input_ids": torch.randint(0, V, (1, 8), generator=g)}
    if kind == "seq2seq":
        return _seq2seq()
    if kind == "audio":
        return {"input_features": torch.randn(1, 16, 32, generator=g),
                "decoder_input_ids": torch.randint(0, V, (1, 5), generator=g)}
    return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


_LM = ("lm_head",)
FAMILIES: dict[str, Family] = {
    "llama": Family(lambda: T.LlamaForCausalLM(T.LlamaConfig(tie_word_embeddings=True, **_KW)),
                    15, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm"),
    "mistral": Family(lambda: T.MistralForCausalLM(T.MistralConfig(**_KW)),
                      15, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm"),
    "qwen2": Family(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_KW)),
                    15, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm"),
    "qwen3": Family(lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **_KW)),  # qk-norm
                    15, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm"),
    "gemma": Family(lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=16, **_KW)),
                    15, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm"),
    # a norm before and after each sublayer; tanh soft-capping of scores and logits
    "gemma2": Family(lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=16, **_KW)),
                     15, 4, 2, (4, 2, 16), "sandwich", _LM, "model.norm"),
    "gemma3": Family(lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **_KW)),
                     15, 4, 2, (4, 2, 16), "sandwich", _LM, "model.norm"),
    # the norm applied to each sublayer's output only; q/k norms over whole projections
    "olmo2": Family(lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**_KW)),
                    15, 4, 2, (4, 2, 16), "post-sublayer", _LM, "model.norm"),
    # fused qkv_proj (6 query heads, 2 KV heads: not equal thirds) and gate_up_proj
    "phi3": Family(lambda: T.Phi3ForCausalLM(T.Phi3Config(
        hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=V, pad_token_id=0)),
        9, 4, 2, (6, 2, 16), "pre-norm", _LM, "model.norm"),
    "stablelm": Family(lambda: T.StableLmForCausalLM(T.StableLmConfig(**_KW)),  # partial rotary
                       15, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm"),
    # parallel attention + MLP from one norm, multi-query fused qkv (4 heads, 1 KV head)
    "falcon": Family(lambda: T.FalconForCausalLM(T.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)),
        9, 2, 2, (4, 1, 16), "pre-norm, parallel", _LM, "transformer.ln_f"),
    # parallel residual with two norms, per-head interleaved fused qkv
    "gpt-neox": Family(lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=V)), 9, 2, 2, (4, 4, 16), "pre-norm, parallel", _LM,
        "gpt_neox.final_layer_norm"),
    "gpt-j": Family(lambda: T.GPTJForCausalLM(T.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=V, rotary_dim=8, bos_token_id=0,
        eos_token_id=0)), 13, 2, 2, (4, 4, 16), "pre-norm, parallel", _LM, "transformer.ln_f"),
    "phi": Family(lambda: T.PhiForCausalLM(T.PhiConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=V)), 13, 2, 2, (4, 4, 16), "pre-norm, parallel", _LM,
        "model.final_layernorm"),
    "gpt2": Family(lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=V, bos_token_id=0, eos_token_id=0)),
        9, 4, 2, (4, 4, 16), "pre-norm", _LM, "transformer.ln_f"),
    # 4 experts in two grouped weights per layer (gate_up, down); the router is a linear
    "mixtral": Family(lambda: T.MixtralForCausalLM(T.MixtralConfig(
        num_local_experts=4, num_experts_per_tok=2, **_KW)),
        11, 4, 2, (4, 2, 16), "pre-norm", _LM, "model.norm", experts=4, routers=2),
    "bert": Family(lambda: T.BertModel(T.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=V)), 13, 4, 2, (4, 4, 16), "post-norm", ("pooler.dense",),
        "encoder.layer.1.output.LayerNorm", inputs="ids"),
    # encoder-decoders: self and cross attention, two streams
    "t5": Family(lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0)),
        33, 10, 6, (4, 4, 16), "pre-norm, 2 streams (encoder-decoder)", _LM,
        "decoder.final_layer_norm", inputs="seq2seq", streams=2),
    "bart": Family(lambda: T.BartForConditionalGeneration(T.BartConfig(
        max_position_embeddings=64, **_DEC)),
        33, 10, 6, (4, 4, 16), "post-norm, 2 streams (encoder-decoder)", _LM,
        "model.decoder.layers.1.final_layer_norm", inputs="seq2seq", streams=2),
    "whisper": Family(lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        num_mel_bins=16, max_source_positions=16, max_target_positions=32,
        decoder_start_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=0, **_DEC)),
        33, 10, 6, (4, 4, 16), "pre-norm, 2 streams (encoder-decoder)", ("proj_out",),
        "model.decoder.layer_norm", inputs="audio", streams=2),
    # patch embedding by a convolution: the stream starts at the first residual add
    "vit": Family(lambda: T.ViTModel(T.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8)), 13, 4, 2, (4, 4, 16), "pre-norm", ("pooler.dense",),
        "layernorm", inputs="image"),
}


def build_family(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    fam = FAMILIES[name]
    m = fam.build()
    for cfg in {id(c): c for c in (getattr(m, "config", None),
                                   getattr(getattr(m, "decoder", None), "config", None))
                if c is not None}.values():
        cfg.use_cache = False
    return _randomize_norms(m), inputs(fam.inputs)


def linear_names(m: torch.nn.Module) -> list[str]:
    """Module paths of the model's linears (GPT-2's Conv1D is one too); MoE expert weights are
    not nn.Linear modules and are counted apart."""
    from transformers.pytorch_utils import Conv1D

    def is_linear(mod: torch.nn.Module) -> bool:
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            return True  # a MoE router is a module of its own that calls F.linear on a 2-D weight
        w = getattr(mod, "weight", None)
        return type(mod).__name__.endswith("Router") and w is not None and w.dim() == 2

    return [n for n, mod in m.named_modules() if is_linear(mod)]
