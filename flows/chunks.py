"""Move a share's chunks as tasks, in a bounded window, and journal each one stored.

By default each chunk is one ``move-chunk`` task (:func:`move_chunks`); with
``task_granularity="stage"`` each stage of each chunk is its own task
(:func:`move_chunks_by_stage`). Both walk the one sequence of :mod:`skyferry.run.chunk`.
A chunk enters only when a slot of the run's window is free, so memory is bounded by the
window times the chunk size, whatever the dataset's size.
"""

from __future__ import annotations

from collections import Counter, deque
from queue import SimpleQueue
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed

from flows.common import event, ref
from flows.live import LiveStatus
from flows.runners import uses_processes
from skyferry.errors import StageError
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.run.batch import journal_chunk
from skyferry.run.chunk import STAGES, ChunkProgress, Moved, next_stage, process, run_stage
from skyferry.run.context import BatchRun
from tasks._common import with_retries
from tasks.distribute import write_replicas
from tasks.ingest import ingest_chunk
from tasks.move import move_chunk, move_chunk_on_worker
from tasks.process import process_chunk

__all__ = ["move_chunks", "move_chunks_by_stage", "move_share"]

_STAGE_TASKS = {"ingestion": ingest_chunk, "processing": process_chunk,
                "distribution": write_replicas}


def move_share(chunks: list[ChunkPlan], run: BatchRun,
               live: LiveStatus | None = None) -> list[StoredChunk]:
    """Move every chunk of a share and journal it; the first failure (a
    :class:`StageError`) is raised once the chunks in flight have ended."""
    settings = run.setup.settings
    if uses_processes(settings) or settings.task_granularity == "chunk":
        return move_chunks(chunks, run, live)
    return move_chunks_by_stage(chunks, run, live)


class _Failure:
    """The first chunk that failed in a share: raised when the chunks in flight have ended.

    A stage's failure is already a :class:`StageError`; anything else (a crashed task run)
    is raised as the stage's failure, from it.
    """

    def __init__(self, run: BatchRun) -> None:
        self.run = run
        self.first: tuple[Exception, str, int] | None = None

    def add(self, exc: Exception, stage: str, index: int) -> None:
        stage = exc.stage if isinstance(exc, StageError) else stage
        get_run_logger().error("chunk %s failed in %s: %s", index, stage, exc,
                               extra=event(self.run.config, stage, self.run.plan.batch_id,
                                           index))
        self.run.setup.recorder.record(stage, nbytes=0, seconds=0.0, ok=False)
        if self.first is None:
            self.first = (exc, stage, index)

    def __bool__(self) -> bool:
        return self.first is not None

    def raise_first(self) -> None:
        if self.first is None:
            return
        exc, stage, index = self.first
        if isinstance(exc, StageError):
            raise exc
        raise StageError(str(exc), stage=stage, batch_id=self.run.plan.batch_id,
                         dataset=self.run.config.dataset, chunk=index) from exc


def _stored(run: BatchRun, chunk: StoredChunk, stored: list[StoredChunk], total: int,
            live: LiveStatus | None, stage: str) -> None:
    journal_chunk(run, chunk)
    stored.append(chunk)
    get_run_logger().info("chunk %s stored on %s (%d/%d of this share)", chunk.index,
                          ",".join(r.node for r in chunk.verified), len(stored), total,
                          extra=event(run.config, "storage", run.plan.batch_id, chunk.index))
    if live is not None:
        live.update(stage)


def move_chunks(chunks: list[ChunkPlan], run: BatchRun,
                live: LiveStatus | None = None) -> list[StoredChunk]:
    """One ``move-chunk`` task per chunk.

    On a thread runner the task shares ``run``, and a retry resumes at the stage that failed;
    on a process-based runner it gets only serializable arguments and rebuilds the batch on
    its worker.
    """
    remote = uses_processes(run.setup.settings)
    config_json, batch = run.config.model_dump_json(), run.plan.batch_id
    down = run.setup.down_reasons()
    queue = deque(chunks)
    active: dict[PrefectFuture[Any], tuple[int, ChunkProgress]] = {}
    finished: SimpleQueue[PrefectFuture[Any]] = SimpleQueue()
    stored: list[StoredChunk] = []
    failure = _Failure(run)

    def admit() -> None:
        chunk = queue.popleft()
        progress = ChunkProgress()
        if remote:
            future = with_retries(move_chunk_on_worker).submit(chunk, config_json, batch, down)
        else:
            future = with_retries(move_chunk).submit(ref(chunk), ref(run), ref(progress))
        active[future] = (chunk.index, progress)
        future.add_done_callback(finished.put)

    # In-process, each task takes a slot of the run's window while it holds a chunk's bytes,
    # so tasks can be queued ahead: a slot never waits on this loop. A Dask worker is another
    # process: there the loop itself keeps the window.
    ahead = run.setup.settings.max_in_flight * (1 if remote else 2)
    while queue and len(active) < ahead:
        admit()
    while active:
        future = finished.get()
        index, progress = active.pop(future)
        try:
            chunk, timings, last = _outcome(future, progress)
        except Exception as exc:
            failure.add(exc, "distribution", index)
            queue.clear()
            continue
        for stage, (nbytes, seconds) in timings.items():
            # a retry resumes at the stage that failed: its retries are counted there
            run.setup.recorder.record(stage, nbytes=int(nbytes), seconds=seconds,
                                      attempts=chunk.attempts if stage == last else 1)
        try:
            _stored(run, chunk, stored, len(chunks), live, "distribution")
        except Exception as exc:
            failure.add(exc, "storage", index)
            queue.clear()
            continue
        if queue and not failure:
            admit()
    failure.raise_first()
    return stored


def _outcome(future: PrefectFuture[Any], progress: ChunkProgress) -> Moved:
    """A finished ``move-chunk`` task's result: from ``progress`` when it left it there.

    Otherwise (a Dask worker, or a failed task) from the future, which raises the task's error.
    """
    future.wait()
    if progress.moved is not None and future.state.is_completed():
        return progress.moved
    result: Moved = future.result()
    return result


def move_chunks_by_stage(chunks: list[ChunkPlan], run: BatchRun,
                         live: LiveStatus | None = None) -> list[StoredChunk]:
    """One task per stage per chunk: as soon as a chunk leaves one stage, its next stage's
    task is submitted. Finer task runs in the UI, for about three times the API load."""
    window = run.setup.window
    queue = deque(chunks)
    active: dict[PrefectFuture[Any], tuple[str, int]] = {}
    stored: list[StoredChunk] = []
    failure = _Failure(run)

    def current_stage() -> str:
        counts = Counter(stage for stage, _ in active.values())
        return counts.most_common(1)[0][0] if counts else "storage"

    def submit(stage: str, value: Any, index: int) -> None:
        future = with_retries(_STAGE_TASKS[stage]).submit(ref(value), ref(run))
        active[future] = (stage, index)

    def fill() -> None:
        while queue and not failure and window.acquire(blocking=False):
            chunk = queue.popleft()
            submit(STAGES[0], chunk, chunk.index)

    fill()
    while active or (queue and not failure):
        if not active:  # every slot is with another share's chunks: wait for one
            window.acquire()
            window.release()
            fill()
            continue
        future = next(as_completed(list(active)))
        stage, index = active.pop(future)
        try:
            value = future.result()
            after = next_stage(stage)
            if after == "processing" and value.record.plan.format == "binary":
                # binary passes through unchanged: no processing task to pay for
                value = run_stage(after, process, value, run)
                after = next_stage(after)
        except Exception as exc:
            window.release()
            failure.add(exc, stage, index)
            queue.clear()
            continue
        if after is not None:
            submit(after, value, index)
            continue
        window.release()
        try:
            _stored(run, value, stored, len(chunks), live, current_stage())
        except Exception as exc:
            failure.add(exc, "storage", index)
            queue.clear()
            continue
        fill()
    failure.raise_first()
    return stored
