"""Capture of a decoder-only causal LM with its KV cache as explicit inputs and outputs.

The graph follows the contract of onnxruntime-genai's model builder and Optimum: inputs
``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq], ``position_ids`` [batch, seq],
``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_dim]; outputs ``logits``
[batch, seq, vocab] then ``present.{i}.key`` / ``.value`` [batch, kv_heads, past+seq, head_dim].
FX placeholder names cannot hold dots: the FX graph names the pasts ``past_key_values_{i}_key``
and :func:`contract_name` / :func:`fx_name` translate; the ONNX file uses the contract names.

The attention mask is built here, not by transformers: a 4-D float mask [batch, 1, seq,
past+seq] (0 where a query may attend, the dtype's minimum elsewhere) from the causal order and
the 2-D padding mask, which transformers passes through as is. This keeps the mask a few plain
ops whose shapes stay symbolic in past and seq (and an all-padding row gives a uniform softmax,
never NaN).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from rotaq import tags

log = logging.getLogger(__name__)
_PAST = re.compile(r"^past_key_values[._](\d+)[._](key|value)$")
_PRESENT = re.compile(r"^present[._](\d+)[._](key|value)$")
TOKEN_INPUTS = ("input_ids", "attention_mask")
META_FLAG = tags.KV_CACHE


def contract_name(name: str) -> str:
    """``past_key_values_3_key`` -> ``past_key_values.3.key``; other names unchanged."""
    m = _PAST.match(name)
    return f"past_key_values.{m.group(1)}.{m.group(2)}" if m else name


def fx_name(name: str) -> str:
    """``past_key_values.3.key`` -> ``past_key_values_3_key`` (an FX placeholder name)."""
    m = _PAST.match(name)
    return f"past_key_values_{m.group(1)}_{m.group(2)}" if m else name


def is_past(name: str) -> bool:
    return bool(_PAST.match(name))


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{w}" for i in range(num_layers) for w in ("key", "value")]


def is_cache_graph(g: Any) -> bool:
    return any(is_past(n) for n in getattr(g, "input_names", []))


def metadata(num_layers: int, kv_heads: int, head_dim: int) -> dict[str, str]:
    return tags.cache_metadata(num_layers, kv_heads, head_dim)


def token_feeds(g: Any, ids: np.ndarray, attention_mask: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """Prefill feeds of a cache graph for tokens ``ids`` [batch, seq]: a full prefill (empty
    pasts), all-ones mask (or the one given), positions 0..seq-1; only inputs ``g`` declares
    (:meth:`rotaq.decoder_io.CacheSpec.feeds`)."""
    from rotaq.decoder_io import cache_spec_of_graph

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


# ---- capture ---------------------------------------------------------------------------------
def cache_layout(module: Any, inputs: dict[str, Any]) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) when ``module`` is a decoder-only causal LM fed tokens only
    whose transformers cache is a plain DynamicCache (no sliding-window or linear-attention
    layers); None otherwise (captured without a cache)."""
    import inspect

    import torch

    cfg = getattr(module, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or not set(inputs) <= set(
            TOKEN_INPUTS) or "input_ids" not in inputs:
        return None
    from rotaq.assets import KIND_CAUSAL_LM, _detect_kind

    cls = type(module).__name__
    if not ("CausalLM" in cls or "LMHeadModel" in cls) and _detect_kind(cfg) != KIND_CAUSAL_LM:
        return None
    params = inspect.signature(module.forward).parameters
    if "position_ids" not in params or _cache_arg(module) is None:
        return None
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    ids = torch.as_tensor(inputs["input_ids"])[:1, :2]
    try:
        with torch.no_grad():
            out = module(input_ids=ids, use_cache=True)
    except Exception as err:  # noqa: BLE001 - a model that cannot run with a cache has none
        log.info("no KV cache capture: the model fails with use_cache=True (%s)", err)
        return None
    cache = _returned_cache(out)
    if type(cache) is not DynamicCache or not cache.layers or any(
            type(layer) is not DynamicLayer for layer in cache.layers):
        log.info("no KV cache capture: %s is not a plain DynamicCache",
                 type(cache).__name__)
        return None
    shapes = {tuple(t.shape[1:]) for layer in cache.layers for t in (layer.keys, layer.values)}
    if len(shapes) != 1:
        return None
    kvh, _, hd = next(iter(shapes))
    return len(cache.layers), int(kvh), int(hd)


def _cache_arg(module: Any) -> str | None:
    """The forward argument that takes the cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return next((p for p in ("cache", "past_key_values") if p in params), None)


def _returned_cache(out: Any) -> Any:
    for attr in ("cache", "past_key_values"):
        c = getattr(out, attr, None)
        if c is not None:
            return c
    return None


class _CacheLM:
    """Mixin body of the wrapper; :func:`wrapper` adds a ``forward`` with one named argument per
    past tensor (torch.export names placeholders after them)."""

    def _setup(self, lm: Any, num_layers: int) -> None:
        object.__setattr__(self, "_lm", lm)  # not registered: its children are, by their names
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.num_layers = num_layers

    def _run(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list) -> tuple:
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache()
        cache.layers = []
        for i in range(self.num_layers):
            layer = _FullLayer() if _FullLayer is not None else DynamicLayer()
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            cache.layers.append(layer)
        dtype = past[0].dtype
        s, t = input_ids.shape[1], attention_mask.shape[1]
        q_pos = torch.arange(s, device=input_ids.device) + (t - s)
        k_pos = torch.arange(t, device=input_ids.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & \
            attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed,
                                                                   torch.finfo(dtype).min)
        out = self._lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=True, **{_cache_arg(self._lm): cache})
        flat = []
        for layer in _returned_cache(out).layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _full_layer_class() -> Any:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class FullLayer(DynamicLayer):
        """A DynamicLayer whose length is its keys' length axis (no ``numel() == 0`` test,
        which would specialize the export on a non-empty past)."""

        def get_seq_length(self) -> int:
            return self.keys.shape[-2] if self.is_initialized else 0

    return FullLayer


_FullLayer = _full_layer_class()


def wrapper(lm: Any, num_layers: int) -> Any:
    """An nn.Module: ``forward(input_ids, attention_mask, position_ids, past_key_values_0_key,
    ...) -> (logits, present_0_key, ...)`` around the causal LM ``lm``."""
    import torch

    names = [f"past_key_values_{i}_{w}" for i in range(num_layers) for w in ("key", "value")]
    src = (f"def forward(self, input_ids, attention_mask, position_ids, {', '.join(names)}):\n"
           f"    return self._run(input_ids, attention_mask, position_ids, [{', '.join(names)}])\n")
    ns: dict[str, Any] = {}
    exec(compile(src, "<rotaq.kv_capture>", "exec"), ns)  # noqa: S102 - our own fixed source
    cls = type("CausalLMWithCache", (_CacheLM, torch.nn.Module), {"forward": ns["forward"]})
    mod = cls()
    mod._setup(lm, num_layers)
    return mod.eval()


def example_inputs(num_layers: int, kv_heads: int, head_dim: int, vocab: int, dtype: Any,
                   batch: int = 2, seq: int = 3, past: int = 4, ids: Any = None
                   ) -> dict[str, Any]:
    """Capture inputs with batch, seq and past all >= 2 (so none specializes), contract names;
    ``ids`` (the caller's tokens, >= 2 of them) as ``input_ids``, on two rows at least."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    if ids is not None and ids.dim() == 2 and ids.shape[1] >= 2:
        tokens = ids if ids.shape[0] >= 2 else torch.cat([ids, ids])
        batch, seq = tokens.shape
    ex = {"input_ids": tokens,
          "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
          "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous()}
    for i in range(num_layers):
        for w in ("key", "value"):
            ex[f"past_key_values.{i}.{w}"] = torch.randn(batch, kv_heads, past, head_dim,
                                                         generator=g).to(dtype)
    return ex


def dynamic_shapes(names: list[str]) -> dict[str, Any]:
    """Batch and lengths dynamic, keyed by FX names: pasts on axes 0 and 2, the rest 0 and 1."""
    from torch.export import Dim

    return {fx_name(k): ({0: Dim.AUTO, 2: Dim.AUTO} if is_past(k) else {0: Dim.AUTO, 1: Dim.AUTO})
            for k in names}


def capture(lm: Any, dims: tuple[int, int, int], ids: Any = None) -> Any:
    """``lm`` captured with torch.export as a cache graph (an FxGraph with cache metadata)."""
    import torch

    from rotaq.rewriter.fx import FxGraph

    num_layers, kvh, hd = dims
    dtype = next(lm.parameters()).dtype
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    vocab = int(emb.weight.shape[0]) if emb is not None else 2
    mod = wrapper(lm, num_layers)
    ex = example_inputs(num_layers, kvh, hd, min(vocab, 1000), dtype, ids=ids)
    dyn = dynamic_shapes(list(ex))
    with torch.no_grad():
        ep = torch.export.export(mod, (), {fx_name(k): v for k, v in ex.items()},
                                 dynamic_shapes=dyn, strict=False)
    g = FxGraph.from_exported(ep, ex, dyn)
    g.metadata.update(metadata(num_layers, kvh, hd))
    return g
