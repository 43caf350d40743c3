"""List a source (an fsspec URL plus an optional glob) and detect each file's format."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from skyferry.errors import (
    EmptySourceError,
    FormatError,
    SourceError,
    SourceNotFoundError,
    ZeroByteFileError,
)
from skyferry.models import SourceFile
from skyferry.storage import open_url

__all__ = ["CLOUD_BY_PROTOCOL", "detect_format", "list_source", "source_cloud"]

logger = logging.getLogger("skyferry.ingest")

CLOUD_BY_PROTOCOL = {"s3": "aws", "s3a": "aws", "gs": "gcp", "gcs": "gcp", "az": "azure",
                     "abfs": "azure", "abfss": "azure"}
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_GLOB_CHARS = set("*?[")


def source_cloud(url: str, default: str) -> str:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return CLOUD_BY_PROTOCOL.get(protocol, default)


def detect_format(url: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = url.rsplit("/", 1)[-1].lower()
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return "binary"


def _fingerprint(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "content_md5", "crc32c"):
        value = info.get(key)
        if value:
            return f"etag:{str(value).strip(chr(34))}"
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if value is not None:
            stamp = value.timestamp() if hasattr(value, "timestamp") else value
            return f"mtime:{stamp}"
    return f"size:{info.get('size')}"


def list_source(url: str, storage_options: Mapping[str, Any] | None = None) -> list[SourceFile]:
    """Every file the source names, sorted by URL. Raises when nothing usable is there."""
    try:
        fs, path = open_url(url, storage_options)
    except (ValueError, ImportError) as exc:
        raise SourceError(f"cannot open source {url}: {exc}", url=url) from exc
    try:
        fs.invalidate_cache()
        if _GLOB_CHARS & set(path):
            found = fs.glob(path, detail=True)
        elif fs.isdir(path):
            found = fs.find(path, detail=True)
        elif fs.exists(path):
            found = {path: fs.info(path)}
        else:
            raise SourceNotFoundError(f"source not found: {url}", url=url)
    except SourceError:
        raise
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"source not found: {url}", url=url) from exc
    except OSError as exc:
        raise SourceError(f"cannot list source {url}: {exc}", url=url) from exc
    files = []
    for fpath, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        name = fpath.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue  # hidden files and markers such as _SUCCESS
        furl = fs.unstrip_protocol(fpath)
        size = int(info.get("size") or 0)
        if size == 0:
            raise ZeroByteFileError(f"source file is empty (0 bytes): {furl}", url=furl)
        files.append(SourceFile(url=furl, size=size, fingerprint=_fingerprint(info)))
    if not files:
        raise EmptySourceError(f"source matches no files: {url}", url=url)
    logger.info("listed %d files (%d bytes) under %s", len(files), sum(f.size for f in files), url)
    return files


def check_format(url: str, fmt: str, head: bytes) -> None:
    """Refuse a file whose first bytes contradict its declared format."""
    if fmt == "parquet" and not head.startswith(b"PAR1"):
        raise FormatError(f"{url} is not a Parquet file (no PAR1 magic)", url=url, fmt=fmt)
    if fmt in ("csv", "jsonl"):
        if head.startswith(b"PAR1") or b"\x00" in head:
            raise FormatError(f"{url} is binary, not {fmt} text", url=url, fmt=fmt)
        if fmt == "jsonl" and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith((b"{", b"[")):
            raise FormatError(f"{url} does not start with a JSON value", url=url, fmt=fmt)
