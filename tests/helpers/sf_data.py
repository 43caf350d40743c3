"""Test data helpers shared by the integration suites."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyarrow as pa

from skyferry.commit.manifest import BatchPlan, Lineage, Manifest
from skyferry.models import ChunkPart, ChunkPlan, SourceFile
from skyferry.process.clean import ChunkEncoder, ProcessOutput
from skyferry.process.encode import SchemaDrift
from skyferry.process.schema import Schema
from skyferry.process.transform import Transform


def write_ml_csv(path: Path, rows: int, *, seed: int, start_id: int = 0,
                 bad_rows: bool = False) -> int:
    """A CSV of float features, a category and a label; returns the valid rows written."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "f0", "f1", "category", "label"])
        for i in range(rows):
            writer.writerow([start_id + i, round(float(rng.normal()), 6),
                             round(float(rng.normal()), 6),
                             ["cat", "dog", "bird"][i % 3], int(rng.integers(0, 2))])
        if bad_rows:
            fh.write("999999,1.0\n")                   # too few columns
            fh.write("999998,abc,1.0,dog,1\n")         # not a float
    return rows


SCHEMA_YAML = """
columns:
  id: {type: int64, nullable: false}
  f0: {type: float64, nullable: false}
  f1: {type: float64, nullable: false}
  category: {type: string, allowed: [cat, dog, bird]}
  label: {type: int64, allowed: [0, 1]}
"""


def replica_digest(home: Path, node: str, key: str) -> str | None:
    """BLAKE3 of a replica read straight from the node's folder (not through skyferry)."""
    path = home / "nodes" / node / key
    if not path.is_file():
        return None
    return str(blake3.blake3(path.read_bytes()).hexdigest())


def small_plan(dataset: str, chunks: int, fmt: str = "binary", *,
               date: str = "2026-11-22") -> BatchPlan:
    """A journaled-plan-shaped batch of ``chunks`` 10-byte chunks of one source file, on two
    nodes (``n1``, ``n2``), batch ``b1``."""
    src = SourceFile(url=f"file:///s/{dataset}.{fmt}", size=10 * chunks, fingerprint="mtime:1")
    planned = [ChunkPlan(index=i, format=fmt, nodes=("n1", "n2"),  # type: ignore[arg-type]
                         parts=(ChunkPart(source=src.url, start=10 * i, end=10 * i + 10),))
               for i in range(chunks)]
    return BatchPlan(dataset=dataset, batch_id="b1", partition_date=date,
                     created_at=f"{date}T00:00:00+00:00", replicas=2, quorum=2,
                     source_cloud="aws",
                     lineage=Lineage(sources=[src], code_version="0.1.0", schema=None,
                                     transforms=[], format=fmt, chunk_size=10),  # type: ignore[arg-type]
                     chunks=planned)


def commit_without_prefect(source: Path, dataset: str, parallel: int = 1,
                           **options: object) -> Manifest:
    """Commit ``source`` as ``dataset`` through the domain's own sequence, with no flow: the
    nodes probed, the batch planned, every chunk moved (``parallel`` at once, in a plain
    thread pool) and journaled, the manifest written."""
    from concurrent.futures import ThreadPoolExecutor

    from skyferry.config import PipelineConfig
    from skyferry.distribute.probe import probe_nodes
    from skyferry.run.batch import commit_batch, journal_chunk, new_source_files, plan_batch
    from skyferry.run.chunk import move_chunk
    from skyferry.run.context import open_run

    setup = open_run(PipelineConfig(source=str(source), dataset=dataset, **options))
    probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
    run = plan_batch(setup, new_source_files(setup).files)
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            stored = [m[0] for m in pool.map(lambda c: move_chunk(c, run), run.plan.chunks)]
        for chunk in stored:
            journal_chunk(run, chunk)
        return commit_batch(run, stored)[0]
    finally:
        run.close()


# Batches whose columns are added, dropped and change type (nested too)
DRIFTED_BATCHES: list[list[dict[str, Any]]] = [
    [{"id": i, "a": i, "tags": [i], "gone": f"g{i}"} for i in range(0, 40)],
    [{"id": i, "a": f"x{i}", "tags": [f"s{i}"], "new": i / 4} for i in range(40, 80)],
    [{"id": i, "a": i + 0.5, "tags": None, "new": i} for i in range(80, 120)],
]


def commit_drifted(source: Path, dataset: str) -> dict[int, dict[str, Any]]:
    """Commit :data:`DRIFTED_BATCHES` as three batches of ``dataset`` from JSON Lines files
    under ``source``; each row by id as the resolved schema reads it (``a`` and ``tags``
    text in their JSON spelling, ``new`` a double)."""
    import json

    source.mkdir(parents=True, exist_ok=True)
    expected = {}
    for n, batch in enumerate(DRIFTED_BATCHES):
        (source / f"b{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch))
        commit_without_prefect(source, dataset)
        for row in batch:
            a = row["a"]
            expected[row["id"]] = {
                "id": row["id"], "a": a if isinstance(a, str) else json.dumps(a),
                "tags": None if row["tags"] is None else json.dumps(row["tags"]),
                "gone": row.get("gone"), "new": None if "new" not in row else float(row["new"])}
    return expected


class _InMemory:
    """A chunk read into memory (tests read small chunks): kept only once verified."""

    def __init__(self, into: list[bytes]) -> None:
        self.into, self.data = into, bytearray()

    def write(self, offset: int, block: bytes) -> None:
        self.data += block

    def discard(self) -> None:
        self.data.clear()

    def commit(self) -> None:
        self.into.append(bytes(self.data))


def verified_chunks(reader: Any) -> list[bytes]:
    """The bytes of every live chunk a ``DatasetReader`` reads, each verified, in order."""
    out: list[bytes] = []
    for manifest, chunk in reader.iter_chunks():
        reader.read_chunk(manifest, chunk, lambda: _InMemory(out))
    return out


def process_parts(blocks: Iterable[tuple[Any, ...]], fmt: str,
                  schema: Schema | None, transforms: Sequence[tuple[str, Transform]],
                  where: str, options: Mapping[str, Any] | None = None
                  ) -> tuple[pa.Buffer, ProcessOutput]:
    """Encode in-memory blocks ``(part, data, header[, offset])`` into one Parquet buffer,
    through the streamed path's encoder."""
    listed = list(blocks)
    parts = list(dict.fromkeys(b[0] for b in listed))
    columns = None
    while True:
        sink = pa.BufferOutputStream()
        encoder = ChunkEncoder(fmt, schema, transforms, where, options, sink, columns)
        try:
            for block in listed:
                encoder.add(*block)
            out = encoder.close(parts)
        except SchemaDrift as drift:
            columns = drift.schema
            continue
        return sink.getvalue(), out
