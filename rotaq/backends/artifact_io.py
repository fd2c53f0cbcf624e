"""The compiled-artefact folder that ``rotaq compile`` writes, for either backend.

``DIR/metadata.json`` holds ``{"format": "rotaq-artifact", "version": 1, "backend": "tvm" |
"ort", "target", "target_kind", "source", ...}`` beside the backend's files (TVM: ``lib_<n>.so``
or ``cuda_<n>.cu`` and ``params.npz``, :mod:`rotaq.backends.tvm`; ORT: its optimized
``model.onnx`` (+ ``model.onnx.data``) and the session settings, :func:`rotaq.backends.ort.
compile_ort`). A folder is built in a temporary folder beside ``DIR`` and renamed into place
(:func:`work_dir`, :func:`replace_dir`), so a reader never sees half an artefact.

This module is the format and its writer helpers (what the backends import);
:mod:`rotaq.backends.artifact` loads a folder with either backend (and re-exports these).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from rotaq.errors import RotaqError

FORMAT = "rotaq-artifact"
VERSION = 1
METADATA = "metadata.json"


def is_artifact(path: str) -> bool:
    """Whether ``path`` is a folder with a ``metadata.json`` (read it with :func:`read_metadata`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


def read_metadata(folder: str) -> dict[str, Any]:
    """The metadata of the artefact in ``folder`` (RotaqError when it is not one)."""
    try:
        with open(os.path.join(folder, METADATA)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise RotaqError(f"{folder}: not a rotaq artefact ({err})") from err
    if meta.get("format") != FORMAT:
        raise RotaqError(f"{folder}: {METADATA} is not a rotaq artefact")
    return meta


def header(backend: str, target: str, target_kind: str) -> dict[str, Any]:
    """The first fields of every artefact's metadata."""
    return {"format": FORMAT, "version": VERSION, "backend": backend, "target": target,
            "target_kind": target_kind}


def write_metadata(folder: str, meta: dict[str, Any]) -> None:
    with open(os.path.join(folder, METADATA), "w") as f:
        json.dump(meta, f, indent=2)


@contextlib.contextmanager
def work_dir(out_dir: str, prefix: str) -> Iterator[str]:
    """A fresh temporary folder beside ``out_dir``, removed when the block raises (the caller
    moves it into place with :func:`replace_dir` when done)."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` folder to ``out_dir`` (an existing artefact is replaced)."""
    from rotaq.files import set_normal_permissions

    set_normal_permissions(tmp)  # mkdtemp made it 0700
    if os.path.isdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, METADATA)) and os.listdir(out_dir):
            raise RotaqError(f"{out_dir} exists and is not a rotaq artefact: refusing to replace")
        old = out_dir.rstrip("/") + ".old-rotaq"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
