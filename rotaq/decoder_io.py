"""Inputs and outputs of a decoder graph with a KV cache (the names onnxruntime-genai's model
builder and Optimum use), and a small runner that feeds them.

Inputs: ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq], ``position_ids``
[batch, seq] (optional: the builder's CPU graphs compute them), ``past_key_values.{i}.key`` /
``.value`` [batch, kv_heads, past, head_dim]. Outputs: ``logits`` [batch, seq, vocab] and
``present.{i}.key`` / ``.value`` [batch, kv_heads, past + seq, head_dim]. Only the inputs a graph
declares are fed.

The cache geometry (layers, KV heads, head size) is read, in order, from the graph's metadata
(``rotaq.num_layers``, ``rotaq.kv_heads``, ``rotaq.head_dim``), a ``genai_config.json`` beside
the model, the declared past shapes, and (for a symbolic head size, as the builder writes it)
the ``GroupQueryAttention`` nodes and the projection feeding them.

The contract's names (:func:`contract_name` / :func:`fx_name`: an FX graph spells its pasts
``past_key_values_{i}_key``), the feeds of a full prefill (:func:`token_feeds`,
:func:`complete_feeds`) and the prefill-then-decode run (:func:`prefill_decode`) live here too,
below the IR adapters, the inputs and the loaders that use them (this module imports none of
them); :mod:`rotaq.rewriter.kv_capture` captures a model in this contract.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from rotaq import tags
from rotaq.errors import RotaqError

log = logging.getLogger(__name__)

__all__ = ["CacheRunner", "CacheSpec", "cache_spec", "cache_spec_of_graph", "cache_spec_of_model",
           "complete_feeds", "contract_name", "dynamic_shapes", "fx_name", "has_cache",
           "is_cache_graph", "is_past", "output_names", "prefill_decode", "token_feeds"]

PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ANY_PAST = re.compile(r"^past_key_values[._](\d+)[._](key|value)$")  # contract or FX name
_ONNX_NP = {1: np.float32, 10: np.float16, 11: np.float64, 16: np.float32}  # bf16 fed as fp32


@dataclass(frozen=True)
class CacheSpec:
    """What a caller needs to feed a cache graph."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: Any  # numpy dtype of the past tensors
    inputs: tuple[str, ...]  # the declared input names

    @property
    def has_position_ids(self) -> bool:
        return "position_ids" in self.inputs

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-length pasts for the first step."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        out = {}
        for i in range(self.num_layers):
            out[PAST_KEY.format(i)] = np.zeros(shape, self.dtype)
            out[PAST_VALUE.format(i)] = np.zeros(shape, self.dtype)
        return out

    def feeds(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
              past_len: int = 0) -> dict[str, np.ndarray]:
        """Feeds for ``ids`` [batch, seq] after ``past_len`` cached tokens (empty past when
        ``past`` is None): all-ones mask over past + seq, positions past .. past + seq - 1."""
        ids = np.asarray(ids, np.int64)
        b, s = ids.shape
        have = {"input_ids": ids,
                "attention_mask": np.ones((b, past_len + s), np.int64),
                "position_ids": np.broadcast_to(np.arange(past_len, past_len + s, dtype=np.int64),
                                                (b, s)).copy()}
        have.update(self.empty_past(b) if past is None else past)
        missing = [n for n in self.inputs if n not in have]
        if missing:
            raise RotaqError(f"cannot feed the decoder's inputs {missing}: a cache graph takes "
                             "input_ids, attention_mask, position_ids and past_key_values.*")
        return {n: have[n] for n in self.inputs}


def has_cache(input_names: Any) -> bool:
    """True when the inputs include ``past_key_values.0.key``."""
    return PAST_KEY.format(0) in set(input_names)


# ---- names and feeds (FX placeholders spell the pasts past_key_values_{i}_key) --------
def contract_name(name: str) -> str:
    """``past_key_values_3_key`` -> ``past_key_values.3.key``; other names unchanged."""
    m = _ANY_PAST.match(name)
    return f"past_key_values.{m.group(1)}.{m.group(2)}" if m else name


def fx_name(name: str) -> str:
    """``past_key_values.3.key`` -> ``past_key_values_3_key`` (an FX placeholder name)."""
    m = _ANY_PAST.match(name)
    return f"past_key_values_{m.group(1)}_{m.group(2)}" if m else name


def is_past(name: str) -> bool:
    return bool(_ANY_PAST.match(name))


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{w}" for i in range(num_layers) for w in ("key", "value")]


def is_cache_graph(g: Any) -> bool:
    return any(is_past(n) for n in getattr(g, "input_names", []))


def token_feeds(g: Any, ids: np.ndarray, attention_mask: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """Prefill feeds of a cache graph for tokens ``ids`` [batch, seq]: a full prefill (empty
    pasts), all-ones mask (or the one given), positions 0..seq-1; only inputs ``g`` declares
    (:meth:`CacheSpec.feeds`)."""
    feeds = cache_spec_of_graph(g).feeds(ids)
    if attention_mask is not None and "attention_mask" in feeds:
        feeds["attention_mask"] = np.asarray(attention_mask, np.int64)
    return feeds


def complete_feeds(g: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` plus what a cache graph needs for a prefill that they lack (mask, positions,
    empty pasts); unchanged when the graph has no cache or nothing is missing."""
    if not is_cache_graph(g) or "input_ids" not in feeds:
        return feeds
    full = token_feeds(g, feeds["input_ids"], feeds.get("attention_mask"))
    return {**full, **feeds}


def prefill_decode(g: Any, feeds: dict[str, np.ndarray], steps: int = 2) -> list[np.ndarray]:
    """Outputs of a cache graph on prefill ``feeds`` (empty pasts), computed as a prefill of all
    but the last ``steps`` tokens and then one decode step per token, each fed the presents the
    graph returned: logits over all tokens (concatenated) and the last step's presents. Equal to
    one full prefill for a correct cache graph; a rewrite that changes what the cache stores is
    checked by the logits it gives when it reads its own cache back."""
    ids = feeds["input_ids"]
    s = ids.shape[1]
    past0 = [k for k in g.input_names if is_past(k)]
    if s <= steps or any(feeds[k].shape[2] for k in past0 if k in feeds):
        return g.run(feeds)
    mask = feeds.get("attention_mask", np.ones_like(ids))
    pos = feeds.get("position_ids")
    if pos is None:
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), ids.shape)
    cut = s - steps
    cur = dict(feeds)
    logits = []
    outs: list[np.ndarray] = []
    for a, b in [(0, cut)] + [(t, t + 1) for t in range(cut, s)]:
        cur["input_ids"] = ids[:, a:b]
        if "attention_mask" in cur:
            cur["attention_mask"] = np.ascontiguousarray(mask[:, :b])
        if "position_ids" in cur:
            cur["position_ids"] = np.ascontiguousarray(pos[:, a:b])
        if outs:
            for i, k in enumerate(past0):
                cur[k] = outs[1 + i]
        outs = g.run(cur)
        logits.append(outs[0])
    return [np.concatenate(logits, axis=1), *outs[1:]]




def dynamic_shapes(names: list[str]) -> dict[str, Any]:
    """Batch and lengths dynamic, keyed by FX names: pasts on axes 0 and 2, the rest 0 and 1."""
    from torch.export import Dim

    return {fx_name(k): ({0: Dim.AUTO, 2: Dim.AUTO} if is_past(k) else {0: Dim.AUTO, 1: Dim.AUTO})
            for k in names}


# ---- geometry -------------------------------------------------------------------------------
def _int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") and int(v) > 0 else None
    except (TypeError, ValueError):
        return None


def _genai_geometry(folder: str | None) -> dict[str, int]:
    path = os.path.join(folder, "genai_config.json") if folder else None
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            dec = json.load(f)["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in (("num_layers", _int(dec.get("num_hidden_layers"))),
                              ("kv_heads", _int(dec.get("num_key_value_heads"))),
                              ("head_dim", _int(dec.get("head_size")))) if v}


def _gqa_head_dim(nodes: list[tuple[str, list[str], dict[str, Any]]],
                  shapes: dict[str, tuple[int, ...]], past_key: str) -> int | None:
    """Head size of the GroupQueryAttention that reads ``past_key``: the output width of the
    projection (MatMul with a constant weight, or MatMulNBits) feeding its query input,
    divided by num_heads (+ 2 kv_num_heads when q, k and v come packed)."""
    producer = {o: (op, ins, attrs) for op, ins, attrs in nodes for o in attrs.get("_outputs", [])}
    for op, ins, attrs in nodes:
        if op != "GroupQueryAttention" or past_key not in ins:
            continue
        nh, kv = _int(attrs.get("num_heads")), _int(attrs.get("kv_num_heads"))
        if not nh or not kv:
            return None
        packed = len(ins) < 3 or not ins[1]
        width, name = None, ins[0]
        for _ in range(4):  # through a bias Add / Cast to the projection
            if name not in producer:
                break
            pop, pins, pattrs = producer[name]
            if pop == "MatMulNBits":
                width = _int(pattrs.get("N"))
            elif pop == "MatMul" and len(pins) > 1 and pins[1] in shapes:
                width = shapes[pins[1]][-1]
            if width or pop not in ("Add", "Cast"):
                break
            name = pins[0]
        if width:
            div = nh + 2 * kv if packed else nh
            return width // div if width % div == 0 else None
    return None


def cache_spec(path: str) -> CacheSpec:
    """The cache spec of the ONNX file ``path`` (read without its weights)."""
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:
        raise RotaqError(f"cannot load {path}: not a valid ONNX model: {type(err).__name__}") \
            from err
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    inputs = []
    for v in proto.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in tt.shape.dim)
        inputs.append((v.name, _ONNX_NP.get(tt.elem_type, np.float32), dims))

    def nodes():
        out = []
        for n in proto.graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute
                     if a.type == onnx.AttributeProto.INT}
            attrs["_outputs"] = list(n.output)
            out.append((n.op_type, list(n.input), attrs))
        return out

    meta = {p.key: p.value for p in proto.metadata_props}
    return _spec(inputs, meta, os.path.dirname(os.path.abspath(path)), nodes, inits, path)


def cache_spec_of_model(model: Any) -> CacheSpec:
    """The cache spec of a rotaq :class:`~rotaq.model.Model` (ONNX or FX graph)."""
    return cache_spec_of_graph(model.graph, model.source.get("name", "this model"))


def cache_spec_of_graph(g: Any, label: str = "this model") -> CacheSpec:
    """The cache spec of a rotaq graph (ONNX or FX; FX names its pasts
    ``past_key_values_{i}_key``, read here as the contract's dotted names)."""
    specs = g.input_specs() if hasattr(g, "input_specs") else {}
    inputs = [(contract_name(n), np.float32 if dt == np.dtype("V2") else dt,
               tuple(d if isinstance(d, int) else "" for d in dims))
              for n, (dt, dims) in specs.items()]
    nodes, inits, folder = (list), {}, None
    if hasattr(g, "model"):  # ONNX: the GroupQueryAttention fallback for the head size
        def nodes():
            out = []
            for n in g.model.graph:
                attrs = {k: a.value for k, a in n.attributes.items() if isinstance(a.value, int)}
                attrs["_outputs"] = [o.name for o in n.outputs]
                out.append((n.op_type, [i.name if i is not None else "" for i in n.inputs],
                            attrs))
            return out

        inits = {k: tuple(v.shape) for k, v in g.model.graph.initializers.items()
                 if v.shape is not None}
        folder = os.path.dirname(os.path.abspath(g.source)) if getattr(g, "source", None) else None
    return _spec(inputs, dict(getattr(g, "metadata", {}) or {}), folder, nodes, inits, label)


def _spec(inputs: list[tuple[str, Any, tuple]], meta: dict[str, str], folder: str | None,
          nodes: Any, inits: dict[str, tuple[int, ...]], label: str) -> CacheSpec:
    names = tuple(n for n, _, _ in inputs)
    pasts = {n: (dt, dims) for n, dt, dims in inputs if _PAST_RE.match(n)}
    if not pasts:
        raise RotaqError(f"this graph has no KV cache: {label} takes inputs {list(names)} "
                         "(no past_key_values.{i}.key/value); generation needs a decoder "
                         "exported with its cache")
    layers = sorted({int(_PAST_RE.match(n).group(1)) for n in pasts})
    geo = {"num_layers": _int(meta.get(tags.NUM_LAYERS)),
           "kv_heads": _int(meta.get(tags.KV_HEADS)),
           "head_dim": _int(meta.get(tags.HEAD_DIM))}
    for k, v in _genai_geometry(folder).items():
        geo[k] = geo[k] or v
    dtype, dims = pasts[PAST_KEY.format(0)] if PAST_KEY.format(0) in pasts else \
        next(iter(pasts.values()))
    if len(dims) != 4:
        raise RotaqError(f"{label}: past_key_values inputs must be [batch, kv_heads, past, "
                         f"head_dim], got {list(dims)}")
    geo["num_layers"] = geo["num_layers"] or len(layers)
    if not geo["kv_heads"] and isinstance(dims[1], int) and dims[1] > 0:
        geo["kv_heads"] = dims[1]
    if not geo["head_dim"] and isinstance(dims[3], int) and dims[3] > 0:
        geo["head_dim"] = dims[3]
    if not geo["head_dim"]:
        geo["head_dim"] = _gqa_head_dim(nodes(), inits, PAST_KEY.format(layers[0]))
    missing = [k for k, v in geo.items() if not v]
    if missing:
        raise RotaqError(f"{label}: cannot tell the KV cache's {', '.join(missing)} (symbolic "
                         "in the graph, no rotaq.* metadata, no genai_config.json beside it)")
    want = {PAST_KEY.format(i) for i in range(geo["num_layers"])} | \
        {PAST_VALUE.format(i) for i in range(geo["num_layers"])}
    if want != set(pasts):
        raise RotaqError(f"{label}: past inputs {sorted(pasts)} do not match "
                         f"{geo['num_layers']} layers of past_key_values.{{i}}.key/value")
    return CacheSpec(geo["num_layers"], geo["kv_heads"], geo["head_dim"], np.dtype(dtype), names)


# ---- running --------------------------------------------------------------------------------
class CacheRunner:
    """An ONNX Runtime session over a cache graph: ``prefill`` then ``step``, presents fed back.

    ``past`` holds the last presents (renamed to past inputs) and ``length`` the cached tokens.
    """

    def __init__(self, path: str, threads: int | None = None, optimization: str = "all",
                 session: Any = None) -> None:
        from rotaq.runtime import ort_session

        self.path = path
        self.spec = cache_spec(path)
        try:
            self.session = session or ort_session(path, optimization, threads=threads)
        except Exception as err:
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RotaqError(f"ONNX Runtime cannot load {path}: {type(err).__name__}: "
                             f"{msg[:300]}") from err
        outs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outs:
            raise RotaqError(f"{path}: the graph has no 'logits' output (outputs {outs[:6]})")
        n = self.spec.num_layers
        self.present = {PRESENT_KEY.format(i): PAST_KEY.format(i) for i in range(n)}
        self.present.update({PRESENT_VALUE.format(i): PAST_VALUE.format(i) for i in range(n)})
        missing = [p for p in self.present if p not in outs]
        if missing:
            raise RotaqError(f"{path}: cache outputs {missing[:4]} are missing")
        self.outputs = ["logits", *self.present]
        self.reset()

    def reset(self) -> None:
        self.past: dict[str, np.ndarray] | None = None
        self.length = 0

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] for ``ids`` after the cached tokens; the cache grows."""
        ids = np.asarray(ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        res = self.session.run(self.outputs, self.spec.feeds(ids, self.past, self.length))
        self.past = {self.present[name]: arr for name, arr in zip(self.outputs[1:], res[1:])}
        self.length += ids.shape[1]
        return res[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Forget the cache, then run ``ids`` (the prompt) from an empty past."""
        self.reset()
        return self.run(ids)
