"""Atomic file writes: a file is either complete or not there (never half-written)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The folder is created if needed; the file gets the usual permissions (``0o666`` minus the
    umask, not ``mkstemp``'s ``0o600``); on any error the temporary file is removed.

    Example:
        >>> import tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "sub", "a.txt")
        >>> atomic_write_text(target, "done") == target, open(target).read()
        (True, 'done')
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """:func:`atomic_write` of a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)
