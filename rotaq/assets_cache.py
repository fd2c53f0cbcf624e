"""The cache folder of rotaq's derived files (converted models, extracted text, builder
outputs) and the helpers that fill it safely: a file lock, a completion marker, offline switches,
installed-package lookups without importing the package."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rotaq.errors import MissingDependencyError

#: Written last into a finished cache directory; a directory without it is incomplete.
CACHE_MARKER = ".rotaq-complete.json"
# Bump to invalidate caches written by an older conversion.
CACHE_FORMAT = 2
INSTALL_MODELS = "pip install -e '.[models]'"


def cache_dir() -> Path:
    """The cache directory: ``$ROTAQ_CACHE`` or ``~/.cache/rotaq``, created on demand."""
    env = os.environ.get("ROTAQ_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "rotaq"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The completion marker of a cache folder (None: missing or unreadable)."""
    try:
        data = json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def set_offline() -> None:
    """Forbid every Hugging Face hub access (everything here is local)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def package_dir(module: str, pip_cmd: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"package '{module}' is not installed; run: {pip_cmd}")
    return Path(spec.origin).resolve().parent


def require(module: str, pip_cmd: str) -> None:
    """Raise MissingDependencyError naming ``pip_cmd`` when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"package '{module}' is not installed; run: {pip_cmd}")



def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")

