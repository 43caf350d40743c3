"""The one way skyferry reaches storage: a :class:`Store` rooted at an fsspec URL.

Every key is checked by :func:`safe_key` before it touches a backend, so no key can escape
its store's root. Backend errors are translated into the :class:`~skyferry.errors.StorageError`
family, naming the node and the key.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from skyferry.errors import (
    AccessDeniedError,
    NodeUnavailableError,
    ObjectNotFoundError,
    StorageError,
    UnsafeKeyError,
)
from skyferry.hashing import new_hasher
from skyferry.secrets import scrub

__all__ = ["PART_SIZE", "ObjectInfo", "ObjectWriter", "Store", "open_url", "safe_key",
           "temp_target"]

logger = logging.getLogger("skyferry.storage")

# A streamed upload's part (S3 multipart, GCS resumable, Azure block): S3's smallest part
# is 5 MiB, GCS wants a multiple of 256 KiB.
PART_SIZE = 8 << 20
FLUSH_EVERY = 32 << 20  # a durable local write starts writing back every this many bytes

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_DENIED_CODES = ("AccessDenied", "AuthorizationFailure", "AuthenticationFailed",
                 "AuthorizationPermissionMismatch", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "Forbidden")


def safe_key(*parts: str) -> str:
    """Join key parts with ``/`` and refuse anything that could leave the store's root.

    >>> safe_key("train", "date=2026-01-01", "chunk-00000.parquet")
    'train/date=2026-01-01/chunk-00000.parquet'
    """
    key = "/".join(p for p in parts if p)
    segments = key.split("/")
    if (
        not key
        or any(s in ("", ".", "..") for s in segments)
        or _BAD_CHARS.search(key)
        or ":" in segments[0]
    ):
        raise UnsafeKeyError(f"unsafe object key {key!r}: it must stay inside its prefix", key=key)
    return key


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

    def _call(self, method: str, *args: Any, nbytes: int = 0, **kwargs: Any) -> Any:
        """``fs.<method>(*args, **kwargs)``, cancelled once it passes :meth:`_limit`.

        An async backend (s3fs, gcsfs, adlfs) runs the call's coroutine on its loop under
        a deadline, and :meth:`cancel` can stop it early; either way the coroutine is
        cancelled, so the calling thread is freed instead of waiting on a server that
        stopped answering. A local or sync filesystem is called directly.
        """
        coroutine: Callable[..., Any] | None = getattr(self.fs, f"_{method}", None)
        if not getattr(self.fs, "async_impl", False) or coroutine is None:
            return getattr(self.fs, method)(*args, **kwargs)
        return self._await(coroutine(*args, **kwargs), method, nbytes)

    def _await(self, coroutine: Any, what: str, nbytes: int = 0) -> Any:
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

    def _translate(self, exc: BaseException, key: str | None, action: str) -> StorageError:
        """Map a backend's error into the StorageError family, naming the node and the key.

        s3fs, gcsfs and adlfs raise different types for the same failure; the HTTP status
        and the cloud's error code tell them apart. Only the first line of the backend's
        message is kept: enough to act on, and no request dumps.
        """
        where = f"{action} {key!r} on node {self.name}" if key else f"{action} on node {self.name}"
        if isinstance(exc, StorageError):
            return exc
        detail = scrub(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" if str(
            exc).strip() else type(exc).__name__)
        status = getattr(exc, "status_code", None) or getattr(
            getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, PermissionError) or status in (401, 403) or any(
                code in str(exc) for code in _DENIED_CODES):
            return AccessDeniedError(f"access denied: {where}: {detail}", node=self.name,
                                     key=key)
        if isinstance(exc, FileNotFoundError) or status == 404 or "NoSuchBucket" in str(exc):
            return ObjectNotFoundError(f"not found: {where}: {detail}", node=self.name, key=key)
        return NodeUnavailableError(f"failed to {where}: {detail}", node=self.name, key=key)

    def put(self, key: str, data: bytes | memoryview, *, flush: bool | None = None) -> None:
        """Write ``data`` under ``key``. On a local disk the write is atomic and durable: a
        temp file, flushed (``fsync``), renamed over the key, and the folder flushed, so a
        replica or manifest that counts as written survives a power loss (unless the store
        was opened with ``durable=False``, or ``flush`` is False: atomic only)."""
        path = self.path(key)
        durable = self.durable if flush is None else flush
        try:
            if self.is_local:
                parent = posixpath.dirname(path)
                tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
                try:
                    try:
                        fh = open(tmp, "wb")
                    except FileNotFoundError:  # the first object under this prefix
                        _make_dirs_durable(parent, durable)
                        fh = open(tmp, "wb")
                    with fh:
                        fh.write(data)
                        if durable:
                            fh.flush()
                            os.fsync(fh.fileno())
                    os.replace(tmp, path)
                    if durable:
                        _fsync_dir(parent)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            else:
                self._call("pipe_file", path,
                           bytes(data) if isinstance(data, memoryview) else data,
                           nbytes=len(data))
        except Exception as exc:
            raise self._translate(exc, key, "write") from exc

    def writer(self, key: str, *, flush: bool | None = None) -> ObjectWriter:
        """A streamed write of ``key``: blocks in, one object out, visible only on
        :meth:`ObjectWriter.commit` (a local temp file renamed over the key; an S3 multipart,
        GCS resumable or Azure block upload completed)."""
        return ObjectWriter(self, key, self.durable if flush is None else flush)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` under ``key`` only if nothing is there; whether it was written.

        Exclusive on a local disk (``O_EXCL``). On an object store it checks, then writes:
        two writers at the same moment can both succeed, and the later one's bytes stay.
        """
        path = self.path(key)
        try:
            if self.is_local:
                _make_dirs_durable(posixpath.dirname(path), self.durable)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    if self.durable:
                        fh.flush()
                        os.fsync(fh.fileno())
                if self.durable:
                    _fsync_dir(posixpath.dirname(path))
                return True
            if self._call("exists", path):
                return False
            self._call("pipe_file", path, data, nbytes=len(data))
            return True
        except Exception as exc:
            raise self._translate(exc, key, "create") from exc

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            data: bytes = self._call("cat_file", self.path(key), start=start, end=end,
                                     nbytes=(end or 0) - (start or 0) or 64 << 20)
            return data
        except Exception as exc:
            raise self._translate(exc, key, "read") from exc

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
            try:
                with open(self.path(key), "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    for offset in range(0, size, window):
                        length = min(window, size - offset)
                        with (mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ,
                                        offset=offset) as mapped,
                              memoryview(mapped) as view):
                            digest.update(view)
            except Exception as exc:
                raise self._translate(exc, key, "read") from exc
            return digest.hexdigest(), size
        try:  # ranged reads, each one a call with its own deadline
            path = self.path(key)
            total = int(self._call("info", path)["size"])
            for offset in range(0, total, block):
                data = self._call("cat_file", path, start=offset,
                                  end=min(offset + block, total), nbytes=block)
                digest.update(data)
                size += len(data)
        except Exception as exc:
            raise self._translate(exc, key, "read") from exc
        return digest.hexdigest(), size

    def stored_md5(self, key: str) -> tuple[int, str | None]:
        """``(size, md5 hex)`` as the store itself computed them on upload.

        S3 reports it as the ETag of a single-part upload, GCS as ``md5Hash``, Azure as
        ``content_md5`` of a single-shot upload. ``None`` when the store has no such checksum
        (local disks, multipart uploads): then a replica must be read back to be verified.
        """
        path = self.path(key)
        try:
            self.fs.invalidate_cache(path)
            info = self._call("info", path)
        except Exception as exc:
            raise self._translate(exc, key, "stat") from exc
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
        try:
            return int(self._call("info", self.path(key))["size"])
        except Exception as exc:
            raise self._translate(exc, key, "stat") from exc

    def exists(self, key: str) -> bool:
        try:
            return bool(self._call("exists", self.path(key)))
        except Exception as exc:
            raise self._translate(exc, key, "check") from exc

    def delete(self, key: str) -> None:
        try:
            self._call("rm_file", self.path(key))
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._translate(exc, key, "delete") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object below ``prefix`` (recursive), with its size and mtime."""
        base = self.path(prefix) if prefix else self.root
        try:
            self.fs.invalidate_cache()
            if not self._call("exists", base):
                return
            found = self._call("find", base, detail=True)
        except Exception as exc:
            raise self._translate(exc, prefix, "list") from exc
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


class _Upload:
    """One object store's multipart upload, as coroutines on the backend's loop: S3's
    multipart upload, GCS's resumable upload, Azure's staged blocks. An object of one part
    or less is one plain upload (``pipe_file``) instead."""

    def __init__(self, store: Store, path: str) -> None:
        self.fs, self.path = store.fs, path
        self.parts: list[Any] = []

    async def start(self) -> None:
        raise NotImplementedError

    async def part(self, offset: int, data: bytes, total: int | None) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        raise NotImplementedError

    async def abort(self) -> None:
        return None


class _S3Upload(_Upload):
    async def start(self) -> None:
        self.bucket, self.key, _ = self.fs.split_path(self.path)
        made = await self.fs._call_s3("create_multipart_upload", Bucket=self.bucket,
                                      Key=self.key)
        self.upload_id = made["UploadId"]

    async def part(self, offset: int, data: bytes, total: int | None) -> None:
        number = len(self.parts) + 1
        out = await self.fs._call_s3("upload_part", Bucket=self.bucket, Key=self.key,
                                     PartNumber=number, UploadId=self.upload_id, Body=data)
        self.parts.append({"PartNumber": number, "ETag": out["ETag"]})

    async def finish(self) -> None:
        await self.fs._call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                               UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
        self.fs.invalidate_cache(self.path)

    async def abort(self) -> None:
        if getattr(self, "upload_id", None):
            await self.fs._call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                                   UploadId=self.upload_id)


class _GCSUpload(_Upload):
    async def start(self) -> None:
        from gcsfs.core import initiate_upload

        bucket, key, _ = self.fs.split_path(self.path)
        self.location = await initiate_upload(self.fs, bucket, key)

    async def part(self, offset: int, data: bytes, total: int | None) -> None:
        sent = 0
        while sent < len(data):  # the server may take less than it was sent: send the rest
            piece = data[sent:]
            end = offset + sent + len(piece) - 1
            headers, _ = await self.fs._call(
                "POST", self.location, data=piece, headers={
                    "Content-Range": f"bytes {offset + sent}-{end}/"
                                     f"{total if total is not None else '*'}",
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(piece))})
            if "Range" not in headers:
                return
            sent = int(headers["Range"].split("-")[1]) + 1 - offset

    async def finish(self) -> None:
        self.fs.invalidate_cache(self.path)

    async def abort(self) -> None:
        if getattr(self, "location", None):
            await self.fs._call("DELETE", self.location)


class _AzureUpload(_Upload):
    async def start(self) -> None:
        self.container, self.blob, _ = self.fs.split_path(self.path)

    async def part(self, offset: int, data: bytes, total: int | None) -> None:
        block_id = base64.b64encode(f"{len(self.parts):08d}".encode()).decode()
        async with self.fs.service_client.get_blob_client(self.container, self.blob) as blob:
            await blob.stage_block(block_id=block_id, data=data, length=len(data))
        self.parts.append(block_id)

    async def finish(self) -> None:
        from azure.storage.blob import BlobBlock

        async with self.fs.service_client.get_blob_client(self.container, self.blob) as blob:
            await blob.commit_block_list([BlobBlock(block_id=b) for b in self.parts])
        self.fs.invalidate_cache(self.path)


_UPLOADS: dict[str, type[_Upload]] = {"s3": _S3Upload, "s3a": _S3Upload, "gs": _GCSUpload,
                                      "gcs": _GCSUpload, "az": _AzureUpload,
                                      "abfs": _AzureUpload, "abfss": _AzureUpload}


class ObjectWriter:
    """One object written as a stream of blocks, holding at most one part in memory.

    A local object is a temp file renamed over the key on :meth:`commit`. On S3, GCS and
    Azure, parts of :data:`PART_SIZE` go up as a multipart, resumable or block upload
    (each call with a deadline, cancelled by :meth:`Store.cancel`), completed on
    :meth:`commit`; an object of one part or less is one plain upload.

    It computes, as the bytes pass, the checksum its backend computes over the whole object,
    so that :meth:`checksum_matches` can verify the upload with one metadata call: S3's
    ETag (the MD5 of a plain upload; of a multipart upload, the MD5 of its parts' MD5s and
    ``-N``) and GCS's ``md5Hash``. Azure keeps none for a block upload, and a local file
    has none: those are read back.
    """

    def __init__(self, store: Store, key: str, durable: bool) -> None:
        self.store, self.key, self.durable = store, key, durable
        self.path = store.path(key)
        self.size = 0
        protocol = store.fs.protocol[0] if isinstance(store.fs.protocol, tuple) else str(
            store.fs.protocol)
        self._md5 = hashlib.md5(usedforsecurity=False) if protocol in ("gs", "gcs") else None
        self._parts: list[bytes] | None = [] if protocol in ("s3", "s3a") else None
        self._pending = bytearray()  # bytes not yet sent (object stores)
        self._sent = 0
        self._flushed = 0  # bytes of a local temp file already flushed to disk
        self._upload: _Upload | None = None
        self._fh: Any = None
        self._tmp: str | None = None
        kind = _UPLOADS.get(protocol) if getattr(store.fs, "async_impl", False) else None
        try:
            if store.is_local:
                parent = posixpath.dirname(self.path)
                self._tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(self.path)}"
                try:
                    self._fh = open(self._tmp, "wb")
                except FileNotFoundError:  # the first object under this prefix
                    _make_dirs_durable(parent, durable)
                    self._fh = open(self._tmp, "wb")
            elif kind is not None:
                self._upload = kind(store, self.path)
            else:  # another filesystem: its own buffered writer
                self._fh = store.fs.open(self.path, "wb")
        except Exception as exc:
            raise store._translate(exc, key, "write") from exc

    def write(self, block: bytes | memoryview) -> None:
        """Append ``block``; an object store gets whole parts of :data:`PART_SIZE`, and the
        last part is held back until :meth:`commit`."""
        try:
            self.size += len(block)
            if self._tmp is not None:
                self._fh.write(block)
                if self.durable and self.size - self._flushed >= FLUSH_EVERY:
                    # written back as it goes, so the commit's flush has little left to wait on
                    self._fh.flush()
                    _start_writeback(self._fh.fileno(), self._flushed, self.size - self._flushed)
                    self._flushed = self.size
                return
            self._pending += block
            while len(self._pending) > PART_SIZE:
                self._send(bytes(self._pending[:PART_SIZE]), last=False)
                del self._pending[:PART_SIZE]
        except Exception as exc:
            raise self.store._translate(exc, self.key, "write") from exc

    def _send(self, part: bytes, last: bool) -> None:
        if self._md5 is not None:
            self._md5.update(part)
        if self._parts is not None:
            self._parts.append(hashlib.md5(part, usedforsecurity=False).digest())
        if self._upload is None:
            self._fh.write(part)
        else:
            if self._sent == 0:
                self.store._await(self._upload.start(), "start an upload")
            total = self._sent + len(part) if last else None
            self.store._await(self._upload.part(self._sent, part, total), "upload a part",
                              len(part))
        self._sent += len(part)

    def commit(self) -> None:
        """Make the object visible under its key: durable first on a local disk."""
        try:
            if self._tmp is not None:
                if self.durable:
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                self._fh.close()
                os.replace(self._tmp, self.path)
                self._tmp = None
                if self.durable:
                    _fsync_dir(posixpath.dirname(self.path))
                return
            if self._upload is not None and self._sent == 0:  # one part or less: one upload
                whole = bytes(self._pending)
                self._pending.clear()
                if self._md5 is not None:
                    self._md5.update(whole)
                if self._parts is not None:
                    self._parts.append(hashlib.md5(whole, usedforsecurity=False).digest())
                self.store._call("pipe_file", self.path, whole, nbytes=len(whole))
                return
            if self._pending:
                self._send(bytes(self._pending), last=True)
                self._pending.clear()
            if self._upload is not None:
                self.store._await(self._upload.finish(), "complete an upload")
            else:
                self._fh.close()
        except Exception as exc:
            self.abort()
            raise self.store._translate(exc, self.key, "write") from exc

    def abort(self) -> None:
        """Drop what was written: nothing becomes visible under the key."""
        with contextlib.suppress(Exception):
            if self._tmp is not None:
                self._fh.close()
                os.unlink(self._tmp)
                self._tmp = None
            elif self._upload is not None and self._sent:
                self.store._await(self._upload.abort(), "abort an upload")
            elif self._fh is not None and not self._fh.closed:
                discard = getattr(self._fh, "discard", None)
                if discard is not None:
                    discard()
        self._pending.clear()

    def expected_checksum(self) -> str | None:
        """The checksum the backend should report for what was written, or None."""
        if self._md5 is not None:
            return self._md5.hexdigest()
        if self._parts is not None and self._upload is not None:
            if self._sent == 0:  # one plain upload
                return self._parts[0].hex() if self._parts else None
            whole = hashlib.md5(b"".join(self._parts), usedforsecurity=False).hexdigest()
            return f"{whole}-{len(self._parts)}"
        return None

    def checksum_matches(self) -> bool | None:
        """Whether the store's own checksum of the object matches the bytes written: None
        when it has none to compare (then read the object back), False on a mismatch."""
        expected = self.expected_checksum()
        if expected is None:
            return None
        try:
            self.store.fs.invalidate_cache(self.path)
            info = self.store._call("info", self.path)
        except Exception as exc:
            raise self.store._translate(exc, self.key, "stat") from exc
        if int(info.get("size") or 0) != self.size:
            return False
        if self._parts is not None:
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
            return True if etag == expected else None  # another cut of parts: read it back
        md5_b64 = info.get("md5Hash")
        return None if not md5_b64 else base64.b64decode(md5_b64).hex() == expected


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


def temp_target(key: str) -> str | None:
    """The key a local write's temp file (``.tmp-<32 hex>-<name>``) will be renamed to."""
    head, _, name = key.rpartition("/")
    if name.startswith(".tmp-") and len(name) > 38 and name[37] == "-":
        return f"{head}/{name[38:]}" if head else name[38:]
    return None


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


_start_writeback = _writeback_call()


def _fsync_dir(path: str) -> None:
    """Flush a folder's entries (a file renamed or created in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: str, durable: bool = True) -> None:
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
            _fsync_dir(posixpath.dirname(folder) or "/")


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
