"""Record-aligned chunk plans.

A file is first cut into *segments* no larger than the chunk size (unless one record is
larger), each ending on a record boundary:

- CSV: quote-aware, so a newline inside a quoted field is never a boundary;
- JSONL: on newlines;
- Parquet: by row groups;
- anything else: fixed byte ranges.

Segments are then *packed* in order, so that small files share a chunk and one chunk
carries about ``chunk_size`` bytes. Text files are scanned with bounded windows (at most
about one chunk in memory); nothing reads a whole file at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from skyferry.models import ChunkPart, ChunkPlan

__all__ = [
    "Reader",
    "binary_segments",
    "pack_segments",
    "parquet_segments",
    "text_segments",
]

Reader = Callable[[int, int], bytes]
_QUOTE = b'"'
_NL = b"\n"
_EXTEND = 1 << 20


def binary_segments(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Fixed byte ranges: 250 bytes in chunks of 100 give (0,100), (100,200), (200,250)."""
    return [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]


def _last_boundary(window: bytes, lowest: int, quoted: bool) -> int | None:
    """Largest ``i + 1`` with ``window[i] == '\\n'`` outside quotes and ``i >= lowest``.

    ``window`` starts on a record boundary, so the quote parity there is even.
    """
    i = window.rfind(_NL)
    if i < lowest:
        return None
    if not quoted:
        return i + 1
    parity = window.count(_QUOTE, 0, i) & 1
    while i >= lowest:
        if parity == 0:
            return i + 1
        j = window.rfind(_NL, 0, i)
        if j < 0:
            return None
        parity ^= window.count(_QUOTE, j, i) & 1
        i = j
    return None


def _next_boundary(
    read: Reader, size: int, start: int, parity: int, quoted: bool
) -> int:
    """First record end at or after ``start`` given the quote parity there; ``size`` if none."""
    pos = start
    while pos < size:
        block = read(pos, min(pos + _EXTEND, size))
        i = 0
        while True:
            j = block.find(_NL, i)
            if j < 0:
                if quoted:
                    parity ^= block.count(_QUOTE, i) & 1
                break
            if quoted:
                parity ^= block.count(_QUOTE, i, j) & 1
            if parity == 0:
                return pos + j + 1
            i = j + 1
        pos += len(block)
    return size


def text_segments(
    read: Reader, size: int, chunk_size: int, *, quoted: bool, header: bool
) -> tuple[list[tuple[int, int]], int]:
    """Cut a CSV (``quoted=True``) or JSONL text file into record-aligned segments.

    Returns the segments and the header length (0 without a header). A segment never splits
    a record, and always holds at least one record beyond the header.
    """
    header_end = _next_boundary(read, size, 0, 0, quoted) if header else 0
    segments: list[tuple[int, int]] = []
    start = 0
    while start < size:
        floor = header_end if start == 0 else start  # bytes that must be passed
        target = start + chunk_size
        if target >= size:
            segments.append((start, size))
            break
        end: int | None = None
        if target > floor:
            window = read(start, target)
            found = _last_boundary(window, floor - start, quoted)
            if found is not None and start + found > floor:
                end = start + found
        if end is None:
            # One record is larger than the chunk: take the first record end past `floor`.
            parity = 0
            if quoted and floor > start:
                parity = read(start, floor).count(_QUOTE) & 1
            end = _next_boundary(read, size, floor, parity, quoted)
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
