"""Logging of the ``rotaq`` command: progress lines, rotaq's log, third-party noise."""

from __future__ import annotations

import logging
import os
import sys


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "rotaq.progress":
            return f"[rotaq] {record.getMessage()}"
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tests and embedders may replace)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool, debug: bool) -> None:
    """stderr logging for the command: progress lines (``[rotaq] step ...``, ``[rotaq] step:
    12.3 s``) on a terminal or with -v; rotaq's own log at INFO with -v; other libraries
    (onnxscript, onnx_ir, torch, transformers) at WARNING and their Future/Deprecation/User
    warnings hidden, unless --debug (then everything at INFO, rotaq at DEBUG). Without -v and
    off a terminal, stderr holds only warnings and errors (one line for a user mistake)."""
    import warnings

    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_rotaq", False):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Format("%(levelname)s %(name)s: %(message)s"))
    handler._rotaq = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("rotaq").setLevel(logging.DEBUG if debug else
                                        logging.INFO if verbose else logging.WARNING)
    show_progress = verbose or debug or sys.stderr.isatty()
    logging.getLogger("rotaq.progress").setLevel(logging.INFO if show_progress else
                                                 logging.WARNING)
    logging.captureWarnings(True)
    if not debug:
        for cat in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=cat, module=r"(?!rotaq)")
        # transformers' "Loading weights" bars; torch.onnx's "torchvision is not installed"
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import torch  # noqa: F401 - torch sets its loggers' levels when imported

        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
