"""Small file-system helpers shared by the writers."""

from __future__ import annotations

import os


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
