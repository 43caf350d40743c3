"""The chunk tasks: one chunk through every stage in one task run.

- ``move_chunk`` for thread runners: it shares the run's in-memory batch, and its retries
  resume at the stage that failed (the chunk's progress is an argument, kept across them);
- ``move_chunk_on_worker`` for process-based runners (Dask): it takes only serializable
  arguments, rebuilds the batch once per worker process, and starts a retry over.
"""

from __future__ import annotations

from skyferry.models import ChunkPlan
from skyferry.run import chunk as sequence
from skyferry.run.chunk import ChunkProgress, Moved
from skyferry.run.context import BatchRun, worker_run
from tasks._common import attempt, io_task

__all__ = ["move_chunk", "move_chunk_on_worker"]


@io_task("move-chunk")
def move_chunk(chunk: ChunkPlan, run: BatchRun, progress: ChunkProgress) -> Moved:
    """Move ``chunk``; its outcome is also left in ``progress.moved``.

    The loop that hands out chunks reads it there: reading a result through its future
    hops to Prefect's event-loop thread, which is busy sending the runs' events.
    """
    return sequence.move_chunk(chunk, run, attempt(), progress)


@io_task("move-chunk-on-worker")
def move_chunk_on_worker(chunk: ChunkPlan, config_json: str, batch_id: str,
                         known_down: dict[str, str]) -> Moved:
    run = worker_run(config_json, batch_id, known_down)
    # a retry may land on another worker process: start it over, hold nothing back here
    return sequence.move_chunk(chunk, run, attempt())
