"""Streaming storage for :class:`~rotaq.rewriter.onnx.OnnxGraph`: weights stay on disk.

- :func:`load_lazy`: an ONNX file whose initializers read their external data one tensor at a
  time when asked (``os.pread`` on a descriptor held open, so a file replaced later, e.g. by a
  save over the source, is still read as it was). Nothing is read on load: missing, short or
  out-of-folder data files are refused from their sizes and paths alone.
- :class:`SpillStore`: tensors written by the graph's setters go to a temporary folder once
  large (:data:`SPILL_BYTES`), so memory does not grow with the number of rewritten weights;
  the folder is removed when the store is collected or the process exits, errors included.
- :func:`file_tensor`: the lazy tensor both use; the graph's ``save`` (onnx-ir) streams such
  tensors to the output one at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq.errors import LoadError

log = logging.getLogger(__name__)
SPILL_BYTES = 1 << 20  # a new tensor at least this large is written to the spill folder
CHUNK_BYTES = 8 << 20  # large tensors are converted and copied this many bytes at a time
_PACKED = {oir.DataType.INT4, oir.DataType.UINT4, oir.DataType.FLOAT4E2M1}


class DataFile:
    """A read-only descriptor on one data file, closed when no tensor refers to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        weakref.finalize(self, os.close, self.fd)

    def read(self, offset: int, length: int) -> np.ndarray:
        """``length`` bytes at ``offset`` in a fresh writable uint8 array (ORT takes a writable
        array without copying it)."""
        buf = np.empty(length, np.uint8)
        view, done = memoryview(buf), 0
        while done < length:  # one read returns at most ~2 GiB
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: short read at offset {offset} ({done} of {length}"
                              " bytes)")
            done += n
        return buf


class FileTensor(oir.LazyTensor):  # pylint: disable=too-many-ancestors
    """A lazy tensor read from a data file (see :func:`file_tensor`)."""

    __slots__ = ("data", "offset")


def file_tensor(data: DataFile, offset: int, dtype: oir.DataType, shape: Any,
                name: str | None) -> FileTensor:
    """A tensor whose bytes are read from ``data`` at ``offset`` each time they are needed
    (never cached: memory holds one tensor while it is used)."""
    dims = tuple(int(d) for d in shape)
    count = int(np.prod(dims, dtype=np.int64))
    nbytes = (count * dtype.bitwidth + 7) // 8

    def read() -> oir.Tensor:
        arr = data.read(offset, nbytes).view(np.dtype(dtype.numpy()).newbyteorder("<"))
        return oir.Tensor(arr.reshape(dims), dtype=dtype, name=name)

    t = FileTensor(read, dtype=dtype, shape=oir.Shape(dims), name=name)
    t.data = data
    t.offset = offset
    return t


def as_float64(t: Any, transpose: bool = False) -> np.ndarray:
    """A C-contiguous float64 copy of the 2-D float tensor ``t`` (transposed with
    ``transpose``), the only array of the tensor's size made: a tensor on disk is read
    :data:`CHUNK_BYTES` of rows at a time, one in memory is converted in one step."""
    if not isinstance(t, FileTensor) or len(t.shape) != 2 or t.dtype in _PACKED:
        arr = t.numpy()
        return np.ascontiguousarray(arr.T if transpose else arr, dtype=np.float64)
    rows, cols = (int(d) for d in t.shape)
    item = np.dtype(t.dtype.numpy()).newbyteorder("<")
    out = np.empty((cols, rows) if transpose else (rows, cols), np.float64)
    step = max(1, CHUNK_BYTES // max(1, cols * item.itemsize))
    for i in range(0, rows, step):
        n = min(step, rows - i)
        raw = t.data.read(t.offset + i * cols * item.itemsize, n * cols * item.itemsize)
        block = raw.view(item).reshape(n, cols)
        if transpose:
            out[:, i:i + n] = block.T
        else:
            out[i:i + n] = block
    return out


def is_on_disk(t: Any) -> bool:
    return isinstance(t, FileTensor)


def _inside(path: str, folder: str) -> bool:
    for resolve in (os.path.abspath, os.path.realpath):
        base, p = resolve(folder), resolve(path)
        if p != base and not p.startswith(base.rstrip(os.sep) + os.sep):
            return False
    return True


def load_lazy(path: str) -> oir.Model:
    """The model in ``path`` with its external data left on disk (see module doc); raises
    :class:`LoadError` (one line naming ``path``) for an unreadable file or data."""
    try:
        model = oir.load(path)
    except OSError as err:
        raise LoadError(f"cannot load {path}: cannot read the file: {_line(err)}") from err
    except Exception as err:  # protobuf DecodeError, ...
        raise LoadError(f"cannot load {path}: not a valid ONNX model (truncated or corrupt): "
                        f"{_line(err)}") from err
    if model.graph.num_nodes() == 0:
        raise LoadError(f"cannot load {path}: not a valid ONNX model (no graph)")
    base = os.path.dirname(os.path.abspath(path))
    files: dict[str, DataFile] = {}
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if isinstance(t, oir.ExternalTensor):
                v.const_value = _lazy(path, base, t, files)
    return model


def _lazy(path: str, base: str, t: oir.ExternalTensor, files: dict[str, DataFile]) -> Any:
    where = f"cannot load {path}: its external data is missing or unreadable"
    loc = os.path.join(base, os.fspath(t.location))
    if not _inside(loc, base):
        raise LoadError(f"{where}: tensor {t.name!r} points outside the model's folder "
                        f"({t.location})")
    if loc not in files:
        try:
            files[loc] = DataFile(loc)
        except OSError as err:
            raise LoadError(f"{where}: {_line(err)}") from err
    data = files[loc]
    offset = int(t.offset or 0)
    need = (int(np.prod([int(d) for d in t.shape], dtype=np.int64)) * t.dtype.bitwidth + 7) // 8
    length = need if t.length is None else int(t.length)
    if length < need or offset + length > data.size:
        raise LoadError(f"{where}: {os.path.basename(loc)} is short (truncated?): tensor "
                        f"{t.name!r} needs bytes {offset}..{offset + length}, the file has "
                        f"{data.size}")
    if t.dtype in _PACKED:
        return t  # 4-bit packed storage: onnx-ir's own external tensor unpacks it
    return file_tensor(data, offset, t.dtype, t.shape, t.name)


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class SpillStore:
    """Where large new tensors are written (a temporary folder, removed with the store)."""

    def __init__(self) -> None:
        self._dir: str | None = None
        self._count = 0
        self._lock = threading.Lock()
        self.bytes = 0

    def _folder(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="rotaq-spill-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    @property
    def folder(self) -> str | None:
        return self._dir

    def tensor(self, array: np.ndarray, dtype: oir.DataType, name: str) -> Any:
        """``array`` stored as ``dtype``: in memory when small, else written to the spill
        folder and read back lazily."""
        array = np.asarray(array)
        np_type = np.dtype(dtype.numpy())
        if array.size * np_type.itemsize < SPILL_BYTES or dtype in _PACKED or array.ndim == 0:
            arr = np.ascontiguousarray(array.astype(np_type))
            return oir.Tensor(arr, dtype=dtype, name=name)
        with self._lock:
            self._count += 1
            path = os.path.join(self._folder(), f"{self._count}.bin")
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        step = max(1, CHUNK_BYTES // max(1, rows.shape[1] * np_type.itemsize))
        with open(path, "wb") as f:  # converted a block of rows at a time: no full-size copy
            for i in range(0, rows.shape[0], step):
                np.ascontiguousarray(rows[i:i + step].astype(np_type)).tofile(f)
        self.bytes += array.size * np_type.itemsize
        return file_tensor(DataFile(path), 0, dtype, array.shape, name)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def return_large_frees() -> None:
    """Make glibc give large freed blocks straight back to the system: allocations of 1 MiB
    or more (weights, activations) are served by mmap and unmapped on free, instead of the
    dynamic threshold growing to 32 MiB and freed weights staying in the heap. Called by the
    CLI at start; a no-op where libc is not glibc. Measured on a 201 MB model's rotation:
    peak RSS 1.09 GB -> 0.87 GB."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def trim() -> None:
    """Give freed memory back to the system (glibc keeps it otherwise), e.g. after an ORT
    session holding the weights is dropped."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
