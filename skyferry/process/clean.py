"""Process a chunk block by block: decode, validate, transform, encode Parquet.

Invalid rows are never dropped silently: each becomes a reject with its reason, its source
and its row. Transforms may add or drop rows; each chunk counts them, so that for every chunk
``rows_in + rows_added - rows_dropped == rows_out + rows_rejected``. The steps live in
:mod:`~skyferry.process.decode`, :mod:`~skyferry.process.validate`,
:mod:`~skyferry.process.transform` and :mod:`~skyferry.process.encode`; this module runs
them over a chunk's blocks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from skyferry.errors import FormatError
from skyferry.evolution import BEYOND_DOUBLE, beyond_double
from skyferry.models import ChunkPart
from skyferry.process.decode import decode_part
from skyferry.process.encode import SchemaDrift, fit, open_writer, widen
from skyferry.process.schema import Schema
from skyferry.process.transform import Transform, apply_transforms

__all__ = ["ChunkEncoder", "ProcessOutput"]


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
            table, n = decode_part(piece, data, header, self.fmt, self.schema,
                                    self.out.rejects, self.options, text)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise FormatError(f"{part.source} [{piece.start}:{piece.end}] cannot be read as "
                              f"{self.fmt}: {exc}", url=part.source, fmt=self.fmt) from exc
        self.out.rows_in += n
        if self.transforms:
            table, added, dropped = apply_transforms(table, self.transforms, self.where)
            self.out.rows_added += added
            self.out.rows_dropped += dropped
        key = (part.source, part.start)
        self.part_rows[key] = self.part_rows.get(key, 0) + table.num_rows
        self._write(table)

    def _write(self, table: pa.Table) -> None:
        if self.columns is None:
            if table.num_rows == 0 and self._writer is None:
                self._empty = table  # no rows yet: its columns fix nothing
                return
            self.columns = pa.schema([(f.name, f.type) for f in table.schema])
        fitted = fit(table, self.columns)
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
        assert self.columns is not None
        self._writer = open_writer(self.sink, self.columns)

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

