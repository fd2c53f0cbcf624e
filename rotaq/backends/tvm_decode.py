"""Decode with a KV cache on the TVM backend.

A cache graph (``past_key_values.{i}.key/value`` inputs, ``present.*`` outputs) is compiled,
besides its prefill buckets (empty pasts), once per decode context ``C``: one new token over a
past of ``C`` slots, its presents cut to the new token's slot (a ``Slice`` on the sequence
axis, so a step returns ``[.., 1, head_dim]`` instead of the whole cache). At run time
(:class:`TvmCacheRunner`) the cache lives in TVM tensors of ``C`` slots, written in place
through numpy views (no copy per step); slots past the cached length are masked out by the
attention mask (zeros) and positions come from ``position_ids``, so a step over ``P < C``
cached tokens is exact. When ``P`` reaches ``C`` the cache moves to the next context.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from rotaq.errors import RotaqError

log = logging.getLogger(__name__)

# Cache slots per compiled decode step: the step attends over slots + 1 keys, so these are
# multiples of 64 minus one (the attention kernel tiles the keys by 64, 32, 16 or 8 and runs an
# untiled loop otherwise: 2049 keys were 2.7x slower per step than ORT), about 1.5x apart.
DEFAULT_CONTEXTS = (191, 255, 383, 511, 767, 1151, 1535, 2047)
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")
_SEQ_AXIS = 2  # [batch, kv_heads, seq, head_dim]


def is_cache_proto(proto: Any) -> bool:
    return any(_PAST.match(i.name) for i in proto.graph.input)


def slice_presents(proto: Any) -> None:
    """Each ``present.*`` output becomes the last position of its sequence axis."""
    from onnx import helper, numpy_helper

    outs = {o.name for o in proto.graph.output if _PRESENT.match(o.name)}
    consts = {"rotaq_last_start": [-1], "rotaq_last_end": [np.iinfo(np.int64).max],
              "rotaq_last_axis": [_SEQ_AXIS]}
    for name, val in consts.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.array(val, np.int64), name))
    for node in list(proto.graph.node):
        for i, o in enumerate(node.output):
            if o in outs:
                full = f"{o}__full"
                node.output[i] = full
                for reader in proto.graph.node:
                    for j, x in enumerate(reader.input):
                        if x == o:
                            reader.input[j] = full
                proto.graph.node.append(helper.make_node(
                    "Slice", [full, *consts], [o], name=f"rotaq_last_{o}"))
    for o in proto.graph.output:
        if o.name in outs:
            o.type.tensor_type.shape.dim[_SEQ_AXIS].dim_value = 1


def decode_shapes(prefill_one: dict[str, list[int]], ctx: int) -> dict[str, list[int]]:
    """Input shapes of a one-token step over ``ctx`` cached slots, from the 1-token prefill
    shapes: pasts get ``ctx`` slots on the sequence axis, the mask ``ctx + 1`` positions."""
    out = {}
    for name, shape in prefill_one.items():
        shape = list(shape)
        if _PAST.match(name):
            shape[_SEQ_AXIS] = ctx
        elif name == "attention_mask":
            shape[1] = ctx + 1
        out[name] = shape
    return out


class TvmCacheRunner:
    """``prefill(ids)`` then ``run([[token]])`` per step on a compiled cache graph (the
    interface of :class:`rotaq.decoder_io.CacheRunner`)."""

    def __init__(self, graph: Any):
        import tvm

        self.g, self._tvm = graph, tvm
        self.contexts = sorted(graph.decode_vms)
        if not self.contexts:
            raise RotaqError(f"{graph.folder}: no decode contexts were compiled (a cache graph "
                             "compiled with this rotaq has them)")
        self.outputs = list(graph.output_names)
        self.reset()

    def reset(self) -> None:
        self.length, self.ctx = 0, 0
        self.cache: dict[str, Any] = {}
        self.views: dict[str, np.ndarray] = {}

    def _grow(self, need: int) -> None:
        """Move the cache to the smallest context with more than ``need`` slots."""
        fit = [c for c in self.contexts if c > need]
        if not fit:
            raise RotaqError(f"the context is full: {need} tokens cached, the largest compiled "
                             f"decode context is {self.contexts[-1]}")
        ctx, shapes = fit[0], self.g.decode_shapes[fit[0]]
        cache, views = {}, {}
        for name in (n for n in self.g.input_names if _PAST.match(n)):
            t = self._tvm.runtime.empty(shapes[name], "float32", self._tvm.cpu())
            v = np.from_dlpack(t)
            v[...] = 0.0
            if name in self.views:
                v[:, :, : self.length] = self.views[name][:, :, : self.length]
            cache[name], views[name] = t, v
        self.ctx, self.cache, self.views = ctx, cache, views

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Forget the cache, run the prompt on a prefill bucket, keep its keys and values.

        A graph whose per-tensor dynamic activation scales forbid padding (metadata
        ``padding_exact`` false, e.g. ``w4a8-rotated``'s int8 head) runs a prompt of a length
        it was not compiled for as its largest compiled length, then one decode step per
        remaining token (logits of every prompt position returned as usual). Those tokens'
        scales are then each token's own, where ORT's one-call prefill takes one scale over
        the whole prompt: the same quantizer, applied as generation applies it."""
        from rotaq.rewriter.kv_capture import token_feeds

        self.reset()
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        n = ids.shape[1]
        fit = [b for b in self.g.buckets() if b <= n]
        if not self.g.meta.get("padding_exact", True) and n not in self.g.buckets() and fit:
            first = self.prefill(ids[:, : fit[-1]])
            steps = [self.run(ids[:, i : i + 1]) for i in range(fit[-1], n)]
            return np.concatenate([first, *steps], axis=1)
        outs = self.g.run(token_feeds(self.g, ids))
        self._grow(n)
        for name, arr in zip(self.outputs, outs):
            m = _PRESENT.match(name)
            if m:
                self.views[f"past_key_values.{m.group(1)}.{m.group(2)}"][:, :, :n] = \
                    arr[:, :, :n]
        self.length = n
        return outs[0]

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``[1, 1, vocab]`` of one new token after the cached ones."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        if self.length == 0:
            return self.prefill(ids)
        if ids.shape[1] != 1:
            raise RotaqError("the TVM decoder takes one token per step after the prompt")
        if self.length >= self.ctx:
            self._grow(self.length)
        p, c = self.length, self.ctx
        mask = np.zeros((1, c + 1), np.int64)
        mask[0, :p] = 1
        mask[0, c] = 1
        feeds = {"input_ids": ids, "position_ids": np.array([[p]], np.int64),
                 "attention_mask": mask}
        outs = self.g.run_decode(c, feeds, self.cache)
        for name, arr in zip(self.outputs, outs):
            m = _PRESENT.match(name)
            if m:
                self.views[f"past_key_values.{m.group(1)}.{m.group(2)}"][:, :, p] = arr[:, :, 0]
        self.length += 1
        return outs[0]
