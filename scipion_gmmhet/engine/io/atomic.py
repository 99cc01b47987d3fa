"""Atomic file writes: one helper for every output and checkpoint the engine writes.

A file is written to ``path + '.tmp'`` (or ``path + suffix``) in the destination's folder and
then renamed over ``path`` with :func:`os.replace`, which is atomic on POSIX file systems. So a
reader (or a resumed run) sees either the old complete file or the new complete file, never a
half-written one, whatever happens during the write: an exception, SIGKILL, a full disk.

On an exception the temporary file is removed (a SIGKILL can still leave ``*.tmp`` behind;
it is never mistaken for the output and is overwritten by the next write). A full disk or an
exceeded quota (``ENOSPC``/``EDQUOT``, also when a library such as ``torch.save`` or
``mrcfile`` wraps it in another exception) becomes a one-line :class:`~.errors.InputError`::

    <path>: disk full while writing (No space left on device); free space or choose another output folder

By default the data are flushed to disk (``fsync``) before the rename, and the folder after
it, so that even a power cut leaves a complete file.

Use::

    with atomic_open(path, "w") as f:           # a file object
        f.write(text)
    with atomic_path(path, suffix=".tmp.npz") as tmp:   # libraries that want a file name
        np.savez(tmp, ...)
    atomic_write(path, lambda tmp: mrc_writer(tmp))
    write_text(path, text); save_npy(path, array); torch_save(obj, path)
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Callable, Iterator

from ..errors import InputError

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = {"no space left on device": "No space left on device",
                   "disk quota exceeded": "Disk quota exceeded"}
# Writers that hide the errno (torch's PytorchStreamWriter: "file write failed", "unexpected
# pos"; numpy's tofile: "N requested and M written") raise OSError without errno or
# RuntimeError: those are taken as "disk full" only when the destination folder really has
# almost no space left (checked before the partial temporary file is removed).
_NEARLY_FULL_BYTES = 1 << 20


def _free_bytes(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _disk_full(exc: BaseException, folder: str = ".") -> str | None:
    """The reason (e.g. 'No space left on device') when ``exc`` or an exception it wraps is a
    full disk / exceeded quota; ``None`` otherwise."""
    seen, vague = set(), False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return exc.strerror or os.strerror(exc.errno)
        text = str(exc).lower()
        for t, why in _DISK_FULL_TEXT.items():
            if t in text:
                return why
        vague = vague or isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno is None)
        exc = exc.__cause__ or exc.__context__
    if vague:
        free = _free_bytes(folder)
        if free is not None and free < _NEARLY_FULL_BYTES:
            return "No space left on device"
    return None


def disk_full_error(path: str, exc: BaseException) -> InputError | None:
    """The one-line InputError for a full disk while writing ``path`` (``None`` if ``exc`` is
    something else)."""
    why = _disk_full(exc, os.path.dirname(os.path.abspath(os.fspath(path))))
    if why is None:
        return None
    return InputError(f"{path}: disk full while writing ({why}); free space or choose another output folder")


def make_output_dir(folder, what: str = "--out") -> str:
    """Create the output folder ``folder`` (and its parents) when missing; returns its absolute
    path. InputError (one line) when it cannot: a file of that name, no permission, a full disk."""
    folder = os.path.abspath(os.fspath(folder) or ".")
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{what} {folder}: cannot create the output folder, a file of that name exists; "
                         "choose another output path") from None
    except NotADirectoryError:
        raise InputError(f"{what} {folder}: cannot create the output folder, a parent of it is a file; "
                         "choose another output path") from None
    except OSError as exc:
        raise InputError(f"{what} {folder}: cannot create the output folder "
                         f"({exc.strerror or type(exc).__name__}); choose a writable output path") from None
    if not os.path.isdir(folder):
        raise InputError(f"{what} {folder}: cannot create the output folder, a file of that name exists; "
                         "choose another output path")
    return folder


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _close_leaked_writers(exc: BaseException) -> None:
    """Finalise file objects a failed writer left open in its frames (``np.savez`` leaves its
    ZipFile open on ENOSPC), quietly: the removed temporary file's space is only freed once
    its last handle closes, and a late ``__del__`` would print errors to stderr (and, run
    inside the compiler, break later ``compile()`` calls on CPython 3.11)."""
    import gc
    import sys
    import traceback

    old = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        traceback.clear_frames(exc.__traceback__)  # finished frames only; their locals are released
        gc.collect()
    finally:
        sys.unraisablehook = old


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp", fsync: bool = True) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success rename it over ``path``.

    The body must write the complete file to the yielded name. On any exception the
    temporary file is removed and ``path`` is left as it was; a full disk is re-raised as
    :class:`InputError` (see the module docstring). ``suffix`` must keep the extension some
    writers insist on (``np.savez`` appends ``.npz`` to names without it: use ``.tmp.npz``).
    """
    path = os.fspath(path)
    tmp = path + suffix
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise RuntimeError(f"atomic write of {path}: the writer did not create {tmp}")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        err = disk_full_error(path, exc) if isinstance(exc, Exception) else None  # before freeing the space
        if err is not None:
            _close_leaked_writers(exc)
        _remove_quietly(tmp)
        if err is not None:
            raise err from None
        raise
    if fsync:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", suffix: str = ".tmp", fsync: bool = True, **kwargs) -> Iterator:
    """``open(path + suffix, mode)`` whose content replaces ``path`` when the block ends
    without an exception (see :func:`atomic_path`). ``mode`` is ``'w'``, ``'wb'``, ``'x'``..."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open needs a write mode ('w' or 'wb'), got {mode!r}")
    mode = mode.replace("x", "w")
    with atomic_path(path, suffix=suffix, fsync=False) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    if fsync:
        _fsync_dir(os.path.dirname(os.path.abspath(os.fspath(path))))


def atomic_write(path, writer_fn: Callable[[str], object], suffix: str = ".tmp", fsync: bool = True) -> None:
    """Call ``writer_fn(tmp_path)`` to write the whole file, then rename it over ``path``."""
    with atomic_path(path, suffix=suffix, fsync=fsync) as tmp:
        writer_fn(tmp)


def write_text(path, text: str, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="\n", fsync=fsync) as f:
        f.write(text)


def save_npy(path, array, fsync: bool = True) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended), atomically."""
    import numpy as np

    with atomic_open(path, "wb", fsync=fsync) as f:
        np.save(f, array)


def torch_save(obj, path, fsync: bool = True) -> None:
    """``torch.save(obj, path)`` atomically (checkpoints, trained models).

    torch writes the file itself (given a name, not a Python file object: when a Python
    file's ``write`` fails, torch 2.x leaves the interpreter's recursion counter off and later
    ``compile()`` calls fail with SystemError).
    """
    import torch

    with atomic_path(path, fsync=fsync) as tmp:
        torch.save(obj, tmp)


def reserve_space(path) -> None:
    """Allocate a (memory-mapped) file's blocks now with ``posix_fallocate``, so that a full
    disk is an ENOSPC here (an InputError through :func:`atomic_path`) rather than a SIGBUS when
    a page of the map is written. A file system that cannot preallocate (EOPNOTSUPP, EINVAL) is
    left as it is."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _DISK_FULL_ERRNOS:
            raise
    finally:
        os.close(fd)
