"""Decode one block of a CSV, JSONL or Parquet part into an Arrow table.

CSV is parsed by pyarrow; a block it cannot parse whole (a ragged row, bytes that are not
UTF-8) is parsed record by record, and each bad record becomes a reject. JSONL whose values
pyarrow would round (integers beyond 2^53 meeting floats) is read record by record with
the exact types. With a schema, each block is validated by :mod:`skyferry.process.validate`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from skyferry.errors import FormatError
from skyferry.ingest.chunking import csv_record_around
from skyferry.models import ChunkPart
from skyferry.process.schema import Schema
from skyferry.process.validate import apply_constraints, coerce, reject
from skyferry.storage import open_url

__all__ = ["decode_part", "is_utf8"]

logger = logging.getLogger("skyferry.process")


def _header_names(header: bytes) -> list[str]:
    """The column names of a CSV header (quote-aware; a UTF-8 BOM is dropped).

    The standard library's reader: a pyarrow read of the header waited on pyarrow's thread
    pool, busy parsing the other chunks in flight, on every chunk.
    """
    return next(csv.reader(io.StringIO(header.decode("utf-8-sig"))), [])


def _decode_csv(part: ChunkPart, data: bytes, header: bytes, schema: Schema | None,
                rejects: list[dict[str, Any]], text: Sequence[str] = ()) -> tuple[pa.Table, int]:
    """``text`` names columns read as text whatever they look like (a column an earlier
    block of the chunk held text in)."""
    invalid: list[Any] = []

    if not data.strip() and not (header or b"").strip():  # a file of blank lines: no rows
        return pa.table({}), 0
    if not is_utf8(data):  # pyarrow cannot hand a malformed row that is not UTF-8 to us
        return _decode_csv_by_record(part, data, header, schema, rejects, text)

    def on_invalid(row: Any) -> str:
        invalid.append(row)
        return "skip"

    # text columns as bytes: their UTF-8 is checked row by row below
    types = {n: pa.binary() for n in text}
    if schema is not None:
        # timestamps and decimals as text: convert.py reads each value (a timestamp's zone
        # varies by value; a decimal that does not fit is its row's reject)
        types.update({n: pa.binary() if t == pa.string() or pa.types.is_timestamp(t)
                      or pa.types.is_decimal(t) else t
                      for n, t in schema.arrow_types().items()})
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    # A chunk after the first is read with the file's header names, not by pasting the
    # header in front of it (a copy of the chunk); either way no byte is copied.
    try:
        read = pacsv.ReadOptions(column_names=_header_names(header)) if header else None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{part.source}: the CSV header is not UTF-8: {exc}",
                          url=part.source, fmt="csv") from exc

    def parse(newlines: bool, conv: pacsv.ConvertOptions) -> pa.Table:
        options = pacsv.ParseOptions(newlines_in_values=newlines, invalid_row_handler=on_invalid)
        try:
            return pacsv.read_csv(pa.BufferReader(data), read_options=read,
                                  parse_options=options, convert_options=conv)
        except pa.ArrowInvalid as exc:
            if "straddl" not in str(exc):
                raise
        # A record larger than pyarrow's block (1 MB): read the chunk as one block.
        invalid.clear()
        whole = pacsv.ReadOptions(block_size=len(data) + 1,
                                  column_names=read.column_names if read else None)
        return pacsv.read_csv(pa.BufferReader(data), read_options=whole, parse_options=options,
                              convert_options=conv)

    raw: pa.Table | None = None
    # Fast path: most data has no newline inside a quoted field, and pyarrow parses ~20%
    # faster without `newlines_in_values`. A quoted newline shows up as a broken row that
    # holds a quote (or a parse error); then the chunk is parsed again with it.
    try:
        table = parse(False, convert)
        retry = any('"' in row.text for row in invalid) or (
            table.num_columns <= 1 and b'"' in data)  # one column: no row looks broken
    except pa.ArrowInvalid:
        retry = True
    if retry:
        invalid.clear()
    try:
        if retry:
            table = parse(True, convert)
        if schema is not None and _infinite(table, schema):
            # an infinity may be spelled ("inf") or a finite value that overflowed ("1e400"):
            # the text tells them apart (rare, so the common block is read once)
            raise pa.ArrowInvalid("conversion error: an infinity to check against its text")
    except pa.ArrowInvalid as exc:
        if schema is None or "conversion error" not in str(exc).lower():
            raise FormatError(f"{part.source} [{part.start}:{part.end}] is not valid CSV: {exc}",
                              url=part.source, fmt="csv") from exc
        invalid.clear()
        as_text = pacsv.ConvertOptions(
            column_types={n: pa.binary() for n in schema.columns}, strings_can_be_null=True
        )
        raw = parse(retry, as_text)
        table = raw
    for row in invalid:
        rejects.append(reject(
            part, row.number,
            f"expected {row.expected_columns} columns, found {row.actual_columns}", row.text,
        ))
    rows_in = table.num_rows + len(invalid)
    table = _as_text(table)  # the data is UTF-8 here: _decode_csv_by_record took the rest
    if raw is not None:
        raw = table
    if schema is not None:
        table, rows = coerce(table, schema, part, rejects, raw)
        table = apply_constraints(table, schema, part, rejects, rows)
    return table, rows_in


def _infinite(table: pa.Table, schema: Schema) -> bool:
    """Whether a float column of the schema holds an infinity."""
    for name, col in schema.columns.items():
        if col.type == "float64" and name in table.column_names and pa.types.is_floating(
                table.schema.field(name).type):
            if pc.any(pc.fill_null(pc.is_inf(table.column(name)), False)).as_py():
                return True
    return False


def _decode_csv_by_record(part: ChunkPart, data: bytes, header: bytes, schema: Schema | None,
                          rejects: list[dict[str, Any]], text: Sequence[str] = ()
                          ) -> tuple[pa.Table, int]:
    """A chunk that holds bytes that are not UTF-8: pyarrow cannot hand a malformed row that
    holds such bytes to a reject handler, so it would fail the whole chunk.

    The records that hold such bytes are cut out, as the chunk planner cuts records, and
    become rejects (the wrong number of fields, or text that is not UTF-8), with the reasons
    and texts pyarrow's path gives; pyarrow reads the rest in one piece.
    """
    if not header:  # the part starts its file: its first record is the header
        skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        end = csv_record_around(data, skip, skip)[1]
        header, data = data[:end], data[end:]
    names = _header_names(header)
    kept = [header if header.endswith((b"\n", b"\r")) else header + b"\n"]
    cut = lines = pos = 0
    for bad in _not_utf8_offsets(data):
        if bad < pos:
            continue  # in a record already cut out
        begin, end = csv_record_around(data, pos, bad)
        kept.append(data[pos:begin])
        line = _without_line_end(data[begin:end])
        lines += data.count(b"\n", pos, begin)
        row = lines + 1  # the record's first line in the part
        lines += data.count(b"\n", begin, end)
        pos = end
        cut += 1
        fields = next(csv.reader(io.StringIO(line.decode("utf-8", "surrogateescape"),
                                             newline="")), [])
        if len(fields) != len(names):
            rejects.append(reject(part, row, f"expected {len(names)} columns, found "
                                   f"{len(fields)}", line.decode("utf-8", "replace")))
            continue
        column = next(n for n, f in zip(names, fields, strict=True)
                      if not is_utf8(f.encode("utf-8", "surrogateescape")))
        values = {n: (f.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                      if f else None) for n, f in zip(names, fields, strict=True)}
        rejects.append(reject(part, row, f"column {column!r}: invalid UTF-8",
                               json.dumps(values)))
    rest = data[pos:]
    kept.append(rest if not rest or rest.endswith((b"\n", b"\r")) else rest + b"\n")
    table, rows_in = _decode_csv(part, b"".join(kept), b"", schema, rejects, text)
    return table, rows_in + cut


_offsets = threading.local()


def _collect_offset(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    _offsets.found.append(exc.start)
    return "\ufffd", exc.end


codecs.register_error("skyferry-offsets", _collect_offset)


def _not_utf8_offsets(data: bytes) -> list[int]:
    """The offsets of the bytes of ``data`` that are not UTF-8, in one decoding pass."""
    _offsets.found = []
    data.decode("utf-8", "skyferry-offsets")
    found: list[int] = _offsets.found
    return found


def _without_line_end(record: bytes) -> bytes:
    if record.endswith(b"\r\n"):
        return record[:-2]
    return record[:-1] if record.endswith((b"\n", b"\r")) else record


def is_utf8(value: bytes | None) -> bool:
    """Whether ``value`` is UTF-8, checked by Arrow in place (tens of GB/s on ASCII)."""
    if value is None:
        return True
    offsets = pa.py_buffer(struct.pack("<2q", 0, len(value)))
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(value)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _as_text(table: pa.Table) -> pa.Table:
    """Binary columns (text read as bytes, whose UTF-8 is checked) as strings."""
    if not any(pa.types.is_binary(f.type) for f in table.schema):
        return table
    columns = [pc.cast(c, pa.string()) if pa.types.is_binary(c.type) else c
               for c in table.columns]
    return pa.table(dict(zip(table.column_names, columns, strict=True)))


def _inexact(table: pa.Table, schema: Schema | None) -> bool:
    """Whether Arrow's JSON reader may have rounded a value of an integer or decimal column:
    it reads a column that mixes integers and fractions as doubles. Without a schema, any
    double column holding a magnitude of 2^53 or more may hide a rounded integer."""
    if schema is None:
        return any(_reaches_2_53(table.column(f.name)) for f in table.schema
                   if pa.types.is_floating(f.type))
    for name, col in schema.columns.items():
        if name not in table.column_names or col.type not in ("int64", "decimal"):
            continue
        found = table.schema.field(name).type
        if not (pa.types.is_integer(found) or pa.types.is_string(found)
                or pa.types.is_null(found)):
            return True
    return False


def _reaches_2_53(column: pa.ChunkedArray) -> bool:
    if len(column) == column.null_count:
        return False
    largest = pc.max(pc.abs(column)).as_py()
    return largest is not None and largest >= 2 ** 53


def _decode_jsonl(part: ChunkPart, data: bytes, rejects: list[dict[str, Any]],
                  schema: Schema | None = None) -> tuple[pa.Table, int]:
    """A block of JSON Lines as a table. A block whose integers Arrow may have read through
    doubles is parsed line by line instead: with a schema, its schema columns are kept in
    their JSON spelling for the exact conversion; without one, a column that mixes integers
    no double holds with fractions is text (:func:`_mixed_records`)."""
    try:
        table = pajson.read_json(io.BytesIO(data))
        if not _inexact(table, schema):
            return table, table.num_rows
    except pa.ArrowInvalid:
        pass
    records = []
    rows_in = 0
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        rows_in += 1
        try:
            value = json.loads(line)
        except ValueError as exc:
            rejects.append(reject(part, number, f"invalid JSON: {exc}",
                                   line.decode("utf-8", "replace")))
            continue
        if not isinstance(value, dict):
            rejects.append(reject(part, number, "a JSONL row must be an object",
                                   line.decode("utf-8", "replace")))
            continue
        records.append(value)
    if schema is not None:
        return _spelled_records(records, schema, part), rows_in
    try:
        return pa.Table.from_pylist(records), rows_in
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _mixed_records(records, part), rows_in


def _spelled_records(records: list[dict[str, Any]], schema: Schema, part: ChunkPart
                     ) -> pa.Table:
    """JSON rows whose schema columns are kept as text in their JSON spelling (Python's
    parser reads integers exactly and floats to the nearest double, and spells both back
    as they were), for the exact conversion; other columns as :func:`_mixed_records`."""
    other = _mixed_records([{k: v for k, v in r.items() if k not in schema.columns}
                            for r in records], part)
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        if name in schema.columns:
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v)
                 for v in (r.get(name) for r in records)], type=pa.string())
        else:
            columns[name] = other.column(name)
    return pa.table(columns)


def _mixed_records(records: list[dict[str, Any]], part: ChunkPart) -> pa.Table:
    """JSON rows whose values disagree in type: such a column is stored as text.

    A value keeps its JSON spelling (``1``, ``true``, ``{"a": 2}``); a string stays itself.
    No row is lost, and the reader's schema unification reads the column as text too.
    """
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            logger.warning("%s [%d:%d]: column %r mixes types; stored as text", part.source,
                           part.start, part.end, name)
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                type=pa.string())
    return pa.table(columns)


def decode_part(part: ChunkPart, data: bytes, header: bytes, fmt: str, schema: Schema | None,
                 rejects: list[dict[str, Any]], options: Mapping[str, Any] | None,
                 text: Sequence[str] = ()) -> tuple[pa.Table, int]:
    """One block of a CSV or JSONL part, or (``data`` empty) one row group of a Parquet part
    (``part.row_groups`` holds the one), as a table; its bad rows become rejects."""
    if fmt == "csv":
        return _decode_csv(part, data, header, schema, rejects, text)
    if fmt == "jsonl":
        table, n = _decode_jsonl(part, data, rejects, schema)
    elif fmt == "parquet":
        try:
            fs, path = open_url(part.source, options)
            with fs.open(path, "rb") as fh:
                table = pq.ParquetFile(fh).read_row_groups(list(part.row_groups))
        except Exception as exc:
            raise FormatError(f"{part.source} row groups {part.row_groups} unreadable: "
                              f"{exc}", url=part.source, fmt="parquet") from exc
        n = table.num_rows
    else:
        raise FormatError(f"cannot decode format {fmt!r}", url=part.source, fmt=fmt)
    if schema is not None:
        table, rows = coerce(table, schema, part, rejects)
        table = apply_constraints(table, schema, part, rejects, rows)
    return table, n

