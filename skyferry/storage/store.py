"""The one way skyferry reaches storage: a :class:`Store` rooted at an fsspec URL.

Every key is checked by :func:`~skyferry.storage.keys.safe_key` before it touches a backend,
so no key can escape its store's root. Every call has a deadline and can be cancelled.
Backend errors are translated into the :class:`~skyferry.errors.StorageError` family,
naming the node and the key (:mod:`skyferry.storage.errors`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import mmap
import os
import posixpath
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from skyferry.errors import NodeUnavailableError
from skyferry.hashing import new_hasher
from skyferry.storage import local
from skyferry.storage.errors import translating
from skyferry.storage.keys import safe_key
from skyferry.storage.uploads import ObjectWriter

__all__ = ["ObjectInfo", "Store", "open_url"]

logger = logging.getLogger("skyferry.storage")


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """Resolve a URL or local path to ``(filesystem, path)`` through ``fsspec.url_to_fs``."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None


class Store:
    """A node, catalog or staging area: an fsspec filesystem plus a root path."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        name: str,
        timeout_s: float | None = None,
        durable: bool = True,
    ) -> None:
        self.url = url
        self.name = name
        self.timeout_s = timeout_s
        self.durable = durable  # local writes: flushed (fsync) before they count
        self.fs, root = open_url(url, storage_options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if getattr(self.fs, "async_impl", False):
            _quiet_abandoned_requests(self.fs.loop)
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._calls_lock = threading.Lock()

    def _limit(self, nbytes: int = 0) -> float:
        """How long one backend call may take before it is cancelled: three of its node's
        timeouts (a backend retries inside a call) plus 1 s per MB it moves."""
        return 3 * (self.timeout_s or 30.0) + nbytes / 1e6

    def call(self, method: str, *args: Any, nbytes: int = 0, **kwargs: Any) -> Any:
        """``fs.<method>(*args, **kwargs)``, cancelled once it passes :meth:`_limit`.

        An async backend (s3fs, gcsfs, adlfs) runs the call's coroutine on its loop under
        a deadline, and :meth:`cancel` can stop it early; either way the coroutine is
        cancelled, so the calling thread is freed instead of waiting on a server that
        stopped answering. A local or sync filesystem is called directly.
        """
        coroutine: Callable[..., Any] | None = getattr(self.fs, f"_{method}", None)
        if not getattr(self.fs, "async_impl", False) or coroutine is None:
            return getattr(self.fs, method)(*args, **kwargs)
        return self.run(coroutine(*args, **kwargs), method, nbytes)

    def run(self, coroutine: Any, what: str, nbytes: int = 0) -> Any:
        """Run a coroutine of the backend on its loop under :meth:`_limit`; :meth:`cancel`
        stops it."""
        limit = self._limit(nbytes)
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, limit),
                                                  self.fs.loop)
        with self._calls_lock:
            self._calls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise NodeUnavailableError(f"a call to node {self.name} was cancelled: the node "
                                       "was marked down, or the run ended", node=self.name
                                       ) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"{what} took longer than {limit:.0f}s") from None
        finally:
            with self._calls_lock:
                self._calls.discard(future)

    def cancel(self) -> int:
        """Cancel every backend call in flight on this store; returns how many there were."""
        with self._calls_lock:
            calls = list(self._calls)
        for future in calls:
            future.cancel()
        return len(calls)

    def __repr__(self) -> str:
        return f"Store(name={self.name!r}, url={self.url!r})"

    def path(self, key: str) -> str:
        return f"{self.root}/{safe_key(key)}"

    def url_of(self, key: str) -> str:
        """The object's full URL (``file://``, ``s3://`` ...), for another tool to open."""
        return str(self.fs.unstrip_protocol(self.path(key)))

    def _errors(self, key: str | None, action: str) -> contextlib.AbstractContextManager[None]:
        """Backend errors of the block as StorageErrors naming this node and ``key``."""
        return translating(self.name, key, action)

    def put(self, key: str, data: bytes | memoryview, *, flush: bool | None = None) -> None:
        """Write ``data`` under ``key``. On a local disk the write is atomic and durable: a
        temp file, flushed (``fsync``), renamed over the key, and the folder flushed, so a
        replica or manifest that counts as written survives a power loss (unless the store
        was opened with ``durable=False``, or ``flush`` is False: atomic only)."""
        path = self.path(key)
        durable = self.durable if flush is None else flush
        with self._errors(key, "write"):
            if self.is_local:
                parent = posixpath.dirname(path)
                tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
                try:
                    try:
                        fh = open(tmp, "wb")
                    except FileNotFoundError:  # the first object under this prefix
                        local.make_dirs_durable(parent, durable)
                        fh = open(tmp, "wb")
                    with fh:
                        fh.write(data)
                        if durable:
                            fh.flush()
                            os.fsync(fh.fileno())
                    os.replace(tmp, path)
                    if durable:
                        local.fsync_dir(parent)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            else:
                self.call("pipe_file", path,
                           bytes(data) if isinstance(data, memoryview) else data,
                           nbytes=len(data))

    def writer(self, key: str, *, flush: bool | None = None) -> ObjectWriter:
        """A streamed write of ``key``: blocks in, one object out, visible only on
        :meth:`ObjectWriter.commit` (a local temp file renamed over the key; an S3 multipart,
        GCS resumable or Azure block upload completed)."""
        return ObjectWriter(self, key, self.durable if flush is None else flush)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` under ``key`` only if nothing is there; whether it was written.

        Exclusive everywhere: of writers at the same moment, one succeeds, and a reader
        sees the object whole or not at all. On a local disk a temp file hard-linked to the
        key; on S3, GCS and Azure the store's own precondition (``If-None-Match: *``,
        ``ifGenerationMatch=0``), through fsspec's ``mode="create"``.
        """
        path = self.path(key)
        with self._errors(key, "create"):
            if self.is_local:
                # whole or not at all: a temp file, then a hard link to the key, which fails
                # when the key exists (an O_EXCL create would show an empty file meanwhile)
                parent = posixpath.dirname(path)
                local.make_dirs_durable(parent, self.durable)
                tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
                try:
                    with open(tmp, "xb") as fh:
                        fh.write(data)
                        if self.durable:
                            fh.flush()
                            os.fsync(fh.fileno())
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                if self.durable:
                    local.fsync_dir(parent)
                return True
            try:
                self.call("pipe_file", path, data, mode="create", nbytes=len(data))
            except FileExistsError:
                return False
            except OSError as exc:  # S3's refusal: 412 Precondition Failed
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    return False
                raise
            return True

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._errors(key, "read"):
            if self.is_local and start is None and end is None:  # no fsspec file object
                with open(self.path(key), "rb") as fh:
                    return fh.read()
            data: bytes = self.call("cat_file", self.path(key), start=start, end=end,
                                     nbytes=(end or 0) - (start or 0) or 64 << 20)
            return data

    def digest_of(self, key: str, *, block: int = 8 << 20) -> tuple[str, int]:
        """Stream an object through the content hash in ``block``-sized reads.

        Returns ``(hexdigest, size)``; memory stays at one block whatever the object's size.
        A local file is hashed through read-only mappings of the page cache instead, one
        ``block``-sized window at a time: no copy into Python, about half the CPU of reading
        it. Each window is unmapped before the next is mapped, so a replica's pages count
        toward this process's resident memory one window at a time, not a whole chunk each.
        skyferry never rewrites a file in place (a put is a new file renamed over the key),
        so a mapped replica cannot shrink under the hash; only an outside truncation could.
        """
        digest = new_hasher()
        size = 0
        if self.is_local:
            window = max(mmap.ALLOCATIONGRANULARITY,
                         block // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY)
            with self._errors(key, "read"):
                with open(self.path(key), "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    for offset in range(0, size, window):
                        length = min(window, size - offset)
                        with (mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ,
                                        offset=offset) as mapped,
                              memoryview(mapped) as view):
                            digest.update(view)
            return digest.hexdigest(), size
        with self._errors(key, "read"):  # ranged reads, each one a call with its own deadline
            path = self.path(key)
            total = int(self.call("info", path)["size"])
            for offset in range(0, total, block):
                data = self.call("cat_file", path, start=offset,
                                  end=min(offset + block, total), nbytes=block)
                digest.update(data)
                size += len(data)
        return digest.hexdigest(), size

    def stored_md5(self, key: str) -> tuple[int, str | None]:
        """``(size, md5 hex)`` as the store itself computed them on upload.

        S3 reports it as the ETag of a single-part upload, GCS as ``md5Hash``, Azure as
        ``content_md5`` of a single-shot upload. ``None`` when the store has no such checksum
        (local disks, multipart uploads): then a replica must be read back to be verified.
        """
        path = self.path(key)
        with self._errors(key, "stat"):
            self.fs.invalidate_cache(path)
            info = self.call("info", path)
        size = int(info.get("size") or 0)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if self.fs.protocol[0] in ("s3", "s3a") and etag and "-" not in etag:
            return size, etag.lower()
        md5_b64 = info.get("md5Hash")
        if md5_b64:
            return size, base64.b64decode(md5_b64).hex()
        settings = info.get("content_settings") or {}
        md5_raw = settings.get("content_md5") if isinstance(settings, dict) else getattr(
            settings, "content_md5", None)
        if md5_raw:
            return size, bytes(md5_raw).hex()
        return size, None

    def size(self, key: str) -> int:
        with self._errors(key, "stat"):
            return int(self.call("info", self.path(key))["size"])

    def exists(self, key: str) -> bool:
        with self._errors(key, "check"):
            return bool(self.call("exists", self.path(key)))

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"), contextlib.suppress(FileNotFoundError):
            self.call("rm_file", self.path(key))

    def names(self, prefix: str) -> list[str]:
        """The names directly under ``prefix`` (one level: objects and folders), in no
        order; none when there is nothing there. No sizes and no recursion, so much cheaper
        than :meth:`list` on a folder of many objects."""
        base = self.path(prefix)
        with self._errors(prefix, "list"):
            try:
                if self.is_local:
                    return os.listdir(base)
                self.fs.invalidate_cache(base)
                found = self.call("ls", base, detail=False)
            except FileNotFoundError:
                return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in found if p.rstrip("/") != base]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object below ``prefix`` (recursive), with its size and mtime."""
        base = self.path(prefix) if prefix else self.root
        with self._errors(prefix, "list"):
            self.fs.invalidate_cache()
            if not self.call("exists", base):
                return
            found = self.call("find", base, detail=True)
        root_len = len(self.root) + 1
        for path, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            yield ObjectInfo(
                key=path[root_len:] if path.startswith(self.root) else path,
                size=int(info.get("size") or 0),
                mtime=_mtime(info),
            )

    def probe(self, on_step: Callable[[], None] | None = None) -> float:
        """Write, read back and delete a sentinel object; return the round trip in seconds.
        ``on_step`` is called after the write and after the read."""
        import time

        key = f"_probe/{uuid.uuid4().hex}"
        # text ending in a newline: random bytes end in CR one time in 256, and the GCS
        # emulator drops a final CR from an upload, which made the probe call it down
        payload = f"skyferry probe {uuid.uuid4().hex}\n".encode()
        started = time.perf_counter()
        self.put(key, payload, flush=False)  # liveness, not durability: no fsync to wait on
        if on_step is not None:
            on_step()
        if self.get(key) != payload:
            raise NodeUnavailableError(
                f"probe of node {self.name} read back different bytes", node=self.name, key=key
            )
        if on_step is not None:
            on_step()
        self.delete(key)
        return time.perf_counter() - started


def _quiet_abandoned_requests(loop: asyncio.AbstractEventLoop) -> None:
    """Log at debug level, not as a traceback on stderr, the connection errors of requests
    that were abandoned (a call cancelled, a connection reset by a failing node): nobody
    awaits them any more, and the call that did has already reported the failure."""
    if getattr(loop, "_skyferry_quiet", False):
        return

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, OSError)) or type(exc).__name__.startswith(
                ("ClientConnection", "ServerDisconnected")):
            logger.debug("an abandoned request ended with %s: %s", type(exc).__name__, exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    loop._skyferry_quiet = True  # type: ignore[attr-defined]


def _mtime(info: Mapping[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
    return None
