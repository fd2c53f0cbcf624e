"""torch -> ONNX with the dynamo exporter, written atomically with rotaq metadata."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rotaq import tags
from rotaq.decoder_io import contract_name, output_names
from rotaq.errors import RotaqError
from rotaq.progress import stage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` instead of killing the process at
    once, so ``finally`` blocks remove temporary files. Only where SIGTERM has its default
    action and in the main thread (the only place a handler can be installed)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def export_onnx(ep: torch.export.ExportedProgram, path: str, metadata: dict[str, str],
                opset: int | None = None) -> None:
    """Export ``ep`` to ``path`` (ONNX, weights as external data when large)."""
    import torch

    from rotaq.rewriter.onnx import OnnxGraph

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with sigterm_raises(), tempfile.TemporaryDirectory(dir=folder, prefix=".rotaq-export-") as tmp, \
            stage(f"exporting to ONNX (torch.onnx.export, dynamo): {os.path.basename(path)}"):
        f = os.path.join(tmp, "model.onnx")
        kwargs: dict[str, Any] = {"dynamo": True, "external_data": True, "verbose": False}
        if opset:
            kwargs["opset_version"] = opset
        # "torchvision is not installed. Skipping torchvision::nms" (4 lines per export) unless
        # rotaq logs at DEBUG
        reg = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = reg.level
        if not logging.getLogger("rotaq").isEnabledFor(logging.DEBUG):
            reg.setLevel(logging.ERROR)
        try:
            torch.onnx.export(ep, (), f, **kwargs)
        except Exception as err:  # the exporter raises many types
            raise RotaqError(f"ONNX export failed: {type(err).__name__}: {err}") from err
        finally:
            reg.setLevel(level)
        g = OnnxGraph.load(f)
        if metadata.get(tags.KV_CACHE) == "1":
            _contract_names(g.model.graph)
        g.metadata.update(metadata)
        g.save(path)


def _contract_names(graph: Any) -> None:
    """Name a KV-cache graph's inputs and outputs as onnxruntime-genai / Optimum do: the FX
    placeholders ``past_key_values_{i}_key`` become ``past_key_values.{i}.key``, the outputs
    ``logits``, ``present.{i}.key``, ``present.{i}.value`` (renaming an onnx-ir value renames
    every use of it)."""
    for v in graph.inputs:
        v.name = contract_name(v.name)
    names = output_names((len(graph.outputs) - 1) // 2)
    if len(names) != len(graph.outputs):
        raise RotaqError(f"a KV-cache graph has {len(graph.outputs)} outputs (expected logits "
                         "and two presents per layer)")
    taken = {v.name for v in graph.inputs}
    for v, name in zip(graph.outputs, names):
        if name in taken:
            raise RotaqError(f"output name {name} is taken by an input")
        v.name = name
