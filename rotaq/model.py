"""The model container passed between load, passes, verification and save."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rotaq.errors import RotaqError
from rotaq.rewriter.analysis import Analysis, analyze


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
        from rotaq.inputs import run

        return run(self.graph, self.sample_inputs if feeds is None else feeds)

    def token_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for token windows ``ids`` [batch, seq]: ids plus an all-ones attention mask and
        zero token types when the graph takes them."""
        feeds = {"input_ids": np.asarray(ids, dtype=np.int64)}
        names = set(self.graph.input_names)
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return feeds

    def clone(self) -> Model:
        return Model(self.graph.clone(), dict(self.sample_inputs), dict(self.source),
                     self.calibration,
                     {k: list(v) if isinstance(v, list) else v for k, v in self.inputs_info.items()})

    def save(self, path: str) -> None:
        if self.ir == "onnx" and not str(path).lower().endswith(".onnx"):
            raise RotaqError(f"{path}: an ONNX model is written as .onnx only")
        self.graph.metadata.update({f"rotaq.{k}": str(v) for k, v in self.source.items()})
        self.graph.save(path)


def max_rel_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max |out - ref| / max |ref| over each output tensor; the worst output counts."""
    if len(ref) != len(out):
        raise ValueError(f"output count changed: {len(ref)} -> {len(out)}")
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r64.shape != o64.shape:
            raise ValueError(f"output shape changed: {r64.shape} -> {o64.shape}")
        scale = float(np.max(np.abs(r64))) or 1.0
        worst = max(worst, float(np.max(np.abs(o64 - r64))) / scale)
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
