"""Feeds for decoder graphs with a KV cache (issue 15's I/O contract), wherever they were made.

Inputs ``past_key_values.{i}.key`` / ``.value`` are ``[batch, kv_heads, past, head_dim]``;
``attention_mask`` is ``[batch, past + seq]``; ``position_ids`` ``[batch, seq]`` when declared.
Sample inputs start from an empty cache (past = 0). KV heads and head size come from the input's
static dims, else from the ``rotaq.kv_heads`` / ``rotaq.head_dim`` metadata, else from the
attention op that reads the past (onnxruntime-genai's builder writes ``kv_cache_dim`` as a
symbolic dim; its ``GroupQueryAttention`` states the heads).

Outputs ``present.*`` are the cache the model writes; a rotation may change what it holds (V
rotated per head, keys after ``rotate_qk``) while the logits stay exact, so verification compares
the other outputs (:func:`verified_outputs`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def _dims_from_view(g: Any, name: str) -> tuple[int | None, int | None]:
    view = g.view() if hasattr(g, "view") else None
    for c in (view.consumers.get(name, []) if view is not None else []):
        if c.op == "gqa":
            return c.params.get("num_kv_heads") or None, c.params.get("head_dim") or None
    return None, None


def past_shapes(g: Any, specs: dict[str, tuple[Any, list]]) -> dict[str, tuple[int, int]]:
    """Past input name -> (kv_heads, head_dim); raises ValueError when neither is known."""
    meta = getattr(g, "metadata", {}) or {}
    out = {}
    for name, (_, dims) in specs.items():
        if not PAST.match(name):
            continue
        kv = dims[1] if len(dims) == 4 and isinstance(dims[1], int) and dims[1] > 0 else None
        hd = dims[3] if len(dims) == 4 and isinstance(dims[3], int) and dims[3] > 0 else None
        kv = kv or (int(meta["rotaq.kv_heads"]) if "rotaq.kv_heads" in meta else None)
        hd = hd or (int(meta["rotaq.head_dim"]) if "rotaq.head_dim" in meta else None)
        if kv is None or hd is None:
            vkv, vhd = _dims_from_view(g, name)
            kv, hd = kv or vkv, hd or vhd
        if not kv or not hd:
            raise ValueError(f"cannot tell the KV heads / head size of input {name!r}")
        out[name] = (int(kv), int(hd))
    return out


def complete(g: Any, feeds: dict[str, np.ndarray], specs: dict[str, tuple[Any, list]]
             ) -> dict[str, np.ndarray]:
    """``feeds`` with an empty cache: past inputs ``[batch, kv, 0, hd]``, the attention mask all
    ones over the sequence, ``position_ids`` 0..seq-1; other inputs as given."""
    pasts = past_shapes(g, specs)
    if not pasts or "input_ids" not in feeds:
        return feeds
    ids = feeds["input_ids"]
    batch, seq = ids.shape[0], ids.shape[1]
    out = dict(feeds)
    for name, (kv, hd) in pasts.items():
        dtype = specs[name][0]
        out[name] = np.zeros((batch, kv, 0, hd), dtype=dtype)
    if "attention_mask" in specs:
        out["attention_mask"] = np.ones((batch, seq), dtype=specs["attention_mask"][0])
    if "position_ids" in specs:
        pos = np.arange(seq, dtype=specs["position_ids"][0])
        out["position_ids"] = np.broadcast_to(pos, (batch, seq)).copy()
    return out


def verified_outputs(names: list[str]) -> list[int]:
    """Indices of the outputs a rewrite must keep (all but the ``present.*`` cache outputs)."""
    keep = [i for i, n in enumerate(names) if not PRESENT.match(n)]
    return keep or list(range(len(names)))
