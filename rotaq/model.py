"""The model container passed between load, passes, verification and save."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rotaq import tags
from rotaq.compare import max_rel_error, rel_rms_error  # noqa: F401 (re-exported)
from rotaq.decoder_io import complete_feeds, is_cache_graph, prefill_decode
from rotaq.errors import RotaqError
from rotaq.files import atomic_dir
from rotaq.inputs import run as run_batched
from rotaq.rewriter import blocks
from rotaq.rewriter.analysis import Analysis, analyze
from rotaq.rewriter.blocks import blockwise_bytes, weight_bytes  # also re-exported

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
        feeds = self.sample_inputs if feeds is None else feeds
        if is_cache_graph(self.graph):
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


def _run(graph: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    if weight_bytes(graph) > blockwise_bytes():
        log.info("running block by block (weights %.1f GiB)", weight_bytes(graph) / 2**30)
        return blocks.run_blockwise(graph, feeds)
    return run_batched(graph, feeds)


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
