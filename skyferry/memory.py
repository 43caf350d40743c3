"""Keep big buffers' memory in the process, so each chunk does not pay for fresh pages.

A chunk's bytes are one allocation of tens of MB. glibc serves any allocation over 32 MB
with a fresh ``mmap`` and gives it back on free, so every chunk faults in new, zeroed pages.
On the 2-core VMs we measure on that costs about 0.2 s per 64 MB read, against 0.045 s once
the allocator keeps the memory (``tune_allocator``). Memory stays bounded: the window of chunks
in flight bounds what is live, and freed blocks are reused, not multiplied.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading

__all__ = ["tune_allocator"]

logger = logging.getLogger("skyferry.memory")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False
_lock = threading.Lock()


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 2 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds, once per process; False where not glibc."""
    global _done
    with _lock:
        if _done:
            return True
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1)
        except (OSError, AttributeError) as exc:
            logger.debug("cannot tune the allocator: %s", exc)
            return False
        _done = ok
        return ok
