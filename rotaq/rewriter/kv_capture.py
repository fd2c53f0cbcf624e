"""Capture of a decoder-only causal LM with its KV cache as explicit inputs and outputs.

The graph follows the contract of onnxruntime-genai's model builder and Optimum: inputs
``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq], ``position_ids`` [batch, seq],
``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_dim]; outputs ``logits``
[batch, seq, vocab] then ``present.{i}.key`` / ``.value`` [batch, kv_heads, past+seq, head_dim].
FX placeholder names cannot hold dots: the FX graph names the pasts ``past_key_values_{i}_key``
and :func:`~rotaq.decoder_io.contract_name` / :func:`~rotaq.decoder_io.fx_name` translate; the
ONNX file uses the contract names. The contract's names and feeds live in :mod:`rotaq.decoder_io`
(re-exported here).

The attention mask is built here, not by transformers: a 4-D float mask [batch, 1, seq,
past+seq] (0 where a query may attend, the dtype's minimum elsewhere) from the causal order and
the 2-D padding mask, which transformers passes through as is. This keeps the mask a few plain
ops whose shapes stay symbolic in past and seq (and an all-padding row gives a uniform softmax,
never NaN).
"""

from __future__ import annotations

import logging
from typing import Any

from rotaq import tags
from rotaq.decoder_io import (  # noqa: F401 (re-exported: the cache contract's names and feeds)
    complete_feeds,
    contract_name,
    dynamic_shapes,
    fx_name,
    is_cache_graph,
    is_past,
    output_names,
    prefill_decode,
    token_feeds,
)

log = logging.getLogger(__name__)
TOKEN_INPUTS = ("input_ids", "attention_mask")
META_FLAG = tags.KV_CACHE


def metadata(num_layers: int, kv_heads: int, head_dim: int) -> dict[str, str]:
    return tags.cache_metadata(num_layers, kv_heads, head_dim)


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
