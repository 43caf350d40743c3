"""List a source (an fsspec URL plus an optional glob) and detect each file's format."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

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
    # files that cannot be taken as they are (empty, a dangling or directory symlink, a
    # name that is not UTF-8): URL -> why; a strict run fails on any of them
    odd: dict[str, str] = field(default_factory=dict)


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
    odd: dict[str, str] = {}
    for fpath, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        name = fpath.rsplit("/", 1)[-1]
        furl = fs.unstrip_protocol(fpath)
        if is_dir and name.startswith((".", "_")):
            skipped.append(furl)  # hidden files and markers such as _SUCCESS
            continue
        why = _odd(fs, fpath, info)
        if why:
            odd[_printable(furl)] = why
            continue
        size = int(info.get("size") or 0)
        rel = fpath[len(root):].lstrip("/") if root and fpath.startswith(root + "/") else name
        files.append(SourceFile(url=furl, size=size, fingerprint=_fingerprint(info), path=rel))
    if skipped:
        logger.warning("passed over %d hidden or marker files under %s (name them with a "
                       "glob to take them): %s", len(skipped), url, ", ".join(skipped[:20]))
    for furl, why in odd.items():
        logger.warning("passed over %s: %s", furl, why)
    if not files:
        if len(odd) == 1 and not skipped:  # the source is this one file: say what it is
            ((furl, why),) = odd.items()
            error = ZeroByteFileError if why.startswith("empty") else SourceError
            raise error(f"source file {furl} cannot be taken: {why}", url=furl)
        hint = f" ({len(skipped)} hidden or marker files passed over)" if skipped else ""
        hint += f" ({len(odd)} files that cannot be taken: see the log)" if odd else ""
        raise EmptySourceError(f"source matches no files: {url}{hint}", url=url)
    logger.info("listed %d files (%d bytes) under %s", len(files), sum(f.size for f in files), url)
    return Listing(files=files, skipped=skipped, odd=odd)


def _odd(fs: Any, path: str, info: Mapping[str, Any]) -> str:
    """Why a listed entry cannot be taken as a source file, or "" when it can."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8 (rename it to take it)"
    if info.get("type") not in (None, "file"):
        if info.get("islink") and isinstance(fs, LocalFileSystem):
            target = os.path.realpath(path)
            if not os.path.exists(target):
                return f"a dangling symlink (to {os.readlink(path)})"
            if os.path.isdir(target):
                return ("a symlink to a directory, which is not followed (name the directory "
                        "itself to take it)")
        return f"not a regular file ({info.get('type')})"
    if int(info.get("size") or 0) == 0:
        return "empty (0 bytes)"
    return ""


def _printable(url: str) -> str:
    """``url`` as text that can be logged and stored: bytes that are not UTF-8 escaped."""
    return url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
