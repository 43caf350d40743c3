"""Read a committed dataset back the way a training job would, and export it.

Each chunk is streamed from a healthy replica and checked against its hash as it lands
(:mod:`skyferry.distribute.access`); a missing or corrupt replica fails over to the next.
Only chunks that a committed manifest lists are read. Memory is bounded by a block and a
row group, not by the chunk or the dataset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.names import Names, is_sealed
from skyferry.commit.retention import PIN_TTL_S, SnapshotPin
from skyferry.commit.snapshots import Snapshot, SnapshotLog, committed
from skyferry.distribute.access import ChunkOutput, FileOutput, ReplicaRef, Replicas
from skyferry.errors import (
    ConfigError,
    IntegrityError,
    UnsafeKeyError,
)
from skyferry.evolution import chunk_schemas, conform, dataset_schema
from skyferry.ingest.versions import LiveSource, live_parts, readable_sources
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
    snapshot: str | None = None  # the id of the snapshot read (None: no snapshot log)


class DatasetReader:
    """Iterates a dataset's committed chunks, each read through
    :class:`~skyferry.distribute.access.Replicas` (streamed, verified, failed over), as
    Arrow tables or into a caller's output. A table chunk is read into a local file in
    ``spool`` (default: the temp folder) first, so that no row is decoded before the
    whole chunk matched its hash; it is then read one row group at a time."""

    def __init__(self, dataset: str, *, topology: Topology | None = None,
                 batch_id: str | None = None, spool: Path | None = None,
                 snapshot: str | None = None, pin_ttl_s: float | None = PIN_TTL_S,
                 keys: str | None = None) -> None:
        self.dataset = dataset
        self.pin_ttl_s = pin_ttl_s  # the snapshot is pinned while the reader reads (None: not)
        self._pin: SnapshotPin | None = None
        self.snapshot_ref = snapshot  # None: the newest snapshot when the reader opens
        self.snapshot: Snapshot | None = None
        self.topology = topology or load_topology()
        self.catalog = open_catalog(self.topology)
        self.batch_id = batch_id
        self.spool = spool
        self.report = ExportReport()
        self.replicas = Replicas(self.topology, self.catalog, keys=keys)
        self.replicas.failovers = self.report.failovers
        self._manifests: list[Manifest] | None = None
        self._live: dict[str, LiveSource] | None = None
        self._real: dict[str, tuple[str, str]] | None = None  # pseudonym -> (url, path)
        self._schema: pa.Schema | None = None

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the snapshot's pin."""
        if self._pin is not None:
            self._pin.release()
            self._pin = None

    def manifests(self) -> list[Manifest]:
        """The committed manifests read (read once per reader), oldest first."""
        if self._manifests is None:
            self._manifests = self._read_manifests()
        return self._manifests

    def _read_manifests(self) -> list[Manifest]:
        if self.batch_id is not None:
            return [self.catalog.manifest(self.dataset, self.batch_id)]
        chosen = SnapshotLog(self.catalog, self.dataset).resolve(self.snapshot_ref)
        if chosen is not None and self.pin_ttl_s:  # pinned before its manifests are read
            self._pin = SnapshotPin.held_by(self, SnapshotLog(self.catalog, self.dataset),
                                            chosen, ttl_s=self.pin_ttl_s)
        read = committed(self.catalog, self.dataset, chosen)
        self.snapshot = read.snapshot
        self.report.snapshot = read.snapshot.id if read.snapshot else None
        self.report.unreadable = [str(e) for e in read.unreadable]  # batches left out
        return read.manifests

    def real_file(self, file: SourceFile) -> SourceFile:
        """``file`` with its real URL and path: an encrypted dataset's manifests name
        sources by pseudonyms (skyferry/commit/names.py), opened here with the keys."""
        if not is_sealed(file.url):
            return file
        if self._real is None:
            self._real = {}
            for manifest in self.manifests():
                sealed = manifest.sealed_names
                if sealed is None:
                    continue
                keyring = self.replicas.keyring()
                key = keyring.unwrap(bytes.fromhex(sealed.key_id), sealed.wrapped)
                names = Names(self.dataset, key, sealed.wrapped)
                self._real.update(names.open(sealed, manifest.batch_id))
        if file.url not in self._real:
            raise IntegrityError(f"no manifest of {self.dataset} holds the real name of "
                                 f"{file.url}", dataset=self.dataset, batch_id="", chunk=-1)
        url, path = self._real[file.url]
        return file.model_copy(update={"url": url, "path": path})

    def live(self) -> dict[str, LiveSource]:
        """Each source file's newest committed version (see :mod:`skyferry.ingest.versions`)."""
        if self._live is None:
            self._live = readable_sources(self.manifests())
        return self._live

    def _store(self, node: str) -> Store:
        return self.replicas.store(node)

    def iter_chunks(self) -> Iterator[tuple[Manifest, StoredChunk]]:
        """Every chunk that holds a live source version (see :mod:`skyferry.ingest.versions`)."""
        live = self.live()  # raises first when the snapshot has expired
        for manifest in self.manifests():
            self.report.batches.append(manifest.batch_id)
            for chunk in manifest.chunks:
                if not any(live_parts(manifest, chunk, live)):
                    self.report.superseded_chunks += 1
                    continue
                yield manifest, chunk

    def read_chunk(self, manifest: Manifest, chunk: StoredChunk,
                   output: Callable[[], ChunkOutput]) -> None:
        """The chunk's verified bytes into ``output`` (see :meth:`Replicas.read`)."""
        self.replicas.read(ReplicaRef.of(manifest, chunk), output)
        self.report.chunks += 1
        self.report.bytes += chunk.size

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
        """The live rows of each chunk, a row group at a time (rows of source versions a
        newer one superseded are left out)."""
        with tempfile.TemporaryDirectory(prefix=".skyferry-read-", dir=self.spool) as spool:
            for manifest, chunk in self.iter_chunks():
                if chunk.format == "binary":
                    raise TypeError(f"dataset {self.dataset} holds binary chunks; export it "
                                    "to a folder")
                path = Path(spool) / f"{chunk.digest}.parquet"
                self.read_chunk(manifest, chunk, partial(FileOutput, path))
                try:
                    keep = live_parts(manifest, chunk, self.live())
                    for table in _live_row_groups(pq.ParquetFile(path), chunk, keep):
                        self.report.rows += table.num_rows
                        yield table
                finally:
                    path.unlink(missing_ok=True)

    def read_table(self) -> pa.Table:
        schema = self.schema()
        tables = [conform(t, schema) for t in self.iter_tables()]
        return pa.concat_tables(tables) if tables else schema.empty_table()


def _live_row_groups(parquet: pq.ParquetFile, chunk: StoredChunk, keep: list[bool]
                     ) -> Iterator[pa.Table]:
    """The chunk's row groups, each without the rows of the parts not in ``keep`` (by the
    chunk's rows per part)."""
    live: list[tuple[int, int]] | None = None  # (first row, end) of each live part
    if not all(keep):
        if len(chunk.part_rows) != len(chunk.parts):  # written before rows were kept per part
            logger.warning("chunk %d holds superseded rows it cannot tell apart; read whole",
                           chunk.index)
        else:
            live, offset = [], 0
            for rows, kept in zip(chunk.part_rows, keep, strict=True):
                if kept:
                    live.append((offset, offset + rows))
                offset += rows
    first = 0
    for group in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(group)
        end = first + table.num_rows
        if live is None:
            yield table
        else:
            pieces = [table.slice(max(a, first) - first, min(b, end) - max(a, first))
                      for a, b in live if a < end and b > first]
            if pieces:
                yield pa.concat_tables(pieces)
        first = end


class _PartsOutput:
    """A binary chunk's bytes into the ``.partial`` files of its live parts (``files``,
    None for a superseded part), each at its place in its file. A part counts as covered
    only once the whole chunk verified; a failed attempt leaves ranges that the next
    replica writes over."""

    def __init__(self, chunk: StoredChunk, files: list[Path | None],
                 covered: dict[str, int]) -> None:
        self.chunk, self.files, self.covered = chunk, files, covered
        self.bounds, offset = [], 0
        for part in chunk.parts:
            self.bounds.append((offset, offset + part.size))
            offset += part.size

    def write(self, offset: int, block: bytes) -> None:
        end, view = offset + len(block), memoryview(block)
        for part, path, (first, last) in zip(self.chunk.parts, self.files, self.bounds,
                                             strict=True):
            if path is None or last <= offset or first >= end:
                continue
            lo, hi = max(first, offset), min(last, end)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "r+b" if path.exists() else "wb") as fh:
                fh.seek(part.start + lo - first)
                fh.write(view[lo - offset:hi - offset])

    def discard(self) -> None:
        pass

    def commit(self) -> None:
        for part, path in zip(self.chunk.parts, self.files, strict=True):
            if path is not None:
                if not path.exists():  # an empty file: no byte of it was written
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                self.covered[part.source] += part.size


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
    paths = {url: _relative_path(reader.real_file(src.file)) for url, src in live.items()}
    seen: dict[PurePosixPath, str] = {}
    for url, rel in paths.items():
        if rel in seen:
            raise IntegrityError(f"{seen[rel]} and {url} would both export to {rel}",
                                 dataset=reader.dataset, batch_id="", chunk=-1)
        seen[rel] = url
    target.mkdir(parents=True, exist_ok=True)
    partials = {url: target / rel.parent / f".{rel.name}.partial" for url, rel in paths.items()}
    covered: dict[str, int] = {url: 0 for url in live}
    try:
        for manifest, chunk in reader.iter_chunks():
            files = [partials[p.source] if p.source in live
                     and manifest.batch_id in live[p.source].batches else None
                     for p in chunk.parts]
            reader.read_chunk(manifest, chunk, partial(_PartsOutput, chunk, files, covered))
        for url, src in live.items():
            if covered[url] != src.file.size:
                raise IntegrityError(
                    f"the committed chunks hold {covered[url]} of the {src.file.size} bytes of "
                    f"{url}", dataset=reader.dataset, batch_id=",".join(sorted(src.batches)),
                    chunk=-1)
            with open(partials[url], "r+b") as fh:
                fh.truncate(src.file.size)
                os.fsync(fh.fileno())
        for url, rel in paths.items():
            os.replace(partials[url], target / rel)
    finally:
        for tmp in partials.values():
            tmp.unlink(missing_ok=True)


def export_dataset(dataset: str, to: str | Path, *, batch_id: str | None = None,
                   topology: Topology | None = None, snapshot: str | None = None,
                   keys: str | None = None) -> ExportReport:
    """Write the dataset (as ``snapshot`` holds it; None: the newest) to ``to``: Parquet, or
    CSV/JSONL by extension (a folder for binary). An encrypted dataset is opened with the
    master keys at ``keys`` (else ``SKYFERRY_KEYS``, else the topology's)."""
    target = Path(to)
    # a table chunk is read into a file beside the target before it is decoded
    with DatasetReader(dataset, topology=topology, batch_id=batch_id, spool=target.parent,
                       snapshot=snapshot, keys=keys) as reader:
        return _export(reader, dataset, target)


def _export(reader: DatasetReader, dataset: str, target: Path) -> ExportReport:
    manifests = reader.manifests()
    if next((c.format for m in manifests for c in m.chunks), None) == "binary":
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

