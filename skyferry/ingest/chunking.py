"""Record-aligned chunk plans.

A file is first cut into *segments* no larger than the chunk size (unless one record is
larger), each ending on a record boundary:

- CSV: read as pyarrow reads it, so a newline inside a quoted field is never a boundary,
  and a quote inside an unquoted field opens nothing;
- JSONL: on newlines;
- Parquet: by row groups;
- anything else: fixed byte ranges.

Segments are then *packed* in order, so that small files share a chunk and one chunk
carries about ``chunk_size`` bytes. Text files are scanned with bounded windows (at most
about one chunk in memory); nothing reads a whole file at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from skyferry.models import ChunkPart, ChunkPlan

__all__ = [
    "Reader",
    "binary_segments",
    "csv_last_end",
    "csv_record_around",
    "pack_segments",
    "parquet_segments",
    "text_segments",
]

Reader = Callable[[int, int], bytes]
_NL = b"\n"
_EXTEND = 1 << 20
_SCAN = 8 << 20  # the planner reads text in blocks of this size


def binary_segments(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Fixed byte ranges: 250 bytes in chunks of 100 give (0,100), (100,200), (200,250)."""
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


# CSV records as pyarrow's parser reads them (delimiter ",", quote '"', doubled quotes):
# a quote opens a quoted field only at the start of a field; inside one, '""' is a quote
# and a lone '"' closes it, after which the field runs on unquoted (quotes there are plain
# characters) to the next delimiter; CRLF, LF or a lone CR ends a record. Possessive
# quantifiers keep the scan linear: no input makes it backtrack.
_FIELD = rb'(?:"[^"]*+(?:""[^"]*+)*+"[^,\r\n]*+|[^",\r\n][^,\r\n]*+)?+'
_RECORD = _FIELD + rb"(?:," + _FIELD + rb")*+(?:\r\n|\n|\r)"
_CSV_RECORD = re.compile(_RECORD)
_CSV_RECORDS = re.compile(rb"(?:" + _RECORD + rb")*+")
_BOM = b"\xef\xbb\xbf"
_QUOTE, _LF = ord('"'), ord("\n")
_IS_FIELD_START = np.zeros(256, dtype=bool)  # the bytes after which a field starts
_IS_FIELD_START[[ord(","), ord("\n"), ord("\r"), ord('"')]] = True
_TAIL = 64 << 10  # the first tail searched for a record's end, doubled until one is found


def csv_last_end(window: bytes, skip: int, more: bool) -> int:
    """End of the last whole CSV record in ``window``, which starts on a record boundary.

    ``skip`` bytes (a BOM) are passed over first. With ``more`` (the file goes on), a final
    CR could be the first half of a CRLF, so a record ending there does not count yet.
    """
    if b'"' not in window:  # no quote, no quoted field: every line end is a record's end
        return max(window.rfind(_NL) + 1, skip)
    fast = _csv_last_end_by_parity(window, skip)
    if fast is not None:
        return fast
    stop = len(window) - 1 if more and window.endswith(b"\r") else len(window)
    match = _CSV_RECORDS.match(window, skip, stop)
    return match.end() if match else skip


def _csv_last_end_by_parity(window: bytes, skip: int) -> int | None:
    """The last LF outside a quoted field, found by counting quotes (vectorised), when that
    count is the parser's state: every quote that opens a field stands at a field's start
    (or doubles the quote before it). None when one does not (a quote inside an unquoted
    field is a plain character), or no LF is outside a quoted field: the exact scan decides.
    """
    data = np.frombuffer(window, dtype=np.uint8)
    quotes = np.flatnonzero(data == _QUOTE)
    opening = quotes[0::2]
    if opening.size and opening[0] < skip:
        return None
    if not _IS_FIELD_START[data[opening[opening > skip] - 1]].all():
        return None
    # The LFs of a tail of the window, growing from the end until one is outside quotes:
    # usually the last LF is, so the scan costs a few KiB, not the window.
    end, tail = len(window), _TAIL
    while end > skip:
        begin = max(skip, end - tail)
        lines = np.flatnonzero(data[begin:end] == _LF) + begin
        outside = lines[np.searchsorted(quotes, lines) % 2 == 0]
        if outside.size:
            return int(outside[-1]) + 1
        end, tail = begin, tail * 2
    return None


def csv_record_around(data: bytes, start: int, pos: int) -> tuple[int, int]:
    """``(begin, end)`` of the CSV record of ``data`` that holds byte ``pos`` (not a line
    end), scanning from ``start``, a record boundary at or before it. ``end`` includes the
    record's line end."""
    if data.find(b'"', start, pos) < 0:  # no quote before it: the last line end is a boundary
        begin = max(data.rfind(b"\n", start, pos), data.rfind(b"\r", start, pos)) + 1
        begin = max(begin, start)
    else:
        whole = _CSV_RECORDS.match(data, start, pos)
        begin = whole.end() if whole else start
    match = _CSV_RECORD.match(data, begin)
    return begin, match.end() if match else len(data)


def _csv_record_end(read: Reader, size: int, start: int, skip: int = 0) -> int:
    """End of the CSV record that starts at ``start``; ``size`` if it runs to the end.

    Reads a growing window: a record is read whole later anyway (it is one chunk's part).
    """
    length = _EXTEND
    while True:
        end = min(start + length, size)
        window = read(start, end)
        match = _CSV_RECORD.match(window, skip)
        if match is not None and not (
                match.end() == len(window) and window.endswith(b"\r") and end < size):
            return start + match.end()
        if end >= size:
            return size
        length *= 2


def _jsonl_record_end(read: Reader, size: int, start: int) -> int:
    pos = start
    while pos < size:
        block = read(pos, min(pos + _EXTEND, size))
        i = block.find(_NL)
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _last_record_end(read: Reader, start: int, target: int, quoted: bool, skip: int) -> int:
    """The end of the last whole record in ``[start, target)`` (``start``, a record boundary,
    when there is none), read in blocks of :data:`_SCAN` bytes: memory is a block, plus one
    record larger than a block, whatever the chunk size."""
    if not quoted:  # a JSONL record ends at a newline: look back from the target
        at = target
        while at > start:
            begin = max(start, at - _SCAN)
            found = read(begin, at).rfind(_NL)
            if found >= 0:
                return begin + found + 1
            at = begin
        return start
    last, carry, pos = start, b"", start
    while pos < target:
        end = min(pos + _SCAN, target)
        window = carry + read(pos, end) if carry else read(pos, end)
        pos = end
        cut = csv_last_end(window, skip if last == start else 0, True)  # the file goes on
        if cut > (skip if last == start else 0):
            last += cut
            carry = window[cut:]
        else:
            carry = window
    return last


def text_segments(
    read: Reader, size: int, chunk_size: int, *, quoted: bool, header: bool, start: int = 0
) -> tuple[list[tuple[int, int]], int]:
    """Cut a CSV (``quoted=True``) or JSONL text file into record-aligned segments.

    Returns the segments and the header length (0 without a header). A segment never splits
    a record, and always holds at least one record beyond the header. ``start``, a record
    boundary, is where the segments begin (the end of a version already ingested).
    """
    skip = 3 if quoted and read(0, min(3, size)) == _BOM else 0

    def record_end(at: int) -> int:
        if quoted:
            return _csv_record_end(read, size, at, skip if at == 0 else 0)
        return _jsonl_record_end(read, size, at)

    header_end = record_end(0) if header else 0
    segments: list[tuple[int, int]] = []
    while start < size:
        floor = header_end if start == 0 else start  # bytes that must be passed
        target = start + chunk_size
        if target >= size:
            segments.append((start, size))
            break
        end: int | None = None
        if target > floor:
            found = _last_record_end(read, start, target, quoted, skip if start == 0 else 0)
            if found > floor:
                end = found
        if end is None:
            # One record is larger than the chunk: take the first record end past `floor`.
            end = record_end(floor)
        segments.append((start, end))
        start = end
    return segments, header_end


def parquet_segments(
    row_group_ranges: Sequence[tuple[int, int]],
) -> list[tuple[int, int, tuple[int, ...]]]:
    """One segment per row group: its byte range and its index."""
    return [(s, e, (i,)) for i, (s, e) in enumerate(row_group_ranges)]


def pack_segments(
    files: Iterable[tuple[str, str, int, Sequence[tuple[int, int, tuple[int, ...]]]]],
    chunk_size: int,
    *,
    first_index: int = 0,
) -> list[ChunkPlan]:
    """Pack ``(url, format, header_end, segments)`` in order into chunks of ~``chunk_size``.

    A chunk only holds one format. Adjacent segments of the same file merge into one part.
    """
    plans: list[ChunkPlan] = []
    parts: list[ChunkPart] = []
    current_fmt: str | None = None
    filled = 0

    def close() -> None:
        nonlocal parts, filled
        if parts:
            plans.append(
                ChunkPlan(index=first_index + len(plans), format=current_fmt,  # type: ignore[arg-type]
                          parts=tuple(parts), nodes=())
            )
        parts, filled = [], 0

    for url, fmt, header_end, segments in files:
        if fmt != current_fmt:
            close()
            current_fmt = fmt
        for start, end, groups in segments:
            size = end - start
            if parts and filled + size > chunk_size:
                close()
            last = parts[-1] if parts else None
            if last is not None and last.source == url and last.end == start:
                parts[-1] = last.model_copy(
                    update={"end": end, "row_groups": last.row_groups + groups}
                )
            else:
                parts.append(
                    ChunkPart(
                        source=url, start=start, end=end, header_end=header_end, row_groups=groups
                    )
                )
            filled += size
    close()
    return plans
