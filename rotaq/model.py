"""The model container passed between load, passes, verification and save."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rotaq import tags
from rotaq.errors import RotaqError
from rotaq.files import atomic_dir
from rotaq.rewriter.analysis import Analysis, analyze

log = logging.getLogger(__name__)


@dataclass
class Model:
    """A captured graph (``FxGraph`` or ``OnnxGraph``) plus what is needed to run it.

    ``source`` records where it came from: ``name`` (builtin name or path), ``kind``
    (``causal-lm``, ``encoder`` or ``unknown``) and ``tokenizer`` (a directory, when known).
    ``sample_inputs`` verify rewrites; ``calibration`` holds the user's calibration rows (when
    given; else passes calibrate on text or synthetic inputs, never on ``sample_inputs``).
    ``inputs_info`` describes both sets for reports (``verify``, ``calibration``).
    """

    graph: Any
    sample_inputs: dict[str, np.ndarray]
    source: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, np.ndarray] | None = None
    inputs_info: dict[str, Any] = field(default_factory=dict)

    @property
    def ir(self) -> str:
        return self.graph.ir

    def analysis(self) -> Analysis:
        return analyze(self.graph.view())

    def run(self, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Outputs on ``feeds`` (default: the sample inputs), batched to the graph's size."""
        from rotaq.rewriter.kv_capture import is_cache_graph, prefill_decode

        feeds = self.sample_inputs if feeds is None else feeds
        if is_cache_graph(self.graph):
            from rotaq.rewriter.kv_capture import complete_feeds

            feeds = complete_feeds(self.graph, feeds)  # tokens only: a full prefill  # a prefill, then decode steps fed the returned presents
            return prefill_decode(_Batched(self.graph), feeds)
        return _run(self.graph, feeds)

    def token_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for token windows ``ids`` [batch, seq]: ids plus an all-ones attention mask and
        zero token types when the graph takes them."""
        feeds = {"input_ids": np.asarray(ids, dtype=np.int64)}
        names = set(self.graph.input_names)
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        from rotaq.rewriter.kv_capture import complete_feeds

        return complete_feeds(self.graph, feeds)  # a KV-cache graph: empty pasts, positions

    def clone(self) -> Model:
        return Model(self.graph.clone(), dict(self.sample_inputs), dict(self.source),
                     self.calibration,
                     {k: list(v) if isinstance(v, list) else v for k, v in self.inputs_info.items()})

    def save(self, path: str, *, tokenizer: bool = True) -> list[str]:
        """Write ``path`` (.onnx or .pt2; atomically) and return the files written.

        With ``tokenizer`` the model's tokenizer (when known) is copied to ``PATH.tokenizer/``
        beside the output and recorded relative to it (``rotaq.tokenizer`` metadata), so the
        output can be moved or copied to another machine; without it the recorded path stays
        as it is (for temporary files)."""
        if self.ir == "onnx" and not str(path).lower().endswith(".onnx"):
            raise RotaqError(f"{path}: an ONNX model is written as .onnx only")
        meta = {f"rotaq.{k}": str(v) for k, v in self.source.items()}
        written = []
        tok_dir = self.source.get("tokenizer")
        if tokenizer and tok_dir and os.path.isdir(tok_dir):
            dest = os.fspath(path) + TOKENIZER_SUFFIX
            try:
                copy_tokenizer(tok_dir, dest)
            except Exception as err:  # noqa: BLE001 - transformers raises many types
                log.warning("could not copy the tokenizer %s beside the output (%s: %s); the "
                            "output records its absolute path", tok_dir, type(err).__name__, err)
            else:
                meta[tags.TOKENIZER] = os.path.basename(dest)
                written.append(dest)
        self.graph.metadata.update(meta)
        try:
            self.graph.save(path)
        except BaseException:  # no tokenizer folder without its model
            for d in written:
                shutil.rmtree(d, ignore_errors=True)
            raise
        return [os.fspath(path), *self._sidecars(os.fspath(path)), *written]

    @staticmethod
    def _sidecars(path: str) -> list[str]:
        data = path + ".data"
        return [data] if path.lower().endswith(".onnx") and os.path.exists(data) else []


TOKENIZER_SUFFIX = ".tokenizer"


class _Batched:
    """``graph`` whose ``run`` goes through :func:`rotaq.inputs.run` (fixed-batch graphs)."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.input_names = graph.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return _run(self.graph, feeds)


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


def _run(graph: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from rotaq.inputs import run

    if weight_bytes(graph) > blockwise_bytes():
        from rotaq.rewriter.blocks import run_blockwise

        log.info("running block by block (weights %.1f GiB)", weight_bytes(graph) / 2**30)
        return run_blockwise(graph, feeds)
    return run(graph, feeds)


def copy_tokenizer(src: str, dest: str) -> None:
    """Save the tokenizer of directory ``src`` as a tokenizer directory ``dest`` (atomically:
    written to a temporary folder beside it, then renamed into place)."""

    from transformers import AutoTokenizer

    if os.path.abspath(src) == os.path.abspath(dest):
        return
    tok = AutoTokenizer.from_pretrained(src)
    with atomic_dir(dest, prefix=".rotaq-tok-") as tmp:
        tok.save_pretrained(tmp)


def resolve_source(source: dict[str, str], base_dir: str) -> dict[str, str]:
    """``source`` with a relative ``tokenizer`` made absolute against ``base_dir`` (the folder
    of the model file or the artefact folder)."""
    out = dict(source)
    tok = out.get("tokenizer")
    if tok and not os.path.isabs(tok):
        out["tokenizer"] = os.path.normpath(os.path.join(base_dir, tok))
    return out


def portable_source(source: dict[str, str], folder: str, name: str = "tokenizer") -> dict[str, str]:
    """``source`` for an artefact folder: its tokenizer (when known) copied to ``folder/name``
    and recorded relative to the folder."""
    out = dict(source)
    tok = out.get("tokenizer")
    if tok and os.path.isdir(tok):
        copy_tokenizer(tok, os.path.join(folder, name))
        out["tokenizer"] = name
    return out


def max_rel_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max |out - ref| / max |ref| over each output tensor; the worst output counts."""
    if len(ref) != len(out):
        raise ValueError(f"output count changed: {len(ref)} -> {len(out)}")
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r64.shape != o64.shape:
            raise ValueError(f"output shape changed: {r64.shape} -> {o64.shape}")
        # a value that is NaN / inf where the original is finite is an infinite error (a plain
        # max() would drop NaN and let a broken rewrite pass); both non-finite at the same
        # place (e.g. masked -inf logits) is no error
        same = (r64 == o64) | (np.isnan(r64) & np.isnan(o64))
        if np.any(~np.isfinite(o64) & ~same):
            return float("inf")
        fin = np.isfinite(r64)
        scale = float(np.max(np.abs(r64[fin]), initial=0.0)) or 1.0
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(o64 - r64))
        worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
    return worst


def rel_rms_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """||out - ref|| / ||ref|| (Frobenius) per output tensor; the worst output counts. An average,
    so steadier across input samples than :func:`max_rel_error` for lossy rewrites."""
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        scale = float(np.linalg.norm(r64)) or 1.0
        worst = max(worst, float(np.linalg.norm(o64 - r64)) / scale)
    return worst
