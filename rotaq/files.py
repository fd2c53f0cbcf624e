"""Small file-system helpers shared by the writers."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def set_normal_permissions(path: str) -> None:
    """Give a file 0666 and a folder tree 0777 / 0666, less the umask (what ``open`` and
    ``mkdir`` give); ``tempfile`` creates 0600 files and 0700 folders."""
    umask = os.umask(0)
    os.umask(umask)
    if not os.path.isdir(path):
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)
        return
    os.chmod(path, 0o777 & ~umask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix); when the block ends without an
    error it is given normal permissions and renamed onto ``path``; otherwise it is removed.
    Readers never see a half-written file, and an existing ``path`` survives a failure."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".rotaq-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        set_normal_permissions(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, prefix: str = ".rotaq-") -> Iterator[str]:
    """Yield a fresh temporary folder beside ``path``; when the block ends without an error
    it replaces ``path`` (an existing folder is moved aside, then deleted); otherwise it is
    removed and ``path`` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    old = None
    try:
        yield tmp
        set_normal_permissions(tmp)  # mkdtemp made it 0700
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=prefix + "old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
