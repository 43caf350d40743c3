"""Tables that other engines read: a snapshot published as an Apache Iceberg table and as a
Delta table, over the replicas already on the nodes (no byte is copied).

For each cloud in which every chunk the snapshot reads has a verified replica:

- **Iceberg**: table ``skyferry.<dataset>__<cloud>`` in a SQLite ``SqlCatalog``
  (``<home>/tables/iceberg.db``, its metadata under ``<home>/tables/iceberg/``). Its data
  files are the replicas, by absolute path, added with pyiceberg's ``add_files`` (and, when
  the snapshot dropped batches, an overwrite that drops their files). Each publish makes a
  table snapshot that holds exactly the skyferry snapshot's chunks, with its id in the
  summary (``skyferry.snapshot``). ``gc.enabled`` is false, so an engine that expires the
  table's snapshots deletes no data file.
- **Delta**: a table at ``<node>/<dataset>/`` on a node of that cloud that holds a replica of
  every chunk (add actions with paths relative to it; none such node, no Delta table for
  that cloud). Each publish is one overwrite commit of every file. Its log lives in
  ``<dataset>/_delta_log/``, which gc and verify leave alone; ``delta.deletedFileRetentionDuration``
  is 100 years, so a ``VACUUM`` that keeps the table's own retention deletes nothing.

skyferry's manifests stay the truth: the tables are views, published again after each
commit when asked (``PipelineConfig.tables``, ``skyferry tables``). A table engine never
learns of a repair (a replica it names that is re-created elsewhere stays where it was only
if the node keeps it); publish again after one.

Limits: local nodes only (a node on S3, GCS or Azure is skipped, and said so); table chunks
only; a chunk that holds rows of a source version a newer one superseded cannot be
published, for a table cannot leave those rows out.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.snapshots import committed
from skyferry.distribute.access import node_store
from skyferry.errors import TableError
from skyferry.evolution import dataset_schema
from skyferry.ingest.versions import live_parts, readable_sources
from skyferry.models import StoredChunk
from skyferry.topology import Topology

__all__ = ["FORMATS", "TableReport", "delta_log_prefix", "iceberg_catalog", "publish_tables"]

logger = logging.getLogger("skyferry.tables")

FORMATS = ("iceberg", "delta")
NAMESPACE = "skyferry"
SNAPSHOT_PROPERTY = "skyferry.snapshot"
_CENTURY = "interval 36500 days"


def delta_log_prefix(dataset: str) -> str:
    """Where a node keeps the Delta log of ``dataset``'s table: gc and verify leave it."""
    return f"{dataset}/_delta_log/"


@dataclass
class TableReport:
    dataset: str
    snapshot: str
    published: list[str] = field(default_factory=list)  # "iceberg skyferry.x__aws", ...
    skipped: list[str] = field(default_factory=list)  # why a cloud or a format got none


@dataclass(frozen=True)
class _Replica:
    chunk: StoredChunk
    node: str
    path: Path  # the replica's file


def _table_name(dataset: str, cloud: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', dataset)}__{cloud}"


def _readable_chunks(manifests: Sequence[Manifest], dataset: str) -> list[StoredChunk]:
    """Every chunk the snapshot reads, whole; raises when one is read in part."""
    live = readable_sources(manifests)
    chunks = []
    for manifest in manifests:
        for chunk in manifest.chunks:
            if chunk.format == "binary":
                raise TableError(f"{dataset} holds binary chunks: no table can read them",
                                 dataset=dataset)
            if chunk.sealed is not None:
                raise TableError(f"{dataset} is encrypted at rest: an Iceberg or Delta reader "
                                 "cannot open its chunks (export it, or read it with skyferry)",
                                 dataset=dataset)
            keep = live_parts(manifest, chunk, live)
            if all(keep):
                chunks.append(chunk)
            elif any(keep):
                raise TableError(
                    f"chunk {chunk.index} of batch {manifest.batch_id} of {dataset} holds rows "
                    "of a source version a newer one superseded: a table cannot leave them "
                    "out", dataset=dataset)
    return chunks


def publish_tables(topology: Topology, dataset: str, *, snapshot: str | None = None,
                   formats: Sequence[str] = FORMATS) -> TableReport:
    """Publish ``snapshot`` of ``dataset`` (None: the newest) as the tables ``formats`` name,
    one per cloud that holds a replica of every chunk; see the module."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise TableError(f"unknown table format {', '.join(unknown)}: use "
                         f"{' or '.join(FORMATS)}", dataset=dataset)
    catalog = open_catalog(topology)
    read = committed(catalog, dataset, snapshot)
    if read.snapshot is None:
        raise TableError(f"{dataset} has no snapshot yet: its next commit makes one",
                         dataset=dataset)
    if read.unreadable:
        raise TableError(f"{len(read.unreadable)} manifests of {dataset} cannot be read: "
                         f"{read.unreadable[0]}", dataset=dataset)
    report = TableReport(dataset=dataset, snapshot=read.snapshot.id)
    chunks = _readable_chunks(read.manifests, dataset)
    schema = dataset_schema(read.manifests, lambda n: node_store(topology.node(n)))
    for cloud in topology.clouds:
        nodes = {n.name for n in topology.nodes if n.cloud == cloud and n.enabled}
        local = {n for n in nodes if node_store(topology.node(n)).is_local}
        if nodes - local:
            report.skipped.append(f"{cloud}: nodes {', '.join(sorted(nodes - local))} are not "
                                  "local folders; tables are published over local nodes only")
        where: dict[int, list[str]] = {}
        missing = []
        for chunk in chunks:
            held = sorted(r.node for r in chunk.verified if r.node in local)
            if not held:
                missing.append(chunk.key)
            where[id(chunk)] = held
        if missing:
            report.skipped.append(f"{cloud}: {len(missing)} chunks have no replica there "
                                  f"(such as {missing[0]})")
            continue

        def replica(chunk: StoredChunk, node: str) -> _Replica:
            return _Replica(chunk, node, Path(node_store(topology.node(node)).path(chunk.key)))

        if "iceberg" in formats:
            files = [replica(c, where[id(c)][0]) for c in chunks]
            try:
                name = _publish_iceberg(topology, dataset, cloud, read.snapshot.id, schema,
                                        files)
                report.published.append(f"iceberg {name}")
            except Exception as exc:  # the engine's own errors: the commit stands
                report.skipped.append(f"{cloud}: iceberg: {type(exc).__name__}: {exc}")
        if "delta" in formats:
            whole = [n for n in sorted(local) if all(n in where[id(c)] for c in chunks)]
            if not whole:
                report.skipped.append(f"{cloud}: delta: no node of {cloud} holds a replica of "
                                      "every chunk (a Delta table names its files relative "
                                      "to one folder)")
                continue
            files = [replica(c, whole[0]) for c in chunks]
            root = Path(node_store(topology.node(whole[0])).path(dataset))
            try:
                _publish_delta(root, dataset, read.snapshot.id, schema, files)
                report.published.append(f"delta {root}")
            except Exception as exc:
                report.skipped.append(f"{cloud}: delta: {type(exc).__name__}: {exc}")
    for line in report.published:
        logger.info("snapshot %s of %s published: %s", report.snapshot, dataset, line)
    for line in report.skipped:
        logger.warning("snapshot %s of %s: no table for %s", report.snapshot, dataset, line)
    return report


def iceberg_catalog(topology: Topology) -> Any:
    """The SQLite Iceberg catalog under the topology's home."""
    try:
        from pyiceberg.catalog.sql import SqlCatalog
    except ImportError as exc:
        raise TableError("Iceberg tables need the [tables] extra: pip install "
                         "'skyferry[tables]'", dataset="") from exc
    base = topology.settings.home / "tables"
    base.mkdir(parents=True, exist_ok=True)
    catalog = SqlCatalog(NAMESPACE, uri=f"sqlite:///{base / 'iceberg.db'}",
                         warehouse=(base / "iceberg").as_uri())
    catalog.create_namespace_if_not_exists(NAMESPACE)
    return catalog


def _publish_iceberg(topology: Topology, dataset: str, cloud: str, snapshot: str,
                     schema: pa.Schema, files: list[_Replica]) -> str:
    from pyiceberg.io.pyarrow import parquet_file_to_data_file

    tables = iceberg_catalog(topology)
    name = f"{NAMESPACE}.{_table_name(dataset, cloud)}"
    if not tables.table_exists(name):
        tables.create_table(name, schema=schema, properties={
            "gc.enabled": "false", "skyferry.dataset": dataset})
    table = tables.load_table(name)
    wanted = {str(f.path) for f in files}
    current = {}
    if table.current_snapshot() is not None:
        current = {t.file.file_path: t.file for t in table.scan().plan_files()}
    with table.transaction() as tx:
        if not table.schema().as_arrow().equals(schema, check_metadata=False):
            with tx.update_schema() as update:
                update.union_by_name(schema)
        gone = [f for path, f in current.items() if path not in wanted]
        new = sorted(wanted - set(current))
        properties = {SNAPSHOT_PROPERTY: snapshot}
        if gone:
            with tx.update_snapshot(snapshot_properties=properties).overwrite() as overwrite:
                for data_file in gone:
                    overwrite.delete_data_file(data_file)
                for path in new:
                    overwrite.append_data_file(
                        parquet_file_to_data_file(table.io, tx.table_metadata, path))
        elif new:
            tx.add_files(new, snapshot_properties=properties)
        tx.set_properties(properties)
    return name


def _publish_delta(root: Path, dataset: str, snapshot: str, schema: pa.Schema,
                   files: list[_Replica]) -> None:
    try:
        from deltalake import CommitProperties, DeltaTable, Schema
        from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
    except ImportError as exc:
        raise TableError("Delta tables need the [tables] extra: pip install "
                         "'skyferry[tables]'", dataset=dataset) from exc
    actions = []
    for f in files:
        stat = os.stat(f.path)
        actions.append(AddAction(
            path=f.path.relative_to(root).as_posix(), size=stat.st_size, partition_values={},
            modification_time=int(stat.st_mtime * 1000), data_change=True,
            stats=json.dumps({"numRecords": f.chunk.rows_out})))
    commit = CommitProperties(custom_metadata={SNAPSHOT_PROPERTY: snapshot})
    if (root / "_delta_log").is_dir():
        DeltaTable(str(root)).create_write_transaction(
            list[AddAction | RemoveAction](actions), mode="overwrite", schema=schema,
            commit_properties=commit)
    else:
        create_table_with_add_actions(
            str(root), Schema.from_arrow(schema), actions, mode="error", name=dataset,
            configuration={"delta.deletedFileRetentionDuration": _CENTURY},
            commit_properties=commit)
