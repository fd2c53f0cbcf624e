"""Progress lines for long steps, through the ``rotaq.progress`` logger.

``with stage("exporting to ONNX"):`` logs ``exporting to ONNX ...`` when the step starts and
``exporting to ONNX: 81.2 s`` when it ends. The ``rotaq`` command shows these lines on stderr
(``[rotaq] ...``); from Python they appear when logging is configured at INFO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("rotaq.progress")


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Log ``what ...`` now and ``what: <seconds> s`` when the block ends without error."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - t0)
