"""Block-wise execution: a model's graph cut at its residual-stream boundaries, run segment by
segment over given feeds.

The analysis finds the residual stream; :func:`segments` cuts the graph (in topological order)
after the embedding (the *prelude*: embedding, mask, rotary tables...), after each residual add
(one segment per residual block, i.e. per sublayer) and leaves the rest as the *tail* (final
norm, head). :class:`BlockRunner` runs the segments in order: each segment's external inputs
(graph inputs and values produced by earlier segments: the residual, the mask, cos/sin tables)
live in a store, a value is dropped once no later segment reads it, so memory holds one
segment's activations plus the shared small values; with ``spill`` stored arrays go to ``.npy``
files in a temporary folder. A hook per segment may capture values of the segment
(:meth:`SegmentRun.capture`), rewrite the segment through the graph adapter and return True:
the segment is then run again, so the next segment reads the outputs of the rewritten one.

The feeds are run in chunks of ``batch`` rows (each chunk is an independent run of the graph);
captured values are concatenated over the chunks on their first axis, like ``capture`` does.
Per-IR execution: :mod:`rotaq.rewriter.onnx_blocks` (a small ORT session per segment holding
only that segment's initializers, rebuilt when the segment changed) and
:mod:`rotaq.rewriter.fx_blocks` (the segment's FX nodes run by a torch Interpreter).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from rotaq.decoder_io import complete_feeds
from rotaq.inputs import chunks
from rotaq.rewriter.analysis import Analysis, analyze
from rotaq.rewriter.sites import Block

log = logging.getLogger(__name__)

_SPILL_BYTES = 1 << 16  # arrays smaller than this stay in memory when spilling


@dataclass
class Segment:
    """A contiguous range of the graph, ending at the node that produces ``end``."""

    index: int
    kind: str  # prelude | block | tail
    end: str  # the boundary value (a residual add's output, the embedding); '' for the tail
    blocks: list[Block] = field(default_factory=list)  # residual blocks closed by this segment
    linears: list[str] = field(default_factory=list)  # view keys of the linears inside, in order


def segments(graph: Any, analysis: Analysis | None = None) -> list[Segment]:
    """The graph cut at the residual-stream boundaries: a prelude (up to the embedding), one
    segment per residual block (up to its add), and a tail. Segments are in graph order."""
    view = graph.view()
    a = analysis or analyze(view)
    pos = {n.key: i for i, n in enumerate(view.nodes)}
    ends: list[tuple[int, str, str, Block | None]] = []
    r = a.residual
    if r.embedding and r.embedding in pos and view.by_key[r.embedding].outputs:
        ends.append((pos[r.embedding], "prelude", view.by_key[r.embedding].outputs[0], None))
    for b in r.blocks:
        if b.add in pos and view.by_key[b.add].outputs:
            ends.append((pos[b.add], "block", view.by_key[b.add].outputs[0], b))
    ends.sort(key=lambda e: e[0])
    out: list[Segment] = []
    for p, kind, value, b in ends:
        if out and out[-1].end == value:
            if b is not None:
                out[-1].blocks.append(b)
            continue
        out.append(Segment(len(out), kind, value, [b] if b is not None else []))
    out.append(Segment(len(out), "tail", ""))
    bounds = [pos[view.producer[s.end].key] for s in out[:-1]]
    for n in view.nodes:
        if n.op == "linear":
            k = next((i for i, e in enumerate(bounds) if pos[n.key] <= e), len(bounds))
            out[k].linears.append(n.key)
    return out


def blockwise_bytes() -> int:
    """ONNX models whose weights exceed this many bytes (``ROTAQ_BLOCKWISE_GIB``, default
    0.125) run block by block (:func:`rotaq.rewriter.blocks.run_blockwise`): one block's
    weights in an ORT session at a time (mapped from disk when stored there), instead of one
    session holding a copy of the whole model."""
    return int(float(os.environ.get("ROTAQ_BLOCKWISE_GIB", "0.125")) * 2**30)


def weight_bytes(graph: Any) -> int:
    """Bytes of an ONNX graph's initializers (from their shapes: nothing is read); 0 for FX."""
    if getattr(graph, "ir", None) != "onnx":
        return 0
    return sum(v.const_value.nbytes for v in graph.model.graph.initializers.values()
               if v.const_value is not None)


def executor(graph: Any, ends: list[str]) -> Any:
    """The per-IR segment executor of ``graph``."""
    if graph.ir == "onnx":
        from rotaq.rewriter.onnx_blocks import OnnxSegments

        return OnnxSegments(graph, ends)
    from rotaq.rewriter.fx_blocks import FxSegments

    return FxSegments(graph, ends)


class _Store:
    """Values by name, one dict per chunk; optionally spilled to ``.npy`` files."""

    def __init__(self, chunks: int, spill: bool | str) -> None:
        self.data: list[dict[str, Any]] = [{} for _ in range(chunks)]
        self.dir = None
        if spill:
            self.dir = tempfile.mkdtemp(prefix="rotaq-blocks-",
                                        dir=spill if isinstance(spill, str) else None)
        self._n = 0

    def put(self, c: int, name: str, value: Any) -> None:
        if self.dir and type(value).__name__ == "Tensor" and str(value.dtype) != "torch.bfloat16":
            value = _numpy(value)
        if self.dir and isinstance(value, np.ndarray) and value.nbytes >= _SPILL_BYTES \
                and value.dtype.kind in "fiub":
            self._n += 1
            path = os.path.join(self.dir, f"{self._n}.npy")
            np.save(path, value)
            value = _Spilled(path)
        self.data[c][name] = value

    def get(self, c: int, name: str) -> Any:
        v = self.data[c][name]
        return v.load() if isinstance(v, _Spilled) else v

    def has(self, name: str) -> bool:
        return bool(self.data) and name in self.data[0]

    def drop(self, name: str) -> None:
        for d in self.data:
            v = d.pop(name, None)
            if isinstance(v, _Spilled):
                v.remove()

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@dataclass
class _Spilled:
    path: str

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass


class SegmentRun:
    """What a hook sees of the segment being run: :attr:`segment`, and :meth:`capture`."""

    def __init__(self, runner: BlockRunner, segment: Segment) -> None:
        self.runner = runner
        self.segment = segment
        self._last: list[dict[str, Any]] | None = None

    @property
    def chunks(self) -> int:
        return len(self.runner.store.data)

    def each(self, values: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """``values`` (produced in this segment or read by it) for each chunk of the feeds, with
        the segment as it is now (rewrites made so far included)."""
        names = list(dict.fromkeys(values))
        self.runner._refresh(self.segment.index)  # the hook may have rewritten the segment
        outs: list[dict[str, Any]] = []
        for c in range(self.chunks):
            got = self.runner._run(self.segment.index, c, names)
            outs.append(got)
            yield {v: _numpy(got[v]) for v in names}
        self._last = outs

    def capture(self, values: Sequence[str]) -> dict[str, np.ndarray]:
        """``values`` over all chunks, concatenated on the first axis."""
        parts = list(self.each(values))
        if len(parts) == 1:
            return parts[0]
        return {v: np.concatenate([p[v] for p in parts], axis=0) for v in parts[0]}


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


Hook = Callable[[SegmentRun], Any]


class BlockRunner:
    """Runs ``graph`` segment by segment over ``feeds`` (see the module docstring)."""

    def __init__(self, graph: Any, feeds: dict[str, np.ndarray], *, batch: int | None = None,
                 spill: bool | str = False, keep_outputs: bool = True,
                 analysis: Analysis | None = None, precision: str | None = None) -> None:
        """``precision`` (ONNX): ``"fp32"`` runs every segment as its fp32 copy, ``"round:T"``
        as its fp32 copy with every op output rounded to T (float16 / bfloat16): an fp16/bf16
        graph's reference and emulated runs, one block's weights converted at a time."""
        self.graph = graph
        self.segments = segments(graph, analysis)
        self.exec = executor(graph, [s.end for s in self.segments[:-1]])
        if precision is not None:
            self.exec.precision = precision
        feeds = complete_feeds(graph, feeds)
        parts = list(chunks(graph, feeds, batch))
        self.store = _Store(len(parts), spill)
        self.keep_outputs = keep_outputs
        self.outputs: list[dict[str, Any]] = [{} for _ in parts]
        names = self.exec.input_values()
        for c, p in enumerate(parts):
            for feed, value in names.items():
                if feed in p:
                    self.store.put(c, value, np.asarray(p[feed]))
        self._inputs = [self.exec.inputs(k) for k in range(len(self.segments))]
        self._graph_outputs = self.exec.output_values()

    def _refresh(self, k: int) -> None:
        """Re-read segment ``k`` from the graph (after an edit)."""
        self.exec.changed(k)
        self._inputs[k] = self.exec.inputs(k)

    # ---- liveness ---------------------------------------------------------------------
    def _needed_after(self, k: int) -> set[str]:
        out = set().union(*self._inputs[k + 1:]) if k + 1 < len(self._inputs) else set()
        return out

    def _run(self, k: int, c: int, extra: Sequence[str]) -> dict[str, Any]:
        """Run segment ``k`` on chunk ``c``; returns ``extra`` + what later segments read + the
        graph outputs it produces (when kept)."""
        names = list(extra)
        env = {}
        for v in self._inputs[k]:
            if not self.store.has(v):
                raise RuntimeError(f"segment {k} reads {v!r}, which no earlier segment kept")
            env[v] = self.store.get(c, v)
        want = list(dict.fromkeys([*names, *self._outs(k)]))
        produced = self.exec.produced(k)
        direct = {v: env[v] for v in want if v in env and v not in produced}
        got = self.exec.run(k, env, [v for v in want if v not in direct])
        return {**direct, **got}

    def _outs(self, k: int) -> list[str]:
        produced = self.exec.produced(k)
        later = self._needed_after(k)
        outs = [v for v in produced if v in later]
        if self.keep_outputs:
            outs += [v for v in self._graph_outputs if v in produced]
        return outs

    def _commit(self, k: int, results: list[dict[str, Any]]) -> None:
        produced = self.exec.produced(k)
        later = self._needed_after(k)
        for c, res in enumerate(results):
            for v, x in res.items():
                if v in produced and v in later:
                    self.store.put(c, v, x)
                if self.keep_outputs and v in self._graph_outputs:
                    self.outputs[c][v] = x
        for v in list(self.store.data[0]) if self.store.data else []:
            if v not in later:
                self.store.drop(v)

    # ---- driving ------------------------------------------------------------------------
    def run(self, hook: Hook | None = None, *, until: int | None = None,
            desc: str = "blocks") -> None:
        """Run every segment (or up to segment ``until``), calling ``hook`` on each first."""
        last = len(self.segments) - 1 if until is None else until
        bar = tqdm(self.segments[:last + 1], desc=desc, unit="block", leave=False,
                   disable=len(self.segments) < 8 or not _main())
        try:
            for seg in bar:
                k = seg.index
                sr = SegmentRun(self, seg)
                changed = hook(sr) if hook is not None else False
                if changed:
                    self._refresh(k)
                    sr._last = None
                if k == last and until is not None:
                    break  # nothing reads this segment's outputs
                results = sr._last
                if results is None:
                    results = [self._run(k, c, []) for c in range(len(self.store.data))]
                self._commit(k, results)
                self.exec.release(k)
        finally:
            bar.close()

    def result(self) -> list[np.ndarray]:
        """The graph outputs in order (rows concatenated over the chunks)."""
        out = []
        for v in self._graph_outputs:
            parts = [_numpy(self.outputs[c][v] if v in self.outputs[c] else self.store.get(c, v))
                     for c in range(len(self.outputs))]
            out.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
        return out

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> BlockRunner:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_blockwise(graph: Any, feeds: dict[str, np.ndarray], hook: Hook | None = None, *,
                  batch: int | None = None, spill: bool | str = False,
                  precision: str | None = None) -> list[np.ndarray]:
    """The graph outputs on ``feeds`` (as ``graph.run`` gives them, within float tolerance),
    computed segment by segment; ``hook(SegmentRun)`` is called before each segment runs;
    ``precision``: see :class:`BlockRunner`."""
    with BlockRunner(graph, feeds, batch=batch, spill=spill, precision=precision) as r:
        r.run(hook)
        return r.result()


def _main() -> bool:
    from rotaq import dist

    return dist.is_main()
