"""The names rotaq writes into graphs: node tags on what it emits, and model metadata.

Node tags (ONNX ``metadata_props`` of each node rotaq inserts): :data:`ROLE` says which rewrite
emitted it, so the analysis never matches rotaq's own nodes as a linear and the backends find
them (the TVM lowering of online transforms, :mod:`rotaq.backends.tvm_hadamard`). In FX the same
role is ``node.meta[FX_META]``. Model metadata (``metadata_props`` of the model, ``rotaq.*``):
what a loader needs to run the file again (KV-cache geometry, tokenizer folder). One module, so
a renamed tag cannot silently break a reader.
"""

from __future__ import annotations

from collections.abc import Mapping

# ---- node tags (ONNX) -----------------------------------------------------------------------
ROLE = "rotaq.role"  #: key: which rewrite emitted the node
ROLE_TRANSFORM = "online_transform"  #: an online Hadamard / Kronecker transform
ROLE_QUANT = "quant"  #: a quantize / dequantize / integer-kernel node of a quantized linear
ROLE_CHAIN = "chain"  #: a node of an emitted chain (fake-quant, low-rank branch, ...)
EMITTED_ROLES = (ROLE_TRANSFORM, ROLE_QUANT, ROLE_CHAIN)
QUANT = "rotaq.quant"  #: a human-readable description of the quantizer
QUANT_LINEAR = "rotaq.quant.linear"  #: the key of the quantized linear a node belongs to
QUANT_ACT = "rotaq.quant.act"  #: "<value>|<act>" on the last node of a shareable act quantizer
CHAIN = "rotaq.chain"  #: what an emitted chain does ("<kind> of <linear key>")
ROUND = "rotaq.round"  #: a Cast pair that rounds to a low dtype (emulated fp16/bf16 runs)

# ---- node tags (FX): node.meta[FX_META] -----------------------------------------------------
FX_META = "rotaq"
FX_ONLINE = "online"
FX_QUANT = "quant"
FX_CHAIN = "chain"
FX_EMITTED = (FX_ONLINE, FX_QUANT, FX_CHAIN)

# ---- model metadata -------------------------------------------------------------------------
PREFIX = "rotaq."  #: every model metadata key rotaq writes starts with it
KV_CACHE = "rotaq.kv_cache"  #: "1": a decoder captured with its past/present cache
NUM_LAYERS = "rotaq.num_layers"
KV_HEADS = "rotaq.kv_heads"
HEAD_DIM = "rotaq.head_dim"
TOKENIZER = "rotaq.tokenizer"  #: the tokenizer folder, relative to the model file
FX_METADATA = "rotaq.json"  #: the .pt2 archive entry holding the model metadata


def role(props: Mapping[str, str]) -> str | None:
    """The role tag in a node's metadata (None: not emitted by rotaq)."""
    return props.get(ROLE)


def is_emitted(props: Mapping[str, str]) -> bool:
    """Whether a node with these metadata props was emitted by rotaq."""
    return props.get(ROLE) in EMITTED_ROLES


def is_transform(props: Mapping[str, str]) -> bool:
    """Whether a node is part of an online transform rotaq emitted."""
    return props.get(ROLE) == ROLE_TRANSFORM


def source_fields(metadata: Mapping[str, str]) -> dict[str, str]:
    """Model metadata ``rotaq.X`` as ``{X: value}`` (a model's source record)."""
    return {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}


def cache_metadata(num_layers: int, kv_heads: int, head_dim: int) -> dict[str, str]:
    """Model metadata of a decoder captured with its KV cache."""
    return {KV_CACHE: "1", NUM_LAYERS: str(num_layers), KV_HEADS: str(kv_heads),
            HEAD_DIM: str(head_dim)}
