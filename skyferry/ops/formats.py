"""Exact text encodings of Arrow tables for export: JSON Lines and CSV.

JSON Lines writes every value so that it reads back to the same value: integers as JSON
integers (any size), floats in their shortest spelling that reads back to the same double
(``NaN``, ``Infinity`` and ``-Infinity`` as Python's and pandas' readers spell them),
timestamps as ISO 8601 with their full precision and their zone (``+00:00`` for UTC; none
for a naive one), decimals as strings of their digits (a JSON number would be read as a
double), binary as base64 text, and nested values as JSON arrays and objects.

CSV has no nested values: a list, struct or map column is written as its JSON text.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from decimal import Decimal
from typing import Any, BinaryIO

import pyarrow as pa

__all__ = ["csv_schema", "csv_table", "write_jsonl"]


def _plain(value: Any) -> Any:
    """A value that :mod:`json` cannot write, as the text that keeps it exactly."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()  # a pandas Timestamp (nanoseconds) is a datetime too
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.timedelta):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_jsonl(table: pa.Table, sink: BinaryIO) -> None:
    """``table``'s rows as JSON Lines into ``sink``, a record batch at a time."""
    for batch in table.to_batches(max_chunksize=65_536):
        lines = [json.dumps(row, default=_plain, ensure_ascii=False)
                 for row in batch.to_pylist()]
        if lines:
            sink.write(("\n".join(lines) + "\n").encode())


def _nested(type_: pa.DataType) -> bool:
    return pa.types.is_nested(type_) or pa.types.is_dictionary(type_) and pa.types.is_nested(
        type_.value_type)


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with each nested column as text, which CSV can hold."""
    return pa.schema([pa.field(f.name, pa.string()) if _nested(f.type) else f for f in schema])


def csv_table(table: pa.Table) -> pa.Table:
    """``table`` with each nested column as the JSON text of its values."""
    if not any(_nested(f.type) for f in table.schema):
        return table
    columns = []
    for column in table.columns:
        if _nested(column.type):
            column = pa.array([None if v is None else json.dumps(v, default=_plain)
                               for v in column.to_pylist()], type=pa.string())
        columns.append(column)
    return pa.table(dict(zip(table.column_names, columns, strict=True)))
