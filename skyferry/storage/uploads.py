"""Streamed writes: :class:`ObjectWriter`, and the upload adapters it drives on the
backends' own APIs (S3 multipart, GCS resumable, Azure staged blocks)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

from skyferry.storage import local
from skyferry.storage.errors import translate

if TYPE_CHECKING:
    from skyferry.storage.store import Store

__all__ = ["FLUSH_EVERY", "PART_SIZE", "ObjectWriter"]

# A streamed upload's part (S3 multipart, GCS resumable, Azure block): S3's smallest part
# is 5 MiB, GCS wants a multiple of 256 KiB.
PART_SIZE = 8 << 20
FLUSH_EVERY = 32 << 20  # a durable local write starts writing back every this many bytes


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
                    local.make_dirs_durable(parent, durable)
                    self._fh = open(self._tmp, "wb")
            elif kind is not None:
                self._upload = kind(store, self.path)
            else:  # another filesystem: its own buffered writer
                self._fh = store.fs.open(self.path, "wb")
        except Exception as exc:
            raise translate(exc, store.name, key, "write") from exc

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
                    local.start_writeback(self._fh.fileno(), self._flushed,
                                          self.size - self._flushed)
                    self._flushed = self.size
                return
            self._pending += block
            while len(self._pending) > PART_SIZE:
                self._send(bytes(self._pending[:PART_SIZE]), last=False)
                del self._pending[:PART_SIZE]
        except Exception as exc:
            raise translate(exc, self.store.name, self.key, "write") from exc

    def _send(self, part: bytes, last: bool) -> None:
        if self._md5 is not None:
            self._md5.update(part)
        if self._parts is not None:
            self._parts.append(hashlib.md5(part, usedforsecurity=False).digest())
        if self._upload is None:
            self._fh.write(part)
        else:
            if self._sent == 0:
                self.store.run(self._upload.start(), "start an upload")
            total = self._sent + len(part) if last else None
            self.store.run(self._upload.part(self._sent, part, total), "upload a part",
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
                    local.fsync_dir(posixpath.dirname(self.path))
                return
            if self._upload is not None and self._sent == 0:  # one part or less: one upload
                whole = bytes(self._pending)
                self._pending.clear()
                if self._md5 is not None:
                    self._md5.update(whole)
                if self._parts is not None:
                    self._parts.append(hashlib.md5(whole, usedforsecurity=False).digest())
                self.store.call("pipe_file", self.path, whole, nbytes=len(whole))
                return
            if self._pending:
                self._send(bytes(self._pending), last=True)
                self._pending.clear()
            if self._upload is not None:
                self.store.run(self._upload.finish(), "complete an upload")
            else:
                self._fh.close()
        except Exception as exc:
            self.abort()
            raise translate(exc, self.store.name, self.key, "write") from exc

    def abort(self) -> None:
        """Drop what was written: nothing becomes visible under the key."""
        with contextlib.suppress(Exception):
            if self._tmp is not None:
                self._fh.close()
                os.unlink(self._tmp)
                self._tmp = None
            elif self._upload is not None and self._sent:
                self.store.run(self._upload.abort(), "abort an upload")
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
            info = self.store.call("info", self.path)
        except Exception as exc:
            raise translate(exc, self.store.name, self.key, "stat") from exc
        if int(info.get("size") or 0) != self.size:
            return False
        if self._parts is not None:
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
            return True if etag == expected else None  # another cut of parts: read it back
        md5_b64 = info.get("md5Hash")
        return None if not md5_b64 else base64.b64decode(md5_b64).hex() == expected
