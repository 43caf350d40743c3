"""Keep big buffers' memory in the process, so each chunk does not pay for fresh pages.

A chunk's bytes are one allocation of tens of MB. glibc serves an allocation that large with a
fresh ``mmap`` and gives it back on free, so every chunk faults in new, zeroed pages, which
costs several times the read itself on small VMs. Two things decide it:

- the mmap threshold (32 MB at most by default), above which glibc maps instead of reusing;
- the arena. Chunks are read in worker threads, and glibc gives threads their own arenas,
  whose heaps are at most 64 MB each: a 64 MB chunk can never come from one, so it is mapped
  fresh whatever the threshold. With one arena every thread allocates from the main heap,
  where freed chunk buffers are reused (``docs/benchmarks.md`` has the page faults).

Memory stays bounded: the window of chunks in flight bounds what is live, and freed blocks are
reused, not multiplied. The arena limit only binds threads that have not allocated yet, so
:func:`tune_allocator` is called before a run starts its threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import platform
import threading
from collections.abc import Iterator

__all__ = ["many_objects", "tune_allocator"]

logger = logging.getLogger("skyferry.memory")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = False
_lock = threading.Lock()


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 2 << 30,
                   arenas: int = 1) -> bool:
    """Raise glibc's mmap and trim thresholds and cap its arenas, once per process.

    Returns False where the C library is not glibc (nothing is changed there).
    """
    global _done
    with _lock:
        if _done:
            return True
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
                  and libc.mallopt(_M_ARENA_MAX, arenas) == 1)
        except (OSError, AttributeError) as exc:
            logger.debug("cannot tune the allocator: %s", exc)
            return False
        _done = ok
        return ok


@contextlib.contextmanager
def many_objects() -> Iterator[None]:
    """Pause Python's cycle collector while many lasting objects are made at once (a long
    snapshot's manifests and its read plan).

    Each collection of the oldest generation walks every live object, and making 10,000
    manifests sets off many of them: they were more than half of opening such a snapshot.
    Reference counting still frees what is dropped meanwhile; the collector resumes after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
