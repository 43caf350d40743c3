"""The chunk tasks: one chunk through every stage in one task run.

- ``move_chunk`` for thread runners: it shares the run's in-memory batch, and its retries
  resume at the stage that failed (the chunk's progress is an argument, kept across them);
- ``move_chunks_on_worker`` for process-based runners (Dask): several chunks in turn, each
  journaled as it is stored. It takes only serializable arguments and rebuilds the batch
  once per worker process; a retry, or a rerun on another worker after one died, skips the
  chunks already journaled and starts the others over.
"""

from __future__ import annotations

from skyferry.models import ChunkPlan
from skyferry.run import chunk as sequence
from skyferry.run.batch import journal_chunk
from skyferry.run.chunk import ChunkProgress, Moved
from skyferry.run.context import BatchRun, worker_run
from tasks._common import attempt, io_task

__all__ = ["move_chunk", "move_chunks_on_worker"]


@io_task("move-chunk")
def move_chunk(chunk: ChunkPlan, run: BatchRun, progress: ChunkProgress) -> Moved:
    """Move ``chunk``; its outcome is also left in ``progress.moved``.

    The loop that hands out chunks reads it there: reading a result through its future
    hops to Prefect's event-loop thread, which is busy sending the runs' events.
    """
    return sequence.move_chunk(chunk, run, attempt(), progress)


@io_task("move-chunks-on-worker")
def move_chunks_on_worker(chunks: list[ChunkPlan], config_json: str, batch_id: str,
                          known_down: dict[str, str]) -> list[Moved]:
    run = worker_run(config_json, batch_id, known_down)
    moved: list[Moved] = []
    for chunk in chunks:
        done = run.catalog.journaled(run.plan.dataset, batch_id, chunk.index)
        if done is not None:  # an earlier attempt of this task stored it
            moved.append((done, {}, "distribution"))
            continue
        outcome = sequence.move_chunk(chunk, run, attempt())
        journal_chunk(run, outcome[0])
        moved.append(outcome)
    return moved
