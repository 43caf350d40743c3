"""The columns of a chunk's Parquet file, and the writer that encodes it.

A chunk's file has one set of columns. A block whose columns do not fit them widens them
(:func:`widen`, with the dataset's rules of :mod:`skyferry.evolution`), and the chunk is
encoded again from its start (:class:`SchemaDrift`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from skyferry.evolution import beyond_double, conform, wider

__all__ = ["SchemaDrift", "fit", "open_writer", "widen"]


class SchemaDrift(Exception):  # noqa: N818 (a signal to start the chunk over, not a failure)
    """A block's columns do not fit the Parquet file being written: the chunk must be
    encoded again from its start with :attr:`schema`, which fits every block seen so far."""

    def __init__(self, schema: pa.Schema) -> None:
        super().__init__(f"the chunk's columns widen to {schema}")
        self.schema = schema


def widen(schema: pa.Schema, table: pa.Table) -> pa.Schema:
    """Both sides' columns, in order of appearance, each of the wider type. An integer column
    with a value beyond 2^53 that meets a float column is text: no double holds it exactly."""
    types = {f.name: f.type for f in schema}
    for field_ in table.schema:
        if field_.name not in types:
            types[field_.name] = field_.type
            continue
        kind = wider(types[field_.name], field_.type)
        if pa.types.is_floating(kind) and beyond_double(table.column(field_.name)):
            kind = pa.string()
        types[field_.name] = kind
    return pa.schema(list(types.items()))


def fit(table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """``table`` with exactly ``schema``'s columns and types (a missing column is nulls, see
    :func:`skyferry.evolution.conform`), or None when one of its columns is not in
    ``schema`` or does not fit its type exactly."""
    for name in table.column_names:
        if name not in schema.names:
            return None
        column, kind = table.column(name), schema.field(name).type
        if column.type != kind and (wider(kind, column.type) != kind or (
                pa.types.is_floating(kind) and beyond_double(column))):
            return None
    return conform(table, schema)


def open_writer(sink: Any, columns: pa.Schema) -> pq.ParquetWriter:
    """A chunk's Parquet writer: zstd, dictionary encoding on every column but floats (whose
    values rarely repeat)."""
    dictionary = [f.name for f in columns if not pa.types.is_floating(f.type)]
    return pq.ParquetWriter(sink, columns, compression="zstd", use_dictionary=dictionary)
