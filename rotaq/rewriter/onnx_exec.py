"""Execution of an :class:`~rotaq.rewriter.onnx.OnnxGraph` with ONNX Runtime (CPU): the
:class:`OnnxExec` mixin (sessions, runs, captures, the fp32 copy of a graph ORT cannot run in
its own dtype, see :mod:`rotaq.rewriter.onnx_dtype`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from rotaq.rewriter import onnx_store
from rotaq.rewriter.onnx_lift import _first_line
from rotaq.rewriter.onnx_run import not_implemented, ort_session

logger = logging.getLogger(__name__)


class OnnxExec:
    """The ONNX Runtime half of :class:`~rotaq.rewriter.onnx.OnnxGraph`."""

    def _session(self, extra: tuple[str, ...] = (), only: bool = False):
        """A session computing the graph outputs plus ``extra`` values; with ``only``, just the
        ``extra`` values (ORT then drops the nodes past them, e.g. the head, when capturing)."""
        if (extra, only) in self._sessions:
            return self._sessions[(extra, only)]
        from rotaq.rewriter import onnx_dtype

        g = self.model.graph
        added = [self._value(name) for name in extra]
        kept = list(g.outputs)
        if only:
            g.outputs.clear()
        n_out = len(g.outputs)
        g.outputs.extend(added)
        try:
            if self._upcast:
                sess = ort_session(onnx_dtype.convert_float(self.model))
            else:
                try:
                    sess = ort_session(self.model)
                except Exception as err:
                    if not not_implemented(err) or not onnx_dtype.has_low(self.model):
                        raise
                    logger.info("ORT has no kernel for this graph in its own dtype (%s): "
                                "running an fp32 copy (weights upcast exactly)", _first_line(err))
                    self._upcast = True
                    sess = ort_session(onnx_dtype.convert_float(self.model))
        finally:
            while len(g.outputs) > n_out:
                g.outputs.pop()
            if only:
                g.outputs.extend(kept)
        self._sessions = {k: s for k, s in self._sessions.items() if k == ((), False)}
        self._sessions[(extra, only)] = sess
        return sess

    def free_sessions(self) -> None:
        """Drop the ORT sessions (their copy of the weights) until the next run."""
        self._sessions = {}
        onnx_store.trim()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model with ONNX Runtime (CPU) and return the graph outputs in order (fp32
        outputs for a graph that runs as its fp32 copy, see :meth:`runs_upcast`)."""
        self._upcast_for(feeds)
        sess = self._session()
        return sess.run(self.output_names, self._feeds(feeds))

    def _upcast_for(self, feeds: dict[str, np.ndarray]) -> None:
        """ORT takes no bfloat16 arrays as inputs: a graph fed bf16 runs as its fp32 copy."""
        if not self._upcast and any(np.asarray(a).dtype.name == "bfloat16"
                                    for a in feeds.values()):
            logger.info("bfloat16 inputs: running an fp32 copy of the graph")
            self._upcast = True
            self._sessions = {}

    def runs_upcast(self, feeds: dict[str, np.ndarray] | None = None) -> bool:
        """Whether ORT runs this graph as an fp32 copy (it has no kernel in the graph's dtype)."""
        self._session()
        return self._upcast

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._upcast:
            return feeds
        from rotaq.rewriter.onnx_dtype import LOW

        low = {v.name for v in self.model.graph.inputs if v.dtype in LOW}
        return {k: np.asarray(a, np.float32) if k in low else a for k, a in feeds.items()}

    def check_unverified(self) -> None:
        """Before a rewrite that will not be run: refuse a node ORT cannot run (custom domain)
        that lies between two matched sites (linear, embedding, norm), where a rewrite would
        change what it reads; one before or after every site sees the original values."""
        from rotaq.rewriter.onnx_run import check_unverified

        check_unverified(self)

    def rounding_noise(self, feeds: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """The fp16/bf16 rounding noise of this graph (see :mod:`rotaq.rewriter.onnx_noise`);
        None for an fp32 graph."""
        from rotaq.rewriter.onnx_noise import rounding_noise

        return rounding_noise(self, feeds)

    def capture(self, feeds: dict[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
        """Values by name: graph inputs from ``feeds``, constants as stored, others computed."""
        result: dict[str, np.ndarray] = {}
        computed: list[str] = []
        for name in dict.fromkeys(values):
            v = self._value(name)
            if name in feeds:
                result[name] = np.asarray(feeds[name])
            elif self._is_const(v):
                arr = self._const(v).numpy()
                result[name] = arr.astype(v.dtype.numpy()) if v.dtype is not None else arr.copy()
            else:
                computed.append(name)
        if not computed:
            return result
        self._upcast_for(feeds)
        outs = self._session(tuple(computed), only=True).run(computed, self._feeds(feeds))
        got = dict(zip(computed, outs))
        for name in values:
            result.setdefault(name, got.get(name))
        return result
