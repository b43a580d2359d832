"""File helpers: atomic writes (a file is either complete or not there, never half-written) and
state-dict loading with one clear error for every way the file can be wrong."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import InputError


def existing_folder(path: str | os.PathLike[str]) -> str:
    """The deepest existing folder on ``path``'s way, where writing it would create folders or the file.

    It is a file, not a folder, when a parent of ``path`` is a file: see :func:`check_parent`.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def check_parent(path: str | os.PathLike[str], fn: str) -> None:
    """An :class:`InputError` naming ``fn`` when a parent of ``path`` is a file, so it cannot be written."""
    folder = existing_folder(path)
    if not os.path.isdir(folder):
        raise InputError(f"{fn}: cannot write {os.fspath(path)}: {folder} is a file, not a folder; choose another path")


def _umask() -> int:
    """The process's umask, read without setting it where the system tells it (Linux), since
    ``os.umask`` sets it process-wide for a moment, under other threads creating files."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _temporary(path: str) -> str:
    """An empty hidden file beside ``path`` (its folder created if needed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=os.path.splitext(path)[1])
    os.close(fd)
    return tmp


def _keep_copy(path: str, copy: str) -> None:
    """``copy`` (an existing temporary) becomes a copy of ``path``: a hard link, else a real copy."""
    os.remove(copy)
    try:
        os.link(path, copy)
    except OSError:
        shutil.copy2(path, copy)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The folder is created if needed; the file gets the usual permissions (``0o666`` minus the
    umask, not ``mkstemp``'s ``0o600``); on any error the temporary file is removed.

    Example:
        >>> import tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "sub", "a.txt")
        >>> atomic_write_text(target, "done") == target, open(target).read()
        (True, 'done')
    """
    return atomic_write_all([(path, write)])[0]


def atomic_write_all(files: Sequence[tuple[str | os.PathLike[str], Callable[[str], None]]]) -> list[str]:
    """:func:`atomic_write` of several files that belong together: all are replaced, or none.

    Every file is written to its temporary first. Then each replaces its target in turn (one
    atomic rename, so a target is never missing, even if the process dies), a copy of the old
    target kept aside (a hard link where the file system allows); if one cannot (a file that may
    not be replaced, a full disk), the ones already replaced get their old contents back, or are
    removed if they are new. So a pair such as maps and their sidecar never describe two
    different runs. No temporary is left.
    """
    given = [os.fspath(p) for p, _ in files]
    paths = [write_target(path) for path in given]
    temporaries: list[str] = []
    replaced: list[tuple[str, str, str | None, bool]] = []  # (path, its temporary, its old file's copy, it existed)
    try:
        umask = _umask()
        for path, (_, write) in zip(paths, files):
            temporaries.append(_temporary(path))
            os.chmod(temporaries[-1], 0o666 & ~umask)
            write(temporaries[-1])
        try:
            for path, tmp in zip(paths, list(temporaries)):
                old, existed = None, os.path.lexists(path)
                if len(paths) > 1 and existed:
                    old = _temporary(path)
                    temporaries.append(old)
                    _keep_copy(path, old)
                # recorded before the rename: an interrupt right after it must still undo it
                replaced.append((path, tmp, old, existed))
                os.replace(tmp, path)  # if this fails, path still holds its old file
        except BaseException:
            for path, tmp, old, existed in reversed(replaced):
                if os.path.lexists(tmp):
                    continue  # not renamed: path holds its old file
                try:
                    if old is not None:
                        os.replace(old, path)
                    elif not existed and os.path.lexists(path):
                        os.remove(path)
                except OSError:
                    continue  # best effort: the others still go back
            raise
    finally:
        for tmp in temporaries:
            if os.path.lexists(tmp):
                os.remove(tmp)
    return given


def write_target(path: str) -> str:
    """The file a write to ``path`` replaces: a symbolic link's target (the link stays a link).

    A target that is not a regular file (a device such as ``/dev/null``, a pipe, a socket) or that
    may not be written (read-only) is an :class:`InputError`: renaming over it would replace it.
    """
    real = os.path.realpath(path) if os.path.islink(path) else path
    if not os.path.lexists(real):
        return real
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:  # a loop of symbolic links, a target that vanished
        raise InputError(f"cannot write {path}: {exc.strerror}; choose another path") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        kind = (
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a socket"
        )
        raise InputError(f"cannot write {path}: it is {kind}, not a regular file; choose a file path")
    if not os.access(real, os.W_OK):
        raise InputError(f"cannot write {path}: the file is read-only; make it writable or choose another path")
    return real


def atomic_write_text(path: str | os.PathLike[str], text: str) -> str:
    """:func:`atomic_write` of a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def load_state_dict_file(
    model: nn.Module,
    path: str,
    name: str,
    *,
    prefix: str = "",
    missing_hint: str,
    mismatch_hint: str,
    pickled_hint: str = "save model.state_dict() instead: torch.save(model.state_dict(), path)",
) -> None:
    """Load the state dict saved in ``path`` into ``model`` (named ``name`` in messages).

    A ``{"state_dict": ...}`` checkpoint is unwrapped. A missing or unreadable file, a file that
    holds no state dict, or keys that do not fit the model are one :class:`InputError`, starting
    with ``prefix`` and ending with ``missing_hint`` or ``mismatch_hint`` (``pickled_hint`` for a
    file of pickled objects, such as a whole model, which is never unpickled); the model is untouched then.
    """
    if not os.path.isfile(path):
        raise InputError(f"{prefix}weights file not found: {path}; {missing_hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the caller's to fix
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            # torch.load(weights_only=True) refuses pickled objects other than tensors and containers: most often
            # a whole model saved with torch.save(model), which is never unpickled here (that could run any code)
            raise InputError(
                f"{prefix}weights {path} hold pickled Python objects ({found[1]}), not only tensors (a whole model "
                f"saved with torch.save(model), or a checkpoint holding other objects); {pickled_hint}"
            ) from None
        raise InputError(
            f"{prefix}cannot read weights {path} ({type(exc).__name__}); save them with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(
            f"{prefix}weights {path} hold a {type(state).__name__}, not a state dict; save model.state_dict()"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if missing or unexpected or shaped:
        parts = [
            f"{len(keys)} {label} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shaped))
            if keys
        ]
        raise InputError(f"{prefix}weights {path} do not match model {name}: {', '.join(parts)} keys; {mismatch_hint}")
    model.load_state_dict(state)
