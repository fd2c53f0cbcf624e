"""Synthetic Llama-architecture Hugging Face directories, written tensor by tensor, and a
block-by-block float32 reference for their logits.

``write_llama(path, SyntheticLlama(...))`` writes random weights straight to safetensors
shards (one tensor chunk in memory at a time: a 1.6B model is written in ~100 MB of RSS),
with a ``config.json``, a ``model.safetensors.index.json`` and SmolLM2's tokenizer files.
``blockwise_logits(path, ids)`` computes the logits one decoder layer at a time (the layer's
weights read with ``safe_open``), so its peak memory is about one layer in float32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MARKER = ".rotaq-synthetic.json"
_DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
           "float32": (torch.float32, "F32")}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_CHUNK = 1 << 22  # elements generated at once (16 MB in float32)


@dataclass(frozen=True)
class SyntheticLlama:
    """Shape and storage of a synthetic Llama (defaults: the ~1.6B model of issue 12)."""

    hidden: int = 2048
    intermediate: int = 8192
    layers: int = 24
    heads: int = 16
    kv_heads: int = 8
    vocab: int = 49152  # SmolLM2's tokenizer
    tie_embeddings: bool = True  # as SmolLM2
    dtype: str = "bfloat16"
    seed: int = 0
    std: float = 0.02  # linear and embedding weights ~ N(0, std)
    norm_noise: float = 0.02  # norm weights ~ 1 + N(0, norm_noise)
    rope_theta: float = 100000.0
    max_positions: int = 8192
    shard_bytes: int = 500 * 2**20

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in file order (Hugging Face Llama names)."""
        h, f, hd = self.hidden, self.intermediate, self.hidden // self.heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (self.heads * hd, h)),
                    (p + "self_attn.k_proj.weight", (self.kv_heads * hd, h)),
                    (p + "self_attn.v_proj.weight", (self.kv_heads * hd, h)),
                    (p + "self_attn.o_proj.weight", (h, self.heads * hd)),
                    (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (f, h)),
                    (p + "mlp.up_proj.weight", (f, h)),
                    (p + "mlp.down_proj.weight", (h, f))]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def num_parameters(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    def nbytes(self, dtype: str | None = None) -> int:
        """Bytes of the weights in ``dtype`` (default: the stored dtype)."""
        return self.num_parameters() * _DTYPES[dtype or self.dtype][0].itemsize

    def config(self) -> dict[str, Any]:
        """The ``config.json`` (SmolLM2's, with this model's sizes)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "hidden_act": "silu", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads, "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions, "initializer_range": self.std,
            "rms_norm_eps": 1e-5, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_embeddings, "use_cache": False,
            "torch_dtype": self.dtype, "dtype": self.dtype,
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _chunks(cfg: SyntheticLlama, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """The tensor's values in row chunks of at most ~_CHUNK elements, in the stored dtype.

    Each tensor has its own generator (seeded by the model seed and the tensor's name), so
    values do not depend on the order or the chunking of the writes."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
    dtype = _DTYPES[cfg.dtype][0]
    if len(shape) == 1:  # a norm weight
        yield (1.0 + cfg.norm_noise * torch.randn(shape, generator=gen)).to(dtype)
        return
    rows = max(1, _CHUNK // shape[1])
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        yield (cfg.std * torch.randn((n, shape[1]), generator=gen)).to(dtype)


def _shards(cfg: SyntheticLlama) -> list[list[tuple[str, tuple[int, ...]]]]:
    item = _DTYPES[cfg.dtype][0].itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in cfg.tensors():
        nb = _numel(shape) * item
        if shards[-1] and size + nb > cfg.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def _write_shard(path: Path, cfg: SyntheticLlama,
                 tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """One safetensors file: the header is computed from the shapes, then each tensor's bytes
    are streamed chunk by chunk (format: u64 header length, JSON header, raw data)."""
    item, tag = _DTYPES[cfg.dtype][0].itemsize, _DTYPES[cfg.dtype][1]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nb = _numel(shape) * item
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in tensors:
            fh.writelines(c.contiguous().view(torch.uint8).numpy().data
                          for c in _chunks(cfg, name, shape))
    return offset


def write_llama(path: str | os.PathLike, cfg: SyntheticLlama | None = None,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write the synthetic model ``cfg`` as a Hugging Face directory at ``path`` and return it.

    Reused as is when ``path`` holds the same configuration (its marker file); otherwise
    written in a temporary sibling folder renamed into place. Tokenizer files are copied from
    ``tokenizer_dir`` (default: the builtin SmolLM2's)."""
    cfg = cfg or SyntheticLlama()
    path = Path(path)
    want = dataclasses.asdict(cfg)
    try:
        if json.loads((path / MARKER).read_text()) == want:
            return path
    except (OSError, ValueError):
        pass
    if tokenizer_dir is None:
        from rotaq.assets import builtin_model_dir

        tokenizer_dir = builtin_model_dir("smollm2-135m")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        shards = _shards(cfg)
        n = len(shards)
        weight_map, total = {}, 0
        for i, tensors in enumerate(shards, 1):
            fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            logger.info("writing %s (%d tensors)", fname, len(tensors))
            total += _write_shard(tmp / fname, cfg, tensors)
            weight_map.update({name: fname for name, _ in tensors})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg.config(), indent=1))
        for fname in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copyfile(src, tmp / fname)
        (tmp / MARKER).write_text(json.dumps(want, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------
# block-by-block reference


class _Weights:
    """Tensors of a safetensors directory by name, each read from a file opened for it alone
    (a memory map held open would keep every page read so far resident)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self._path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self._where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                self._where = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _read(self, name: str, fn: Any) -> Any:
        with self._open(str(self._path / self._where[name]), "pt") as f:
            return fn(f)

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, lambda f: f.get_tensor(name).float())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, lambda f: f.get_slice(name)[start:stop].float())

    def shape(self, name: str) -> list[int]:
        return self._read(name, lambda f: f.get_slice(name).get_shape())


@torch.no_grad()
def blockwise_logits(path: str | os.PathLike, input_ids: Any, vocab_chunk: int = 8192
                     ) -> torch.Tensor:
    """Float32 logits ``[batch, seq, vocab]`` of the Llama directory ``path`` on
    ``input_ids``, computed embedding -> one ``LlamaDecoderLayer`` at a time -> norm -> head
    (the head in vocabulary chunks), so at most one layer's weights are in memory."""
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml

    path = Path(path)
    config = LlamaConfig.from_pretrained(str(path))
    config._attn_implementation = "eager"
    w = _Weights(path)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    emb = "model.embed_tokens.weight"
    x = torch.stack([torch.stack([w.rows(emb, int(t), int(t) + 1)[0] for t in row])
                     for row in ids])
    seq = ids.shape[1]
    pos = torch.arange(seq)[None].expand(ids.shape[0], -1)
    rope = ml.LlamaRotaryEmbedding(config)
    cos_sin = rope(x, pos)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    for i in range(config.num_hidden_layers):
        layer = ml.LlamaDecoderLayer(config, layer_idx=i).float().eval()
        prefix = f"model.layers.{i}."
        layer.load_state_dict({k: w.get(prefix + k) for k in layer.state_dict()}, strict=True)
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        x = out[0] if isinstance(out, tuple) else out
        del layer
    norm = ml.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.copy_(w.get("model.norm.weight"))
    x = norm(x)
    head = "lm_head.weight" if "lm_head.weight" in w else emb
    vocab = w.shape(head)[0]
    parts = [x @ w.rows(head, a, min(a + vocab_chunk, vocab)).T
             for a in range(0, vocab, vocab_chunk)]
    return torch.cat(parts, dim=-1)
