"""What a compiled TVM artefact takes and gives at run time, beyond shapes: integer inputs
checked against the tables they index (``index_bounds`` in ``metadata.json``, found at compile
time by :func:`tvm_graph.index_bounds`), and outputs handed to numpy without a copy."""

from __future__ import annotations

from typing import Any

import numpy as np

from rotaq.errors import RotaqError


def in_bounds(name: str, a: Any, rows: int | None) -> np.ndarray:
    """Input ``name`` checked against the ``rows`` of the table it indexes (None: not an
    index): TVM lowers ONNX's Gather without a bounds check, so an id out of range read past
    the table and crashed the process. Ids in ``[-rows, rows)`` pass, negative ones wrapped as
    ONNX's Gather does; others raise RotaqError."""
    a = np.asarray(a)
    if rows is None or a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    if lo < -rows or hi >= rows:
        bad = hi if hi >= rows else lo
        raise RotaqError(f"input {name!r} holds {bad}, outside the {rows} rows of the table it "
                         f"indexes (valid: {-rows} to {rows - 1})")
    return np.where(a < 0, a + rows, a).astype(a.dtype) if lo < 0 else a


def host_array(t: Any) -> np.ndarray:
    """A VM output as numpy: the same memory for a CPU tensor (DLPack; the VM allocates its
    outputs afresh every call, so nothing overwrites it), a copy from a GPU."""
    try:
        return np.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return t.numpy()
