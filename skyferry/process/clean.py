"""Decode a chunk, validate it against a schema, apply transforms, encode Parquet.

Invalid rows are never dropped silently: each becomes a reject with its reason, its source
and its row. Transforms may add or drop rows; each chunk counts them, so that for every chunk
``rows_in + rows_added - rows_dropped == rows_out + rows_rejected``.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from skyferry.errors import FormatError, SchemaError, TransformError
from skyferry.ingest.chunking import csv_record_around
from skyferry.models import ChunkPart
from skyferry.process.convert import convert_column
from skyferry.process.schema import Schema
from skyferry.storage import open_url

__all__ = ["ChunkEncoder", "ProcessOutput", "SchemaDrift", "Transform", "conform",
           "load_transforms", "widen"]

logger = logging.getLogger("skyferry.process")

Transform = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass
class ProcessOutput:
    """A chunk's counts: rows read, each part's rows stored (in order), rejects, and the
    rows transforms added or dropped."""

    rows_in: int = 0
    part_rows: list[int] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    rows_added: int = 0
    rows_dropped: int = 0
    columns: pa.Schema | None = None  # the stored file's columns

    @property
    def rows_rejected(self) -> int:
        return sum(int(r.get("count", 1)) for r in self.rejects)


def load_transforms(names: Sequence[str]) -> list[tuple[str, Transform]]:
    loaded = []
    for name in names:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise TransformError(f"cannot import transform {name!r}: {exc}",
                                 transform=name) from exc
        if not callable(fn):
            raise TransformError(f"transform {name!r} is not callable", transform=name)
        loaded.append((name, fn))
    return loaded


def _reject(part: ChunkPart, row: int | None, reason: str, text: str | None) -> dict[str, Any]:
    return {"source": part.source, "offset": part.start, "row": row, "reason": reason,
            "text": text}


def _coerce(table: pa.Table, schema: Schema, part: ChunkPart, rejects: list[dict[str, Any]],
            raw: pa.Table | None = None) -> tuple[pa.Table, np.ndarray]:
    """Convert ``table`` to the schema exactly (skyferry/process/convert.py); a row with a
    value that does not convert becomes a reject with its reason. Returns the kept rows and
    their positions in ``table``."""
    missing = [c for c in schema.columns if c not in table.column_names]
    if missing:
        raise SchemaError(
            f"{part.source} lacks schema columns {missing}; it has {table.column_names}",
            source=part.source,
        )
    reasons: dict[int, str] = {}
    columns = dict(zip(table.column_names, table.columns, strict=True))
    for name, col in schema.columns.items():
        columns[name], bad = convert_column(table.column(name), col.arrow_type, name, col.type)
        for i, why in bad.items():
            reasons.setdefault(i, why)
    typed = pa.table({n: columns[n] for n in table.column_names})
    rows = np.arange(table.num_rows)
    if reasons:
        texts = raw if raw is not None else table
        for i in sorted(reasons):
            row = {n: texts.column(n)[i].as_py() for n in texts.column_names}
            rejects.append(_reject(part, i + 1, reasons[i], json.dumps(row, default=str)))
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(reasons)] = False
        typed, rows = typed.filter(pa.array(keep)), rows[keep]
    return typed, rows


def _apply_constraints(table: pa.Table, schema: Schema, part: ChunkPart,
                       rejects: list[dict[str, Any]], rows: np.ndarray) -> pa.Table:
    """Rows that break a schema rule become rejects; ``rows`` holds each row's position in
    its block as decoded, which a reject names."""
    bad = None
    reason_for: dict[int, str] = {}
    for reason, mask in schema.constraint_masks(table):
        if not pc.any(mask).as_py():
            continue
        for i in pc.indices_nonzero(mask).to_pylist():
            reason_for.setdefault(i, reason)
        bad = mask if bad is None else pc.or_(bad, mask)
    if bad is None:
        return table
    for i in sorted(reason_for):
        row = {n: table.column(n)[i].as_py() for n in table.column_names}
        rejects.append(_reject(part, int(rows[i]) + 1, reason_for[i],
                               json.dumps(row, default=str)))
    return table.filter(pc.invert(bad))


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
    if not _is_utf8(data):  # pyarrow cannot hand a malformed row that is not UTF-8 to us
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
        rejects.append(_reject(
            part, row.number,
            f"expected {row.expected_columns} columns, found {row.actual_columns}", row.text,
        ))
    rows_in = table.num_rows + len(invalid)
    table = _as_text(table)  # the data is UTF-8 here: _decode_csv_by_record took the rest
    if raw is not None:
        raw = table
    if schema is not None:
        table, rows = _coerce(table, schema, part, rejects, raw)
        table = _apply_constraints(table, schema, part, rejects, rows)
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
            rejects.append(_reject(part, row, f"expected {len(names)} columns, found "
                                   f"{len(fields)}", line.decode("utf-8", "replace")))
            continue
        column = next(n for n, f in zip(names, fields, strict=True)
                      if not _is_utf8(f.encode("utf-8", "surrogateescape")))
        values = {n: (f.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                      if f else None) for n, f in zip(names, fields, strict=True)}
        rejects.append(_reject(part, row, f"column {column!r}: invalid UTF-8",
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


def _is_utf8(value: bytes | None) -> bool:
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
            rejects.append(_reject(part, number, f"invalid JSON: {exc}",
                                   line.decode("utf-8", "replace")))
            continue
        if not isinstance(value, dict):
            rejects.append(_reject(part, number, "a JSONL row must be an object",
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


def _decode_part(part: ChunkPart, data: bytes, header: bytes, fmt: str, schema: Schema | None,
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
        table, rows = _coerce(table, schema, part, rejects)
        table = _apply_constraints(table, schema, part, rejects, rows)
    return table, n


def _transform(table: pa.Table, out: ProcessOutput, transforms: Sequence[tuple[str, Transform]],
               where: str) -> pa.Table:
    frame = table.to_pandas()
    for name, fn in transforms:
        before = len(frame)
        try:
            result = fn(frame)
        except Exception as exc:
            raise TransformError(f"transform {name} failed on {where}: {exc}",
                                 transform=name, source=where) from exc
        if not isinstance(result, pd.DataFrame):
            raise TransformError(f"transform {name} returned {type(result).__name__}, "
                                 "not a DataFrame", transform=name, source=where)
        change = len(result) - before
        if change:
            logger.info("transform %s %s %d rows of %s", name,
                        "added" if change > 0 else "dropped", abs(change), where)
        out.rows_added += max(change, 0)
        out.rows_dropped += max(-change, 0)
        frame = result
    return pa.Table.from_pandas(frame, preserve_index=False)


class SchemaDrift(Exception):  # noqa: N818 (a signal to start the chunk over, not a failure)
    """A block's columns do not fit the Parquet file being written: the chunk must be
    encoded again from its start with :attr:`schema`, which fits every block seen so far."""

    def __init__(self, schema: pa.Schema) -> None:
        super().__init__(f"the chunk's columns widen to {schema}")
        self.schema = schema


def _wider(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The narrowest type that holds values of both: null < int64 < float64 < string."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in (a, b)):
        return pa.float64()
    return pa.string()


def widen(schema: pa.Schema, table: pa.Table) -> pa.Schema:
    """Both sides' columns, in order of appearance, each of the wider type. An integer column
    with a value beyond 2^53 that meets a float column is text: no double holds it exactly."""
    types = {f.name: f.type for f in schema}
    for field_ in table.schema:
        if field_.name not in types:
            types[field_.name] = field_.type
            continue
        kind = _wider(types[field_.name], field_.type)
        if pa.types.is_floating(kind) and beyond_double(table.column(field_.name)):
            kind = pa.string()
        types[field_.name] = kind
    return pa.schema(list(types.items()))


BEYOND_DOUBLE = b"skyferry.beyond_double"  # field metadata: the column has such integers


def beyond_double(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether an integer column holds a value that no double holds exactly (beyond 2^53)."""
    if not pa.types.is_integer(column.type) or len(column) == column.null_count:
        return False
    extremes = pc.min_max(column)
    return max(abs(extremes["min"].as_py()), abs(extremes["max"].as_py())) > 2 ** 53


def _spelled(column: pa.ChunkedArray) -> pa.Array:
    """Values as text in their JSON spelling (``1``, ``true``, ``{"a": 2}``); text stays."""
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str)
                     for v in column.to_pylist()], type=pa.string())


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """``table`` with exactly ``schema``'s columns and types (a missing column is nulls), or
    None when one of its columns is not in ``schema`` or does not fit its type."""
    if any(name not in schema.names for name in table.column_names):
        return None
    columns = []
    for field_ in schema:
        if field_.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field_.type))
            continue
        column = table.column(field_.name)
        if column.type == field_.type:
            columns.append(column)
        elif _wider(field_.type, column.type) != field_.type:
            return None
        elif pa.types.is_string(field_.type) and not pa.types.is_null(column.type):
            columns.append(_spelled(column))
        elif pa.types.is_floating(field_.type) and beyond_double(column):
            return None
        else:
            columns.append(pc.cast(column, field_.type))
    return pa.Table.from_arrays(columns, schema=schema)


class ChunkEncoder:
    """Encodes a chunk block by block into one zstd Parquet file written to ``sink``, one
    row group per block: memory holds a block's rows, never the chunk's.

    Each block is decoded, validated and transformed on its own: a transform sees the rows
    of one block (a few MB), not the whole chunk. The file's columns are fixed by its first
    rows (or by ``schema``); a later block whose columns do not fit raises
    :class:`SchemaDrift` with the widened schema, and the caller starts the chunk over with
    it. Dictionary encoding is used only where it can pay: not on floating-point columns,
    whose values rarely repeat.
    """

    def __init__(self, fmt: str, schema: Schema | None,
                 transforms: Sequence[tuple[str, Transform]], where: str,
                 options: Mapping[str, Any] | None, sink: Any,
                 columns: pa.Schema | None = None) -> None:
        self.fmt, self.schema, self.transforms, self.where = fmt, schema, transforms, where
        self.options, self.sink, self.columns = options, sink, columns
        self.out = ProcessOutput()
        self.part_rows: dict[tuple[str, int], int] = {}
        self.seconds = 0.0
        self._writer: pq.ParquetWriter | None = None
        self._empty: pa.Table | None = None
        self._beyond: set[str] = set()  # integer columns with values beyond 2^53

    def add(self, part: ChunkPart, data: bytes = b"", header: bytes = b"",
            offset: int | None = None) -> None:
        """Decode one block of ``part``, starting at ``offset`` of its source (or, for
        Parquet, each of its row groups), and write its rows as a row group."""
        began = time.perf_counter()
        try:
            if self.fmt == "parquet":
                for group in part.row_groups:
                    self._add(part, part.model_copy(update={"row_groups": (group,)}), b"",
                              b"")
            else:
                at = part.start if offset is None else offset
                self._add(part, part.model_copy(update={"start": at, "end": at + len(data)}),
                          data, header)
        finally:
            self.seconds += time.perf_counter() - began

    def _add(self, part: ChunkPart, piece: ChunkPart, data: bytes, header: bytes) -> None:
        text = [f.name for f in self.columns if pa.types.is_string(f.type)] \
            if self.columns is not None and self.fmt == "csv" else []
        try:
            table, n = _decode_part(piece, data, header, self.fmt, self.schema,
                                    self.out.rejects, self.options, text)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise FormatError(f"{part.source} [{piece.start}:{piece.end}] cannot be read as "
                              f"{self.fmt}: {exc}", url=part.source, fmt=self.fmt) from exc
        self.out.rows_in += n
        if self.transforms:
            table = _transform(table, self.out, self.transforms, self.where)
        key = (part.source, part.start)
        self.part_rows[key] = self.part_rows.get(key, 0) + table.num_rows
        self._write(table)

    def _write(self, table: pa.Table) -> None:
        if self.columns is None:
            if table.num_rows == 0 and self._writer is None:
                self._empty = table  # no rows yet: its columns fix nothing
                return
            self.columns = pa.schema([(f.name, f.type) for f in table.schema])
        fitted = conform(table, self.columns)
        if fitted is None:
            raise SchemaDrift(widen(self.columns, table))
        self._beyond.update(f.name for f in fitted.schema
                            if beyond_double(fitted.column(f.name)))
        if fitted.num_rows == 0 and self._writer is not None:
            return
        if self._writer is None:
            self._open_writer()
        assert self._writer is not None
        self._writer.write_table(fitted, row_group_size=max(1, fitted.num_rows))

    def _open_writer(self) -> None:
        """The chunk's Parquet writer: zstd, dictionary encoding on every column but floats."""
        assert self.columns is not None
        dictionary = [f.name for f in self.columns if not pa.types.is_floating(f.type)]
        self._writer = pq.ParquetWriter(self.sink, self.columns, compression="zstd",
                                        use_dictionary=dictionary)

    def close(self, parts: Sequence[ChunkPart]) -> ProcessOutput:
        """Finish the file; the chunk's counts, with each part's rows in ``parts``' order."""
        if self._writer is None:  # no rows at all: an empty file with the columns seen
            empty = self._empty if self._empty is not None else pa.table({})
            self.columns = self.columns or pa.schema([(f.name, f.type) for f in empty.schema])
            self._write(empty)
            if self._writer is None:
                self._open_writer()
        assert self._writer is not None
        self._writer.close()
        assert self.columns is not None
        self.out.columns = pa.schema([  # for the dataset's schema: see skyferry/evolution.py
            f.with_metadata({BEYOND_DOUBLE: b"true"}) if f.name in self._beyond else f
            for f in self.columns])
        self.out.part_rows = [self.part_rows.get((p.source, p.start), 0) for p in parts]
        return self.out
