"""The chunk task: one chunk through ingest → process → distribute.

By default (``task_granularity="chunk"``) each chunk is one ``move-chunk`` task: its stages are
timed steps inside it, and a retry resumes at the stage that failed. Two flavours:

- ``move_chunk_here`` for thread runners: it shares the run's in-memory context;
- ``move_chunk`` for process-based runners (Dask): it takes only serializable arguments,
  rebuilds the context once per worker process, and keeps the chunk's bytes in that process.
"""

from __future__ import annotations

from prefect.runtime import task_run

from blocks.credentials import resolve_credentials_with_blocks
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.pipeline import RunContext, move_chunk_fn, worker_context
from tasks._common import io_task

__all__ = ["move_chunk", "move_chunk_here"]

Moved = tuple[StoredChunk, dict[str, list[float]], str]


def _attempt() -> int:
    return int(task_run.run_count or 1)


@io_task("move-chunk")
def move_chunk_here(chunk: ChunkPlan, ctx: RunContext,
                    outbox: dict[int, Moved] | None = None) -> Moved:
    """Move ``chunk``; also leave the outcome in ``outbox`` (keyed by index), if given.

    The loop that hands out chunks reads it there: reading a result through its future
    hops to Prefect's event-loop thread, which is busy sending the runs' events.
    """
    attempt = _attempt()
    stored, timings, started_at = move_chunk_fn(chunk, ctx, attempt)
    moved = stored.model_copy(update={"attempts": attempt}), timings, started_at
    if outbox is not None:
        outbox[chunk.index] = moved
    return moved


@io_task("move-chunk")
def move_chunk(chunk: ChunkPlan, config_json: str, batch_id: str,
               known_down: dict[str, str]) -> Moved:
    resolve_credentials_with_blocks()  # a Dask worker's own process
    ctx = worker_context(config_json, batch_id, known_down)
    attempt = _attempt()
    # a retry may land on another worker process: start it over, hold nothing back here
    stored, timings, started_at = move_chunk_fn(chunk, ctx, attempt, resume=False)
    return stored.model_copy(update={"attempts": attempt}), timings, started_at
