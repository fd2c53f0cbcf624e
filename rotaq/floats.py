"""Float dtypes by name (fp32, fp16, bf16): canonical names, their numpy / torch / onnx-ir
dtypes, tensors between torch and numpy (bf16 kept), and the dtype an HF directory or a torch
module stores its weights in. The dtype policy built on these is :mod:`rotaq.dtypes` (which
re-exports them); this module imports nothing of rotaq's but its errors, so the IR adapters and
the loaders can use it.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from typing import Any

import numpy as np

from rotaq.errors import LoadError

FLOAT32, FLOAT16, BFLOAT16 = "float32", "float16", "bfloat16"
_ALIASES = {"fp32": FLOAT32, "float32": FLOAT32, "float": FLOAT32, "f32": FLOAT32,
            "fp16": FLOAT16, "float16": FLOAT16, "half": FLOAT16, "f16": FLOAT16,
            "bf16": BFLOAT16, "bfloat16": BFLOAT16}
_SAFETENSORS = {"F32": FLOAT32, "F16": FLOAT16, "BF16": BFLOAT16}


def canonical(name: Any) -> str | None:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` for a name (fp32, fp16, bf16, float16, ...),
    a torch dtype or a numpy dtype; None for None. An unknown name is a :class:`LoadError`."""
    if name is None:
        return None
    key = str(name).lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise LoadError(f"dtype {name!r}: expected fp32, fp16 or bf16")
    return _ALIASES[key]


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, canonical(name))


def numpy_dtype(name: Any) -> np.dtype:
    """The numpy dtype of a float dtype name or torch dtype (bf16: ``ml_dtypes.bfloat16``)."""
    import torch

    if isinstance(name, torch.dtype) and name != torch.bfloat16:
        return np.dtype(torch.empty((), dtype=name).numpy().dtype)
    c = canonical(name)
    if c == BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(c)


def onnx_dtype(name: str) -> Any:
    import onnx_ir as oir

    return {FLOAT32: oir.DataType.FLOAT, FLOAT16: oir.DataType.FLOAT16,
            BFLOAT16: oir.DataType.BFLOAT16}[canonical(name)]


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as numpy, bf16 kept (as ``ml_dtypes.bfloat16``, same bits)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(numpy_dtype(BFLOAT16))
    return t.numpy()


def tensor_from_numpy(a: Any) -> Any:
    """A numpy array (``ml_dtypes.bfloat16`` included) as a torch tensor."""
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------- source dtypes
def hf_source_dtype(path: str | os.PathLike) -> str:
    """The dtype an HF directory stores its weights in: ``config.json``'s ``torch_dtype`` /
    ``dtype``, else the commonest float dtype in its safetensors headers, else float32."""
    folder = os.fspath(path)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.lower().removeprefix("torch.") in _ALIASES:
            return canonical(value)
    counts: Counter = Counter()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".safetensors"):
            counts.update(_safetensors_dtypes(os.path.join(folder, name)))
    return counts.most_common(1)[0][0] if counts else FLOAT32


def _safetensors_dtypes(path: str) -> Counter:
    """Element counts per float dtype, read from a safetensors header (no tensor is read)."""
    counts: Counter = Counter()
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return counts
    for key, info in header.items():
        if key != "__metadata__" and info.get("dtype") in _SAFETENSORS:
            counts[_SAFETENSORS[info["dtype"]]] += int(np.prod(info.get("shape") or [1]))
    return counts


def module_dtype(module: Any) -> str:
    """The commonest float dtype (by element count) of a torch module's parameters/buffers."""
    counts: Counter = Counter()
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            counts[str(t.dtype).removeprefix("torch.")] += t.numel()
    best = counts.most_common(1)[0][0] if counts else FLOAT32
    return best if best in (FLOAT16, BFLOAT16) else FLOAT32


def output_dtype(source: str, requested: Any = None) -> str:
    """``requested`` (fp32 / fp16 / bf16) when given, else the source's own dtype."""
    return canonical(requested) if requested is not None else canonical(source)


def is_float(a: Any) -> bool:
    """Whether an array holds floats (``ml_dtypes.bfloat16`` included)."""
    dt = np.asarray(a).dtype
    return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"

