"""How ``make bench`` measures: counterbalanced pairs, floors, and a process tree's memory.

- :func:`abba` runs two sides in counterbalanced pairs (A B, B A, A B, ...), so neither gets
  the fresher disk or the warmer cache, and keeps each side's wall and CPU seconds.
- :func:`floor_copy` is the simplest program that does strictly less than skyferry's binary
  run: the source read once, BLAKE3 of its bytes on every core, R copies written with early
  writeback and made durable with ``fdatasync``. No chunking, manifests or verification.
- :class:`TreeSampler` samples the proportional set size (PSS, from
  ``/proc/PID/smaps_rollup``) of a process and every descendant, summed, every few ms; its
  peak is the tree's peak memory, with shared pages counted once. A child (Prefect's API
  server) is counted like any other.
- :func:`evict` drops a file's pages from the page cache (``posix_fadvise(DONTNEED)``), so a
  read is a cold one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Side", "TreeSampler", "abba", "cpu_seconds", "evict", "floor_copy", "skyferry_home",
           "tree_pss_kb"]

MIB = 1 << 20


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Side:
    """One side of a comparison: each run's wall and CPU seconds."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], object]) -> float:
        cpu, started = cpu_seconds(), time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        self.wall.append(elapsed)
        self.cpu.append(cpu_seconds() - cpu)
        return elapsed

    @property
    def min(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def max(self) -> float:
        return max(self.wall)

    def summary(self) -> dict[str, float | None]:
        cpu = round(statistics.median(self.cpu), 3) if self.cpu else None
        return {"min_s": round(self.min, 3), "median_s": round(self.median, 3),
                "max_s": round(self.max, 3), "cpu_s": cpu}

    def line(self) -> str:
        cpu = f"; CPU {statistics.median(self.cpu):.1f} s" if self.cpu else ""
        return (f"{self.name} {self.min:.2f}/{self.median:.2f}/{self.max:.2f} s "
                f"(min/median/max of {len(self.wall)}{cpu})")


def abba(a: tuple[str, Callable[[], object]], b: tuple[str, Callable[[], object]],
         pairs: int = 5, between: Callable[[], object] | None = None) -> tuple[Side, Side]:
    """``pairs`` pairs of runs, counterbalanced: A B, B A, A B, ... ``between`` runs untimed
    after every run (delete its output, sync)."""
    sides = Side(a[0]), Side(b[0])
    fns = a[1], b[1]
    for i in range(pairs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            sides[k].run(fns[k])
            if between is not None:
                between()
    return sides


def _writeback() -> Callable[[int, int, int], None]:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd, offset, length: call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


_start_writeback = _writeback()


@dataclass(frozen=True)
class FloorResult:
    digest: str
    bytes_read: int
    bytes_written: int


def floor_copy(src: Path, targets: Iterable[Path], block: int = 16 * MIB,
               writeback_every: int = 32 * MIB) -> FloorResult:
    """Read ``src`` once; hash it with BLAKE3 on every core; write each block to every target,
    one thread per target, while the next block is read and hashed (two buffers); start each
    target's writeback every ``writeback_every`` bytes; ``fdatasync`` the targets at once."""
    from concurrent.futures import ThreadPoolExecutor

    import blake3

    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    paths = list(targets)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]
    flushed = [0] * len(fds)
    read = 0

    def write(i: int, data: memoryview, at: int) -> None:
        done = 0
        while done < len(data):
            done += os.write(fds[i], data[done:])
        if at + len(data) - flushed[i] >= writeback_every:
            _start_writeback(fds[i], flushed[i], at + len(data) - flushed[i])
            flushed[i] = at + len(data)

    try:
        with open(src, "rb", buffering=0) as fh, \
                ThreadPoolExecutor(max_workers=len(fds)) as pool:
            buffers = [bytearray(block), bytearray(block)]
            pending: list[Any] = []
            turn = 0
            while n := fh.readinto(buffers[turn]):
                data = memoryview(buffers[turn])[:n]
                hasher.update(data)
                for future in pending:  # the other buffer's writes end before it is reused
                    future.result()
                pending = [pool.submit(write, i, data, read) for i in range(len(fds))]
                read += n
                turn = 1 - turn
            for future in pending:
                future.result()
            list(pool.map(os.fdatasync, fds))
    finally:
        for fd in fds:
            os.close(fd)
    return FloorResult(hasher.hexdigest(), read, read * len(fds))


def evict(paths: Iterable[Path]) -> int:
    """Drop each file's pages from the page cache (written back first); the bytes evicted."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def tree_pss_kb(pid: int) -> dict[int, int]:
    """The PSS (KiB) of ``pid`` and each of its descendants, now."""
    return {p: _pss_kb(p) for p in [pid, *_children(pid)]}


class TreeSampler:
    """Samples a process tree's summed PSS every ``every`` s on a thread, until stopped.

    ``peak_mb``: the largest sum seen; ``share_mb``: at that moment, the PSS of the processes
    whose command line contains one of ``label`` (Prefect's API server, say). ``also`` names
    further processes to count with their trees, asked at each sample: a server that the
    command uses but that is not its child."""

    def __init__(self, pid: int, every: float = 0.02, label: str | tuple[str, ...] | None = None,
                 also: Callable[[], Iterable[int]] | None = None) -> None:
        self.pid, self.every, self.also = pid, every, also
        self.label = (label,) if isinstance(label, str) else label
        self.peak_kb = 0
        self.share_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-sampler")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        sizes = tree_pss_kb(self.pid)
        for pid in self.also() if self.also is not None else ():
            sizes.update(tree_pss_kb(pid))
        total = sum(sizes.values())
        self.samples += 1
        if total > self.peak_kb:
            self.peak_kb = total
            if self.label is not None:
                self.share_kb = sum(kb for p, kb in sizes.items()
                                    if any(name in _cmdline(p) for name in self.label))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024

    @property
    def share_mb(self) -> float:
        return self.share_kb / 1024


@contextlib.contextmanager
def skyferry_home(home: Path) -> Iterator[Path]:
    """skyferry's settings pointed at ``home`` (writes not flushed: the page cache is the
    disk here) for the block, and back to the caller's after it."""
    from skyferry.config import get_settings

    saved = {k: os.environ.get(k) for k in ("SKYFERRY_HOME", "SKYFERRY_DURABLE_WRITES")}
    os.environ["SKYFERRY_HOME"] = str(home)
    os.environ["SKYFERRY_DURABLE_WRITES"] = "false"
    get_settings.cache_clear()
    try:
        yield home
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
