"""Store stage task: commit the batch's manifest atomically."""

from __future__ import annotations

import time

from skyferry.manifest import Manifest
from skyferry.models import StoredChunk
from skyferry.pipeline import RunContext, commit_fn
from tasks._common import io_task

__all__ = ["COMMIT_TASK", "commit_manifest"]

COMMIT_TASK = "commit-manifest"  # a committed run's last task


@io_task(COMMIT_TASK)
def commit_manifest(ctx: RunContext, chunks: list[StoredChunk]) -> tuple[Manifest, str]:
    started = time.perf_counter()
    manifest, key = commit_fn(ctx, chunks)
    ctx.recorder.record("storage", nbytes=len(manifest.to_json()),
                        seconds=time.perf_counter() - started)
    return manifest, key
