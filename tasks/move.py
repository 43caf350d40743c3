"""The fused chunk task of process-based task runners (Dask): ingest → process → distribute.

On a thread pool each stage is its own task and they share the run's in-memory context. On a
Dask cluster a task may run in another process, so one task carries a chunk through the three
stages, keeping its bytes in that process, and takes only serializable arguments.
"""

from __future__ import annotations

from prefect.runtime import task_run

from skyferry.models import ChunkPlan, StoredChunk
from skyferry.pipeline import move_chunk_fn, worker_context
from tasks._common import io_task

__all__ = ["move_chunk"]


@io_task("move-chunk")
def move_chunk(chunk: ChunkPlan, config_json: str, batch_id: str,
               known_down: dict[str, str]) -> tuple[StoredChunk, dict[str, list[float]]]:
    ctx = worker_context(config_json, batch_id, known_down)
    attempt = int(task_run.run_count or 1)
    stored, timings = move_chunk_fn(chunk, ctx, attempt)
    return stored.model_copy(update={"attempts": attempt}), timings
