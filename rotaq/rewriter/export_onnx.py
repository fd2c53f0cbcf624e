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

from rotaq.errors import RotaqError

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
    log.info("exporting to ONNX (torch.onnx.export, dynamo); this takes a while for big models")
    with sigterm_raises(), tempfile.TemporaryDirectory(dir=folder, prefix=".rotaq-export-") as tmp:
        f = os.path.join(tmp, "model.onnx")
        kwargs: dict[str, Any] = {"dynamo": True, "external_data": True, "verbose": False}
        if opset:
            kwargs["opset_version"] = opset
        try:
            torch.onnx.export(ep, (), f, **kwargs)
        except Exception as err:  # the exporter raises many types
            raise RotaqError(f"ONNX export failed: {type(err).__name__}: {err}") from err
        g = OnnxGraph.load(f)
        g.metadata.update(metadata)
        g.save(path)
