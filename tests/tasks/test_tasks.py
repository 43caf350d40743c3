"""The tasks are thin: through ``.fn()``, each returns what its domain function returns."""

from __future__ import annotations

from pathlib import Path

from skyferry.commit.manifest import Catalog
from skyferry.commit.snapshots import SnapshotLog
from skyferry.config import PipelineConfig
from skyferry.run.chunk import ChunkProgress
from skyferry.run.context import open_run
from tasks.commit import commit_manifest
from tasks.distribute import probe_nodes
from tasks.ingest import list_new_files, plan_batch
from tasks.move import move_chunk
from tests.helpers.sf_data import replica_digest, write_ml_csv


def test_the_tasks_walk_a_batch_and_commit_it(home: Path, tmp_path: Path) -> None:
    write_ml_csv(tmp_path / "s" / "a.csv", 1_200, seed=8)
    setup = open_run(PipelineConfig(source=str(tmp_path / "s"), dataset="fn",
                                    chunk_size="16KB"))
    latencies = probe_nodes.fn(setup)
    assert set(latencies) == {n.name for n in setup.topology.nodes}
    assert all(v is not None for v in latencies.values())
    listing = list_new_files.fn(setup)
    assert [f.path for f in listing.files] == ["a.csv"] and listing.skipped == []
    run = plan_batch.fn(setup, listing.files)
    try:
        assert len(run.plan.chunks) > 1
        moved = [move_chunk.fn(c, run, ChunkProgress()) for c in run.plan.chunks]
        stored = [m[0] for m in moved]
        for chunk, (_, timings, started_at) in zip(run.plan.chunks, moved, strict=True):
            assert started_at == "ingestion" and timings["ingestion"][0] == chunk.size
        manifest, key, snapshot = commit_manifest.fn(run, stored)
    finally:
        run.close()
    committed = Catalog(setup.topology.catalog_store()).manifest("fn")
    assert committed.batch_id == manifest.batch_id
    assert key == run.catalog.manifest_key("fn", manifest.partition_date, manifest.batch_id)
    assert committed.rows_stored == 1_200
    head = SnapshotLog(run.catalog, "fn").resolve(None)
    assert head is not None and (snapshot, head.rows) == (head.id, 1_200)
    for chunk in committed.chunks:
        for replica in chunk.verified:
            assert replica_digest(home, replica.node, chunk.key) == chunk.digest
