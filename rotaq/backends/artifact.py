"""Compiled-artefact folders (``rotaq compile``): load one with either backend, check its
backend. The format and the writer helpers are :mod:`rotaq.backends.artifact_io`
(re-exported here), which the backends import, so this loader may dispatch to them."""

from __future__ import annotations

import os
from typing import Any

from rotaq.backends.artifact_io import (  # noqa: F401 (re-exported: the format)
    FORMAT,
    METADATA,
    VERSION,
    header,
    is_artifact,
    read_metadata,
    replace_dir,
    work_dir,
    write_metadata,
)
from rotaq.errors import RotaqError


def load_artifact(folder: str) -> Any:
    """A compiled artefact (either backend) as a :class:`rotaq.model.Model`."""
    meta = read_metadata(folder)
    if meta["backend"] == "tvm":
        from rotaq.backends import tvm as tb

        return tb.load(folder)
    from rotaq.loading import load
    from rotaq.model import resolve_source

    model = load(os.path.join(folder, meta["model_file"]))
    model.source.update(resolve_source(meta.get("source") or {}, os.path.abspath(folder)))
    return model


def check_artifact_backend(path: str, backend: str | None) -> str | None:
    """For an artefact folder: its backend (``backend``, when given, must agree); else None."""
    if not is_artifact(path):
        return None
    have = read_metadata(path)["backend"]
    if backend and backend != have:
        raise RotaqError(f"{path} is a {have} artefact: use --backend {have}")
    return have
