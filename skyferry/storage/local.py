"""Durability on a local disk: flushing folders, making folders durably, and starting a
file's writeback early (Linux's ``sync_file_range``), through ctypes."""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
from collections.abc import Callable

__all__ = ["fsync_dir", "make_dirs_durable", "start_writeback"]


def _writeback_call() -> Callable[[int, int, int], None]:
    """Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range of a file
    back to disk, without waiting for it. Elsewhere, ``fdatasync`` (which waits)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: os.fdatasync(fd)
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        if call(fd, offset, length, 2) != 0:  # 2: SYNC_FILE_RANGE_WRITE
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP):
                os.fdatasync(fd)  # a filesystem without it: flush, and wait
                return
            raise OSError(code, os.strerror(code))

    return start


start_writeback = _writeback_call()


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a file renamed or created in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: str, durable: bool = True) -> None:
    """``os.makedirs``, with each new folder's parent flushed (``durable``) so the folder
    itself survives."""
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        head = posixpath.dirname(head)
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        if durable:
            fsync_dir(posixpath.dirname(folder) or "/")
