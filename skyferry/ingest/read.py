"""Plan record-aligned chunks over source files, and read them with ranged reads."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow.parquet as pq

from skyferry.errors import FormatError, SourceChangedError, SourceError, SourceNotFoundError
from skyferry.hashing import new_hasher
from skyferry.ingest.chunking import (
    binary_segments,
    csv_last_end,
    pack_segments,
    parquet_segments,
    text_segments,
)
from skyferry.ingest.listing import check_format, detect_format
from skyferry.models import ChunkPart, ChunkPlan, SourceFile
from skyferry.storage import open_url

__all__ = ["Block", "SourceStream", "plan_chunks", "read_range"]

logger = logging.getLogger("skyferry.ingest.read")


def read_range(url: str, start: int, end: int, options: Mapping[str, Any] | None = None) -> bytes:
    """One ranged read of ``[start, end)`` from a source file."""
    fs, path = open_url(url, options)
    try:
        data: bytes = fs.cat_file(path, start=start, end=end)
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"source file vanished: {url}", url=url) from exc
    except OSError as exc:
        raise SourceError(f"cannot read {url} [{start}:{end}]: {exc}", url=url) from exc
    if len(data) != end - start:
        raise SourceChangedError(
            f"short read from {url} [{start}:{end}]: got {len(data)} bytes; did it shrink?",
            url=url,
        )
    return data


def _row_group_ranges(url: str, options: Mapping[str, Any] | None) -> list[tuple[int, int]]:
    fs, path = open_url(url, options)
    try:
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception as exc:
        raise FormatError(f"{url} is not a readable Parquet file: {exc}", url=url,
                          fmt="parquet") from exc
    ranges = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        starts, ends = [], []
        for c in range(group.num_columns):
            col = group.column(c)
            first = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                first = min(first, col.dictionary_page_offset)
            starts.append(first)
            ends.append(first + col.total_compressed_size)
        ranges.append((min(starts), max(ends)))
    return ranges


def plan_file(
    file: SourceFile, fmt: str, chunk_size: int, options: Mapping[str, Any] | None = None
) -> tuple[str, str, int, list[tuple[int, int, tuple[int, ...]]]]:
    """Cut one file into record-aligned segments: ``(url, format, header_end, segments)``.

    A file that only grew since its committed version (``file.extends``) is cut from there.
    """
    fmt = detect_format(file.url, fmt)
    check_format(file.url, fmt, read_range(file.url, 0, min(file.size, 64), options))

    def read(start: int, end: int) -> bytes:
        return read_range(file.url, start, min(end, file.size), options)

    if fmt == "parquet":
        return file.url, fmt, 0, parquet_segments(_row_group_ranges(file.url, options))
    if fmt in ("csv", "jsonl"):
        segments, header_end = text_segments(
            read, file.size, chunk_size, quoted=fmt == "csv", header=fmt == "csv",
            start=file.extends)
        return file.url, fmt, header_end, [(s, e, ()) for s, e in segments]
    ranges = binary_segments(file.size - file.extends, chunk_size)
    return file.url, fmt, 0, [(file.extends + s, file.extends + e, ()) for s, e in ranges]


def plan_chunks(
    files: Sequence[SourceFile],
    fmt: str,
    chunk_size: int,
    options: Mapping[str, Any] | None = None,
) -> list[ChunkPlan]:
    """Plan every file, then pack their segments into chunks (grouped by format)."""
    planned = [plan_file(f, fmt, chunk_size, options) for f in files]
    planned.sort(key=lambda p: (p[1], p[0]))
    return pack_segments(planned, chunk_size)


class Block:
    """A record-aligned piece of one part of a chunk: ``data`` starts at ``offset`` of the
    part's source; ``header`` is its file's CSV header when the piece does not hold it."""

    __slots__ = ("data", "header", "offset", "part")

    def __init__(self, part: ChunkPart, offset: int, data: bytes, header: bytes) -> None:
        self.part, self.offset, self.data, self.header = part, offset, data, header


class SourceStream:
    """A chunk's source bytes as record-aligned blocks of about ``block`` bytes, each one a
    ranged read, hashed as it passes: memory is a block or two, whatever the chunk's size.

    A CSV block ends on a record's end as pyarrow reads records (a newline in a quoted
    field is not one), a JSONL block on a newline, a binary block anywhere; a record larger
    than the block makes its block larger. After the last block, :attr:`digest` is the
    chunk's source hash (of its parts' bytes in order) and :attr:`part_digests` each
    part's, when there are several. :attr:`seconds` is the time spent reading and hashing.
    """

    def __init__(self, plan: ChunkPlan, options: Mapping[str, Any] | None, block: int) -> None:
        self.plan, self.options, self.block = plan, options, block
        self.bytes_read = 0
        self.seconds = 0.0
        self.digest = ""
        self.part_digests: tuple[str, ...] = ()
        self._headers: dict[str, bytes] = {}

    def __iter__(self) -> Iterator[Block]:
        whole = new_hasher()
        parts = []
        for part in self.plan.parts:
            hasher = new_hasher()
            for block in self._part_blocks(part, whole, hasher):
                yield block
            parts.append(hasher.hexdigest())
        self.digest = whole.hexdigest()
        self.part_digests = tuple(parts) if len(parts) > 1 else ()

    def _read(self, part: ChunkPart, start: int, end: int, *hashers: Any) -> bytes:
        began = time.perf_counter()
        data = read_range(part.source, start, end, self.options)
        for hasher in hashers:
            hasher.update(data)
        self.bytes_read += len(data)
        self.seconds += time.perf_counter() - began
        return data

    def _header(self, part: ChunkPart, offset: int) -> bytes:
        if offset == 0 or not part.header_end:
            return b""
        if part.source not in self._headers:
            began = time.perf_counter()
            self._headers[part.source] = read_range(part.source, 0, part.header_end,
                                                    self.options)
            self.seconds += time.perf_counter() - began
        return self._headers[part.source]

    def _part_blocks(self, part: ChunkPart, *hashers: Any) -> Iterator[Block]:
        fmt = self.plan.format
        carry, carry_at = b"", part.start
        pos = part.start
        while pos < part.end:
            end = min(pos + self.block, part.end)
            data = self._read(part, pos, end, *hashers)
            pos = end
            window = carry + data if carry else data
            if fmt not in ("csv", "jsonl") or pos >= part.end:
                yield Block(part, carry_at, window, self._header(part, carry_at))
                carry, carry_at = b"", pos
                continue
            if fmt == "csv":
                skip = 3 if carry_at == 0 and window.startswith(b"\xef\xbb\xbf") else 0
                cut = csv_last_end(window, skip, True)
                cut = 0 if cut <= skip else cut
            else:
                cut = window.rfind(b"\n") + 1
            if cut == 0:  # no record ends in it: one record larger than a block
                carry = window
                continue
            yield Block(part, carry_at, window[:cut], self._header(part, carry_at))
            carry, carry_at = window[cut:], carry_at + cut
        if carry:
            yield Block(part, carry_at, carry, self._header(part, carry_at))
