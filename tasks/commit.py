"""Commit task: write the batch's manifest atomically, and its snapshot."""

from __future__ import annotations

from skyferry.commit.manifest import Manifest
from skyferry.models import StoredChunk
from skyferry.ops.tables import TableReport, publish_tables
from skyferry.run import batch
from skyferry.run.context import BatchRun
from tasks._common import io_task

__all__ = ["COMMIT_TASK", "commit_manifest", "publish_snapshot_tables"]

COMMIT_TASK = "commit-manifest"  # a committed run's last task


@io_task(COMMIT_TASK)
def commit_manifest(run: BatchRun, chunks: list[StoredChunk]
                    ) -> tuple[Manifest, str, str | None]:
    return batch.commit_batch(run, chunks)


@io_task("publish-tables")
def publish_snapshot_tables(run: BatchRun, snapshot: str) -> TableReport:
    """The committed snapshot as the tables the run asks for (its commit stands whatever
    this gives)."""
    return publish_tables(run.setup.topology, run.config.dataset, snapshot=snapshot,
                          formats=run.config.tables)
