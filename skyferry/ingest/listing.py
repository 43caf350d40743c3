"""List a source (an fsspec URL plus an optional glob) and detect each file's format."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
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

__all__ = ["CLOUD_BY_PROTOCOL", "Listing", "detect_format", "list_source", "list_source_files",
           "source_cloud"]

logger = logging.getLogger("skyferry.ingest.read")

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


@dataclass(frozen=True)
class Listing:
    """What a source listing found: the files to take, and the files it passed over."""

    files: list[SourceFile]
    skipped: list[str] = field(default_factory=list)


def _root_of(path: str, is_glob: bool, is_dir: bool) -> str:
    """The folder that relative paths start from: a glob's fixed part, a folder, a file's."""
    if is_glob:
        fixed = path[:min(path.index(c) for c in _GLOB_CHARS if c in path)]
        return fixed.rsplit("/", 1)[0] if "/" in fixed else ""
    if is_dir:
        return path.rstrip("/")
    return path.rsplit("/", 1)[0] if "/" in path else ""


def list_source_files(url: str, storage_options: Mapping[str, Any] | None = None) -> Listing:
    """Every file the source names, sorted by URL. Raises when nothing usable is there.

    A folder's listing passes over files whose names start with ``.`` or ``_`` (hidden files,
    markers such as ``_SUCCESS``), and names each one in ``skipped``. A glob, or an exact
    path, takes every file it matches, whatever its name.
    """
    try:
        fs, path = open_url(url, storage_options)
    except (ValueError, ImportError) as exc:
        raise SourceError(f"cannot open source {url}: {exc}", url=url) from exc
    is_glob = is_dir = False
    try:
        fs.invalidate_cache()
        if fs.isfile(path):  # an exact path, even one with glob characters such as '['
            found = {path: fs.info(path)}
        elif fs.isdir(path):
            is_dir = True
            found = fs.find(path, detail=True)
        elif _GLOB_CHARS & set(path):
            is_glob = True
            found = fs.glob(path, detail=True)
        else:
            raise SourceNotFoundError(f"source not found: {url}", url=url)
    except SourceError:
        raise
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"source not found: {url}", url=url) from exc
    except OSError as exc:
        raise SourceError(f"cannot list source {url}: {exc}", url=url) from exc
    root = _root_of(fs._strip_protocol(path), is_glob, is_dir)
    files = []
    skipped = []
    for fpath, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        name = fpath.rsplit("/", 1)[-1]
        furl = fs.unstrip_protocol(fpath)
        if is_dir and name.startswith((".", "_")):
            skipped.append(furl)  # hidden files and markers such as _SUCCESS
            continue
        size = int(info.get("size") or 0)
        if size == 0:
            raise ZeroByteFileError(f"source file is empty (0 bytes): {furl}", url=furl)
        rel = fpath[len(root):].lstrip("/") if root and fpath.startswith(root + "/") else name
        files.append(SourceFile(url=furl, size=size, fingerprint=_fingerprint(info), path=rel))
    if skipped:
        logger.warning("passed over %d hidden or marker files under %s (name them with a "
                       "glob to take them): %s", len(skipped), url, ", ".join(skipped[:20]))
    if not files:
        hint = f" ({len(skipped)} hidden or marker files passed over)" if skipped else ""
        raise EmptySourceError(f"source matches no files: {url}{hint}", url=url)
    logger.info("listed %d files (%d bytes) under %s", len(files), sum(f.size for f in files), url)
    return Listing(files=files, skipped=skipped)


def list_source(url: str, storage_options: Mapping[str, Any] | None = None) -> list[SourceFile]:
    """The files of :func:`list_source_files`."""
    return list_source_files(url, storage_options).files


def check_format(url: str, fmt: str, head: bytes) -> None:
    """Refuse a file whose first bytes contradict its declared format."""
    if fmt == "parquet" and not head.startswith(b"PAR1"):
        raise FormatError(f"{url} is not a Parquet file (no PAR1 magic)", url=url, fmt=fmt)
    if fmt in ("csv", "jsonl"):
        if head.startswith(b"PAR1") or b"\x00" in head:
            raise FormatError(f"{url} is binary, not {fmt} text", url=url, fmt=fmt)
        first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if fmt == "jsonl" and first == b"[":
            raise FormatError(f"{url} holds a JSON array, not JSON Lines (one object per "
                              "line): convert it, for example with jq -c '.[]'", url=url, fmt=fmt)
        if fmt == "jsonl" and first != b"{":
            raise FormatError(f"{url} does not start with a JSON object", url=url, fmt=fmt)
