"""IR-neutral views of a captured graph.

Each adapter (``fx.py``, ``onnx.py``) lifts its IR into a :class:`GraphView`: a topologically
ordered list of :class:`GNode` with *normalized* op names, the set of constant values and the
static shapes it knows. The structural analysis (``analysis.py``) runs on that view only, so a
match rule is written once for both IRs. Passes receive sites (``LinearSite``, ``NormSite``,
``AttentionSite``, ``ResidualStream``) and edit weights through the :class:`GraphAdapter`
protocol; they never see FX nodes or ONNX protos.

Normalized op vocabulary (``GNode.op``):

- ``linear``: y = x W^T (+ b); inputs ``[x]``; params ``in_features``, ``out_features``,
  ``has_bias``, ``weight_shared`` (the weight tensor is read by another node too).
- ``embedding``: y = E[ids]; inputs ``[ids]``; params ``num_embeddings``, ``dim``,
  ``weight_shared``.
- ``layer_norm`` / ``rms_norm``: fused norm ops; inputs ``[x, weight|'', bias|'']`` (weight and
  bias are constant value ids or ``''``); params ``dim``, ``eps``.
- ``sdpa``: fused attention; inputs ``[q, k, v, mask|'']``; params may carry ``num_heads``,
  ``num_kv_heads`` when the op states them (ONNX Attention with 3-D inputs).
- elementwise: ``add sub mul div pow sqrt rsqrt reciprocal neg``; ``mean`` (reduce mean,
  attrs ``axes``); ``matmul`` (a matmul that is not a linear); ``softmax``;
  ``transpose reshape cast identity slice concat expand``; anything else is ``other`` with
  params ``target`` naming the original op.
- emitted by rotaq (never matched as layers): ``online`` (online transforms), ``quant``
  (quantized linears, fake quantizers), ``chain`` (structured replacements of linears,
  see ``chain.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class GNode:
    key: str
    op: str
    inputs: list[str]
    outputs: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    scope: str = ""  # module path, for reports only


@dataclass
class GraphView:
    nodes: list[GNode]
    consts: set[str]
    shapes: dict[str, tuple[int, ...] | None]
    inputs: list[str]
    outputs: list[str]

    def __post_init__(self) -> None:
        self.by_key = {n.key: n for n in self.nodes}
        self.producer: dict[str, GNode] = {}
        self.consumers: dict[str, list[GNode]] = {}
        for n in self.nodes:
            for o in n.outputs:
                self.producer[o] = n
            for i in n.inputs:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def is_const(self, value: str) -> bool:
        return value in self.consts

    def shape(self, value: str) -> tuple[int, ...] | None:
        return self.shapes.get(value)


@dataclass(frozen=True)
class Kronecker:
    """Online transform x -> x @ (F_0 (x) F_1 (x) ...) on the last axis.

    One factor is a plain matmul (a per-head rotation); two factors are emitted as
    Reshape + two small MatMuls, never as the dense product.
    """

    factors: tuple[np.ndarray, ...]
    scale: np.ndarray | None = None  # x -> (x * scale) @ kron(...): a per-channel scale first

    @property
    def size(self) -> int:
        return int(np.prod([f.shape[0] for f in self.factors]))

    def dense(self) -> np.ndarray:
        out = np.ones((1, 1))
        for f in self.factors:
            out = np.kron(out, f)
        return out if self.scale is None else np.asarray(self.scale)[:, None] * out


@dataclass(frozen=True)
class ActQuant:
    """Activation quantizer on a linear's input (or a K/V tensor).

    ``mode="dynamic"``: scales computed at run time, one per token (row) in simulation; ORT's
    int8 kernels use one dynamic scale per tensor. ``mode="static"``: one calibrated
    ``scale``/``zero_point`` per tensor. ``bits`` 8 or 4 (4 is simulated / QDQ only).
    """

    bits: int = 8
    mode: str = "dynamic"
    symmetric: bool = True
    scale: float | None = None
    zero_point: int | None = None
    clip_ratio: float = 1.0


@dataclass
class LinearSite:
    key: str
    name: str
    in_features: int
    out_features: int
    input: str
    output: str
    has_bias: bool
    weight_shared: bool = False


@dataclass
class ExpertsSite:
    """MoE experts stored as one grouped weight [experts, out, in] (one matmul per expert)."""

    key: str
    name: str
    num_experts: int
    in_features: int
    out_features: int
    input: str
    output: str


@dataclass
class EmbeddingSite:
    key: str
    name: str
    num_embeddings: int
    dim: int
    output: str


@dataclass
class NormSite:
    """A LayerNorm / RMSNorm. ``scale`` and ``bias`` name (node key, view input index)."""

    key: str
    name: str
    kind: str  # "rms" | "layer"
    dim: int
    input: str
    output: str
    scale: tuple[str, int] | None
    bias: tuple[str, int] | None
    fused: bool
    scale_offset: float = 0.0  # effective scale = scale constant + offset (Gemma: 1 + w)


@dataclass
class AttentionSite:
    key: str
    name: str
    kind: str  # "sdpa" | "explicit" | "onnx-attention"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_proj: str | None
    k_proj: str | None
    v_proj: str | None
    o_proj: str | None
    q_value: str  # query entering the score matmul (after positional embedding), [.., hd] last
    k_value: str  # key with head_dim last ('' if only K^T was found)
    q_consumer: str = ""  # the node reading q_value (where an online Q rotation is wired)
    k_consumer: str = ""
    v_value: str = ""  # V as the attention reads it (head_dim last)
    v_consumer: str = ""


@dataclass
class Block:
    norm: str | None  # norm key feeding the readers (pre-norm) or None
    readers: list[str]  # linear keys that read the (normalized) stream
    writers: list[str]  # linear keys whose outputs are added into the stream
    add: str  # key of the residual add
    norms: list[str] = field(default_factory=list)  # every norm reading the stream (norm first)
    branch_norms: list[str] = field(default_factory=list)  # norms on the sublayer's output

    @property
    def parallel(self) -> bool:
        """Several sublayers (attention and MLP) read the same stream value and add together."""
        return len(self.writers) > 1


@dataclass
class ResidualStream:
    pre_norm: bool
    embedding: str | None
    final_norm: str | None
    head: list[str]
    blocks: list[Block]
    post_norms: list[str] = field(default_factory=list)  # norms applied after residual adds
    streams: int = 1  # 2 for encoder-decoders (their blocks are listed encoder first)

    @property
    def structure(self) -> str:
        """pre-norm | post-norm | sandwich | post-sublayer | none, with ', parallel' when the
        sublayers of a block run side by side."""
        if not self.blocks:
            return "none"
        if any(b.branch_norms for b in self.blocks):
            kind = "sandwich" if all(b.norm for b in self.blocks) else "post-sublayer"
        elif self.post_norms:
            kind = "post-norm"
        elif all(b.norm for b in self.blocks):
            kind = "pre-norm"
        else:
            kind = "mixed"
        if any(b.parallel for b in self.blocks):
            kind += ", parallel"
        return kind + (f", {self.streams} streams (encoder-decoder)" if self.streams > 1 else "")


class GraphAdapter(Protocol):
    """What a pass may ask of an IR. All arrays are float64 numpy; setters never mutate a tensor
    read elsewhere (a shared weight is untied: this consumer gets a fresh constant)."""

    ir: str

    def view(self) -> GraphView: ...

    def get_const(self, value: str) -> np.ndarray: ...

    def set_const(self, node: str, index: int, array: np.ndarray) -> None: ...

    def get_linear(self, key: str) -> tuple[np.ndarray, np.ndarray | None]: ...

    def set_linear(self, key: str, weight: np.ndarray, bias: np.ndarray | None) -> None: ...

    def get_embedding(self, key: str) -> np.ndarray: ...

    def set_embedding(self, key: str, table: np.ndarray) -> None: ...

    def insert_transform(
        self, value: str, consumers: Sequence[str], transform: Kronecker
    ) -> str: ...

    def quantize_linear(self, key: str, qweight: Any, act: ActQuant | None,
                        lowering: str = "auto") -> None: ...

    def insert_fake_quant(self, value: str, consumers: Sequence[str], act: ActQuant) -> str: ...

    def replace_linear(self, key: str, chain: Any) -> str: ...  # rewriter.chain.Chain

    def add_branch(self, key: str, chain: Any) -> str: ...

    def insert_chain(self, value: str, consumers: Sequence[str], chain: Any,
                     role: str = "chain") -> str: ...

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def capture(self, feeds: dict[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]: ...

    def clone(self) -> GraphAdapter: ...

    def save(self, path: str) -> None: ...
