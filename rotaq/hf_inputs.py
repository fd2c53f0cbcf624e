"""Sample inputs for a Hugging Face model loaded from a directory or a GGUF file.

Token inputs are real text (:func:`rotaq.assets.sample_inputs`) when the model has a tokenizer,
else ids drawn from the config's vocabulary. Models whose main input is not text get a seeded
standard-normal tensor of the shape the config fixes: ``input_features`` ``[1, mel bins,
2 * max_source_positions]`` (Whisper), ``pixel_values`` ``[1, channels, size, size]`` (ViT),
``input_values`` ``[1, 16000]`` (wav2vec2). Encoder-decoders (``kind == "seq2seq"``) are
captured as one graph with the decoder inputs too: ``decoder_input_ids`` is the decoder start
token followed by the encoder's tokens (teacher forcing), or random ids when the encoder reads
audio and there is no tokenizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rotaq import assets
from rotaq.errors import LoadError

_SEED = 0


def family(model: Any) -> str:
    """The model's family as Hugging Face names it (``t5``, ``whisper``, ...)."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def main_input(model: Any) -> str:
    return str(getattr(model, "main_input_name", None) or "input_ids")


def model_inputs(model: Any, tokenizer: Any, kind: str, seq_len: int = 32
                 ) -> dict[str, np.ndarray]:
    """Batch-1 sample inputs (numpy) for ``model(**inputs)``; see the module doc."""
    cfg = model.config
    rng = np.random.default_rng(_SEED)
    main = main_input(model)
    enc_kind = assets.KIND_ENCODER if kind == assets.KIND_SEQ2SEQ else kind
    if main == "input_ids":
        if tokenizer is not None:
            feeds = assets.sample_inputs(tokenizer, enc_kind, seq_len=seq_len)
        else:
            ids = rng.integers(0, _vocab(cfg), size=(1, seq_len), dtype=np.int64)
            feeds = {"input_ids": ids}
            if enc_kind == assets.KIND_ENCODER:
                feeds["attention_mask"] = np.ones_like(ids)
    else:
        feeds = {main: _float_input(model, main, rng)}
    if kind == assets.KIND_SEQ2SEQ:
        feeds["decoder_input_ids"] = _decoder_ids(cfg, tokenizer, feeds.get("input_ids"),
                                                  seq_len, rng)
    return feeds


def _vocab(cfg: Any) -> int:
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        raise LoadError(f"{cfg.model_type}: the config has no vocab_size to draw sample token "
                        "ids from, and the directory has no tokenizer")
    return int(vocab)


def _decoder_ids(cfg: Any, tokenizer: Any, enc_ids: np.ndarray | None, seq_len: int,
                 rng: np.random.Generator) -> np.ndarray:
    limit = getattr(cfg, "max_target_positions", None) or getattr(
        cfg, "max_position_embeddings", None)
    n = min(seq_len, int(limit)) if limit else seq_len
    start = getattr(cfg, "decoder_start_token_id", None)
    start = int(start) if start is not None else 0
    if enc_ids is not None and enc_ids.shape[1] >= n - 1:
        body = enc_ids[0, : n - 1]
    elif tokenizer is not None:
        body = np.asarray(assets.token_windows(tokenizer, "lee", n - 1, n - 1)[0])
    else:
        body = rng.integers(0, _vocab(cfg), size=n - 1)
    return np.asarray([[start, *body.tolist()]], dtype=np.int64)


def _float_input(model: Any, name: str, rng: np.random.Generator) -> np.ndarray:
    cfg = model.config
    shape: tuple[int, ...] | None = None
    if name == "input_features" and hasattr(cfg, "num_mel_bins") and hasattr(
            cfg, "max_source_positions"):
        shape = (1, int(cfg.num_mel_bins), 2 * int(cfg.max_source_positions))
    elif name == "pixel_values" and hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (
            cfg.image_size, cfg.image_size)
        shape = (1, int(getattr(cfg, "num_channels", 3)), *map(int, size))
    elif name == "input_values":
        shape = (1, 16000)
    if shape is None:
        raise LoadError(f"{family(model)}: cannot build a sample '{name}' input from its config; "
                        "give rotaq the model as a torch module with example inputs")
    return rng.standard_normal(shape).astype(np.float32)
