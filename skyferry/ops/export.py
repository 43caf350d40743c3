"""Read a committed dataset back the way a training job would.

Each chunk is read from a healthy replica and checked against its hash; a missing or
corrupt replica fails over to the next. Only chunks that a committed manifest lists are read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.errors import (
    ConfigError,
    IntegrityError,
    ManifestConflictError,
    StorageError,
    TopologyError,
    UnsafeKeyError,
)
from skyferry.evolution import chunk_schemas, conform, dataset_schema
from skyferry.hashing import content_hash
from skyferry.ingest.versions import LiveSource, live_parts, live_sources
from skyferry.models import SourceFile, StoredChunk
from skyferry.ops.formats import csv_schema, csv_table, write_jsonl
from skyferry.storage import Store
from skyferry.topology import Topology, load_topology

__all__ = ["EXPORT_SUFFIXES", "DatasetReader", "ExportReport", "export_dataset"]

logger = logging.getLogger("skyferry.ops.export")

# what a table export can write, by the target's name
EXPORT_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")


@dataclass
class ExportReport:
    batches: list[str] = field(default_factory=list)
    chunks: int = 0
    rows: int = 0
    bytes: int = 0
    failovers: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    superseded_chunks: int = 0


class DatasetReader:
    """Iterates a dataset's committed chunks as verified bytes or Arrow tables."""

    def __init__(self, dataset: str, *, topology: Topology | None = None,
                 batch_id: str | None = None) -> None:
        self.dataset = dataset
        self.topology = topology or load_topology()
        self.catalog = open_catalog(self.topology)
        self.batch_id = batch_id
        self.report = ExportReport()
        self._stores: dict[str, Store] = {}
        self._manifests: list[Manifest] | None = None
        self._live: dict[str, LiveSource] | None = None
        self._schema: pa.Schema | None = None

    def manifests(self) -> list[Manifest]:
        """The committed manifests read (read once per reader), oldest first."""
        if self._manifests is None:
            self._manifests = self._read_manifests()
        return self._manifests

    def _read_manifests(self) -> list[Manifest]:
        if self.batch_id is not None:
            return [self.catalog.manifest(self.dataset, self.batch_id)]
        manifests, unreadable = self.catalog.scan(self.dataset)
        self.report.unreadable = [str(e) for e in unreadable]
        for error in unreadable:  # copies that disagree: no copy is chosen for the reader
            if isinstance(error, ManifestConflictError):
                raise error
        if not manifests:
            if unreadable:
                raise unreadable[0]
            self.catalog.manifest(self.dataset)  # raises BatchNotFoundError
        return manifests

    def live(self) -> dict[str, LiveSource]:
        """Each source file's newest committed version (see :mod:`skyferry.ingest.versions`)."""
        if self._live is None:
            self._live = live_sources(self.manifests())
        return self._live

    def _store(self, node: str) -> Store:
        if node not in self._stores:
            self._stores[node] = self.topology.node(node).open_store()
        return self._stores[node]

    def _suspect(self, manifest: Manifest, chunk: StoredChunk, node: str, why: str) -> None:
        """Note a bad replica in the catalog, so that the next verify reads it first."""
        try:
            self.catalog.note_suspect(manifest.dataset, manifest.batch_id, chunk.index, node,
                                      why)
        except StorageError as exc:
            logger.warning("could not note the bad replica of chunk %d on %s: %s",
                           chunk.index, node, exc)

    def chunk_bytes(self, manifest: Manifest, chunk: StoredChunk) -> bytes:
        """The chunk's bytes from the first replica whose hash matches."""
        problems = []
        for replica in chunk.verified:
            try:
                data = self._store(replica.node).get(chunk.key)
            except (StorageError, TopologyError) as exc:
                problems.append(f"{replica.node}: {exc}")
                self._suspect(manifest, chunk, replica.node, str(exc))
                continue
            if len(data) == chunk.size and content_hash(data) == chunk.digest:
                if problems:
                    self.report.failovers.append(
                        f"chunk {chunk.index}: {'; '.join(problems)} -> read {replica.node}")
                    logger.warning("chunk %d failed over to %s (%s)", chunk.index,
                                   replica.node, "; ".join(problems))
                return data
            problems.append(f"{replica.node}: hash mismatch (replica corrupt)")
            self._suspect(manifest, chunk, replica.node, "hash mismatch")
        raise IntegrityError(
            f"no healthy replica of chunk {chunk.index} of {manifest.dataset}/batch="
            f"{manifest.batch_id}: {'; '.join(problems) or 'no verified replicas'}",
            dataset=manifest.dataset, batch_id=manifest.batch_id, chunk=chunk.index)

    def iter_chunks(self) -> Iterator[tuple[Manifest, StoredChunk, bytes]]:
        """Every chunk that holds a live source version (see :mod:`skyferry.ingest.versions`)."""
        for manifest in self.manifests():
            self.report.batches.append(manifest.batch_id)
            for chunk in manifest.chunks:
                if not any(live_parts(manifest, chunk, self.live())):
                    self.report.superseded_chunks += 1
                    continue
                data = self.chunk_bytes(manifest, chunk)
                self.report.chunks += 1
                self.report.bytes += len(data)
                yield manifest, chunk, data

    def schema(self) -> pa.Schema:
        """The dataset's schema, resolved from its chunks' (skyferry/evolution.py): every
        reader reads through it."""
        if self._schema is None:
            self._schema = dataset_schema(self.manifests(), self._store)
        return self._schema

    def chunk_schemas(self) -> Iterator[pa.Schema]:
        """Each chunk's Arrow schema, oldest batch first (see :func:`chunk_schemas`)."""
        return chunk_schemas(self.manifests(), self._store)

    def iter_tables(self) -> Iterator[pa.Table]:
        """Each chunk's rows, without those of source versions a newer one superseded."""
        for manifest, chunk, data in self.iter_chunks():
            if chunk.format == "binary":
                raise TypeError(f"dataset {self.dataset} holds binary chunks; use iter_files")
            table = pq.read_table(io.BytesIO(data))
            keep = live_parts(manifest, chunk, self.live())
            if not all(keep):
                table = _live_rows(table, chunk, keep)
            self.report.rows += table.num_rows
            yield table

    def read_table(self) -> pa.Table:
        schema = self.schema()
        tables = [conform(t, schema) for t in self.iter_tables()]
        return pa.concat_tables(tables) if tables else schema.empty_table()


def _live_rows(table: pa.Table, chunk: StoredChunk, keep: list[bool]) -> pa.Table:
    """The rows of the parts in ``keep``, by the chunk's rows per part."""
    if len(chunk.part_rows) != len(chunk.parts):  # written before rows were kept per part
        logger.warning("chunk %d holds superseded rows it cannot tell apart; read whole",
                       chunk.index)
        return table
    pieces, offset = [], 0
    for rows, live in zip(chunk.part_rows, keep, strict=True):
        if live:
            pieces.append(table.slice(offset, rows))
        offset += rows
    return pa.concat_tables(pieces) if pieces else table.slice(0, 0)


def _relative_path(file: SourceFile) -> PurePosixPath:
    """Where an export writes ``file``: its path below the source's root, checked."""
    rel = PurePosixPath(file.path or file.url.rstrip("/").rsplit("/", 1)[-1])
    if rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts) or not rel.parts:
        raise UnsafeKeyError(f"source path {str(rel)!r} of {file.url} would leave the export "
                             "folder", key=str(rel))
    return rel


def _export_binary(reader: DatasetReader, target: Path) -> None:
    """Write every live source file at its relative path, byte for byte.

    Files are written beside their final names as ``.partial`` files; each must be covered
    exactly by its parts before it is renamed into place, so a failed export leaves no file
    that looks whole.
    """
    live = reader.live()
    paths = {url: _relative_path(src.file) for url, src in live.items()}
    seen: dict[PurePosixPath, str] = {}
    for url, rel in paths.items():
        if rel in seen:
            raise IntegrityError(f"{seen[rel]} and {url} would both export to {rel}",
                                 dataset=reader.dataset, batch_id="", chunk=-1)
        seen[rel] = url
    target.mkdir(parents=True, exist_ok=True)
    partial = {url: target / rel.parent / f".{rel.name}.partial" for url, rel in paths.items()}
    covered: dict[str, int] = {url: 0 for url in live}
    try:
        for manifest, chunk, data in reader.iter_chunks():
            offset = 0
            for part in chunk.parts:
                source = live.get(part.source)
                if source is not None and manifest.batch_id in source.batches:
                    tmp = partial[part.source]
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    with open(tmp, "r+b" if tmp.exists() else "wb") as fh:
                        fh.seek(part.start)
                        fh.write(data[offset:offset + part.size])
                    covered[part.source] += part.size
                offset += part.size
        for url, src in live.items():
            if covered[url] != src.file.size:
                raise IntegrityError(
                    f"the committed chunks hold {covered[url]} of the {src.file.size} bytes of "
                    f"{url}", dataset=reader.dataset, batch_id=",".join(sorted(src.batches)),
                    chunk=-1)
            with open(partial[url], "r+b") as fh:
                fh.truncate(src.file.size)
                os.fsync(fh.fileno())
        for url, rel in paths.items():
            os.replace(partial[url], target / rel)
    finally:
        for tmp in partial.values():
            tmp.unlink(missing_ok=True)


def export_dataset(dataset: str, to: str | Path, *, batch_id: str | None = None,
                   topology: Topology | None = None) -> ExportReport:
    """Write the dataset to ``to``: Parquet, or CSV/JSONL by extension (a folder for binary)."""
    reader = DatasetReader(dataset, topology=topology, batch_id=batch_id)
    target = Path(to)
    manifests = reader.manifests()
    if manifests and manifests[0].chunks and manifests[0].chunks[0].format == "binary":
        _export_binary(reader, target)
        return reader.report
    suffix = target.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise ConfigError(f"cannot export {dataset!r} to {str(target)!r}: the name must end in "
                          f"{', '.join(EXPORT_SUFFIXES)}", source=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    schema = reader.schema()
    try:
        with open(tmp, "wb") as sink:
            _write_tables(reader, sink, schema, suffix)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return reader.report


def _write_tables(reader: DatasetReader, sink: BinaryIO, schema: pa.Schema, suffix: str) -> None:
    """Every verified table of the dataset into ``sink``: CSV, JSON Lines, or Parquet."""
    writer: pq.ParquetWriter | pacsv.CSVWriter | None = None
    if suffix == ".csv":
        writer = pacsv.CSVWriter(sink, csv_schema(schema))
    elif suffix not in (".jsonl", ".ndjson", ".json"):
        writer = pq.ParquetWriter(sink, schema, compression="zstd")
    try:
        for table in reader.iter_tables():
            table = conform(table, schema)
            if writer is None:
                write_jsonl(table, sink)
            elif suffix == ".csv":
                writer.write_table(csv_table(table))
            else:
                writer.write_table(table)
    except BaseException:
        if writer is not None:  # while the sink is open: no footer into a closed file later
            with contextlib.suppress(Exception):
                writer.close()
        raise
    if writer is not None:
        writer.close()

