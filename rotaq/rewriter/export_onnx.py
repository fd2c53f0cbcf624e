"""torch -> ONNX with the dynamo exporter, written atomically with rotaq metadata."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch

from rotaq.errors import RotaqError
from rotaq.progress import stage

log = logging.getLogger(__name__)


def export_onnx(ep: torch.export.ExportedProgram, path: str, metadata: dict[str, str],
                opset: int | None = None) -> None:
    """Export ``ep`` to ``path`` (ONNX, weights as external data when large)."""
    from rotaq.rewriter.onnx import OnnxGraph

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".rotaq-export-") as tmp, \
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
        g.metadata.update(metadata)
        g.save(path)
