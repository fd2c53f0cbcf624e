"""A tiny random-weight Llama saved as a Hugging Face model directory, for trying the examples.

The examples take a model argument (a built-in name such as ``smollm2-135m``, a ``.onnx`` or
``.pt2`` file, or a Hugging Face model directory); without one they build this model, which
runs in seconds and needs no download: a 2-layer Llama (width 64, 4 heads, 2 KV heads) with
random weights and a small word-piece tokenizer trained on a few sentences.

    python examples/tiny_model.py /tmp/tiny-llama      # writes the directory and prints it
"""

from __future__ import annotations

import os
import sys
import tempfile

_TEXT = [
    "The quick brown fox jumps over the lazy dog. A man is eating food.",
    "Rotations spread outliers across channels so that quantization loses less.",
    "The model reads text, one token at a time, and predicts the next one.",
    "Hadamard matrices are orthogonal, and their entries are plus or minus one.",
    "Residual streams carry the hidden state from one block to the next.",
]


def make_tiny_llama(folder: str | None = None, vocab: int = 256) -> str:
    """Write a tiny random Llama (config, safetensors weights, tokenizer) to ``folder``
    (default: a fresh temporary directory) and return the directory."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    folder = folder or tempfile.mkdtemp(prefix="rotaq-tiny-llama-")
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_TEXT, trainers.WordPieceTrainer(
        vocab_size=vocab, special_tokens=["[UNK]", "<s>", "</s>"]))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                     eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                        use_cache=False)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm scales away from 1, so folding them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(make_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else None))
