"""The allocator tuning: a worker thread's chunk-sized buffers reuse memory, not fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt tuning is glibc-only",
)

PAGES = 16_385  # one 64 MiB chunk and a page: larger than a thread arena's heap

# A new process each time: arenas are per process, and this one already has threads.
SCRIPT = """
import resource, sys, threading
from skyferry.memory import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
faults = []
def work():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buf = bytearray({size})  # zero-filled, so every page is touched
        del buf
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(" ".join(map(str, faults)))
""".format(size=PAGES * 4096)


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return [int(n) for n in out.stdout.split()]


def test_a_worker_threads_chunk_buffers_reuse_their_pages_once_tuned() -> None:
    tuned = _faults("tuned")
    # the first buffer grows the heap; the next five reuse it
    assert tuned[0] >= PAGES // 2
    assert max(tuned[1:]) < PAGES // 20


def test_without_tuning_every_chunk_buffer_faults_in_fresh_pages() -> None:
    # the baseline the tuning is measured against: glibc maps each one anew in a thread
    assert min(_faults("default")[1:]) > PAGES // 2
