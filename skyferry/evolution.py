"""One schema for a dataset whose batches (and chunks) were typed apart.

Every reader (``export``, ``DatasetReader``, ``TrainingReader`` and its front ends) reads a
dataset through the schema :func:`resolve` makes from its chunks' schemas, each chunk's rows
made to fit it by :func:`conform`. The rules, which docs/schema.md states for users:

- a column is in the dataset's schema if any chunk has it, in the order of first appearance;
  a chunk without it reads as nulls (every column is nullable);
- integers of any width are ``int64``; floats are ``float64``; an integer column that meets
  a float column is ``float64`` when every integer converts exactly, and text when one is
  beyond 2^53 (each chunk's manifest entry marks such a column); a chunk committed before
  manifests marked it that holds one is a typed
  :class:`~skyferry.errors.SchemaEvolutionError` naming the column;
- timestamps with the same zone take the finer unit; decimals take the larger scale and the
  digits both need;
- any other disagreement, nested columns included (``[1]`` in one chunk, ``["a"]`` in
  another), makes the column text: each value in its JSON spelling (``1``, ``[1]``,
  ``{"a": 2}``), text as it is. No value is lost, and every reader reads the same rows.

A dataset with a schema file (docs/schema.md) has the same types in every batch, and none of
this applies.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skyferry.commit.manifest import Manifest
from skyferry.errors import IntegrityError, SchemaEvolutionError
from skyferry.process.convert import spelled
from skyferry.storage import Store

__all__ = ["BEYOND_DOUBLE", "beyond_double", "chunk_schemas", "conform", "dataset_schema",
           "decode_schema", "encode_schema", "resolve", "wider"]

logger = logging.getLogger("skyferry.read")


BEYOND_DOUBLE = b"skyferry.beyond_double"  # field metadata: the column has such integers


def beyond_double(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether an integer column holds a value that no double holds exactly (beyond 2^53)."""
    if not pa.types.is_integer(column.type) or len(column) == column.null_count:
        return False
    extremes = pc.min_max(column)
    return max(abs(extremes["min"].as_py()), abs(extremes["max"].as_py())) > 2 ** 53


def encode_schema(schema: pa.Schema) -> str:
    """``schema`` as text for a manifest: Arrow's own serialization, base64."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def wider(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The type that holds the values of both (see the module's rules)."""
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(a) for f in numeric) and any(f(b) for f in numeric):
        return pa.float64()
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b) and a.tz == b.tz:
        units = ["s", "ms", "us", "ns"]
        return pa.timestamp(max(a.unit, b.unit, key=units.index), a.tz)
    if pa.types.is_decimal(a) and pa.types.is_decimal(b):
        scale = max(a.scale, b.scale)
        precision = max(a.precision - a.scale, b.precision - b.scale) + scale
        if precision <= 38:
            return pa.decimal128(precision, scale)
        if precision <= 76:
            return pa.decimal256(precision, scale)
    return pa.string()


def resolve(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """The dataset's schema from its chunks' schemas, oldest first."""
    types: dict[str, pa.DataType] = {}
    beyond: set[str] = set()  # integer columns that hold values no double holds exactly
    for schema in schemas:
        for field in schema:
            types[field.name] = wider(types[field.name], field.type) \
                if field.name in types else field.type
            if (field.metadata or {}).get(BEYOND_DOUBLE):
                beyond.add(field.name)
    return pa.schema([pa.field(name, pa.string() if name in beyond and
                               pa.types.is_floating(kind) else kind, nullable=True)
                      for name, kind in types.items()])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s rows with exactly ``schema``'s columns and types (see the module).

    A column of ``table`` that ``schema`` lacks is a programming error: the schema is
    resolved from every chunk, this one's included."""
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise SchemaEvolutionError(f"columns {extra} are not in the dataset's schema",
                                   column=extra[0])
    if table.schema.equals(schema, check_metadata=False):
        return table
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type == field.type:
            columns.append(column)
        elif pa.types.is_string(field.type):
            columns.append(spelled(column.combine_chunks()))
        else:
            try:
                columns.append(pc.cast(column, field.type))  # checked: exact or an error
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaEvolutionError(
                    f"column {field.name!r} is {column.type} in one chunk and resolves to "
                    f"{field.type} for the dataset, and a value does not convert exactly: "
                    f"{exc}", column=field.name) from exc
    return pa.Table.from_arrays(columns, schema=schema)


def chunk_schemas(manifests: Sequence[Manifest], store_of: Callable[[str], Store]
                  ) -> Iterator[pa.Schema]:
    """Each table chunk's schema, oldest batch first: from its manifest, or, for a chunk
    committed before manifests kept it, from its Parquet footer on a verified replica (a
    small ranged read through ``store_of(node)``)."""
    for manifest in manifests:
        for chunk in manifest.chunks:
            if chunk.format == "binary":
                continue
            if chunk.columns is not None:
                yield decode_schema(chunk.columns)
                continue
            for replica in chunk.verified:
                try:
                    store = store_of(replica.node)
                    with store.fs.open(store.path(chunk.key), "rb") as fh:
                        yield pq.read_schema(fh)
                    break
                except Exception as exc:  # a bad replica: the next one may do
                    logger.warning("cannot read the schema of chunk %d on %s: %s",
                                   chunk.index, replica.node, exc)
            else:
                raise IntegrityError(
                    f"no readable replica of chunk {chunk.index} of {manifest.dataset}",
                    dataset=manifest.dataset, batch_id=manifest.batch_id, chunk=chunk.index)


def dataset_schema(manifests: Sequence[Manifest], store_of: Callable[[str], Store]
                   ) -> pa.Schema:
    """The schema every reader of these manifests reads through."""
    return resolve(chunk_schemas(manifests, store_of))
