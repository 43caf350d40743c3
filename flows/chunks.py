"""Move a share's chunks as tasks, in a bounded window, and journal each one stored.

On threads, each chunk is one ``move-chunk`` task over the one sequence of
:mod:`skyferry.run.chunk`, which streams it in blocks. On a Dask cluster, one
``move-chunks-on-worker`` task moves ``chunks_per_task`` chunks in turn and journals each.
Work enters only when a slot of the run's window is free, so memory is bounded by the window
times a few blocks, whatever the dataset's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from queue import SimpleQueue
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture

from flows.common import event, ref
from flows.live import LiveStatus
from flows.runners import uses_processes
from skyferry.errors import StageError, failing_as
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.run.batch import journal_chunk
from skyferry.run.chunk import ChunkProgress, Moved
from skyferry.run.context import BatchRun
from skyferry.stages import Stage
from tasks._common import with_retries
from tasks.move import move_chunk, move_chunks_on_worker

__all__ = ["move_chunks"]


class _Failure:
    """The first chunk that failed in a share: raised when the chunks in flight have ended."""

    def __init__(self, run: BatchRun) -> None:
        self.run = run
        self.first: StageError | None = None

    def failing_as(self, stage: Stage, index: int) -> AbstractContextManager[None]:
        """A failure inside that is not already a stage's (a crashed task run) is ``stage``'s."""
        return failing_as(stage, dataset=self.run.config.dataset,
                          batch_id=self.run.plan.batch_id, chunk=index)

    def add(self, exc: StageError, index: int) -> None:
        get_run_logger().error("chunk %s failed in %s: %s", index, exc.stage, exc,
                               extra=event(self.run.config, exc.stage, self.run.plan.batch_id,
                                           index))
        self.run.setup.recorder.record(exc.stage, nbytes=0, seconds=0.0, ok=False)
        if self.first is None:
            self.first = exc

    def __bool__(self) -> bool:
        return self.first is not None

    def raise_first(self) -> None:
        if self.first is not None:
            raise self.first


def _stored(run: BatchRun, chunk: StoredChunk, stored: list[StoredChunk], total: int,
            live: LiveStatus | None, stage: Stage, journaled: bool) -> None:
    if not journaled:
        journal_chunk(run, chunk)
    stored.append(chunk)
    get_run_logger().info("chunk %s stored on %s (%d/%d of this share)", chunk.index,
                          ",".join(r.node for r in chunk.verified), len(stored), total,
                          extra=event(run.config, "storage", run.plan.batch_id, chunk.index))
    if live is not None:
        live.update(stage)


def move_chunks(chunks: list[ChunkPlan], run: BatchRun, live: LiveStatus | None = None,
                refill: Callable[[], list[ChunkPlan]] | None = None,
                on_stored: Callable[[StoredChunk], None] | None = None) -> list[StoredChunk]:
    """One ``move-chunk`` task per chunk.

    On a thread runner the task shares ``run``, and a retry resumes at the stage that failed;
    on a process-based runner it gets only serializable arguments and rebuilds the batch on
    its worker. When the chunks given run out and the window has room, ``refill`` is asked
    for more (a child's next claimed unit; none: the window drains and this returns).
    ``on_stored`` hears of each chunk once it is journaled.
    """
    remote = uses_processes(run.setup.settings)
    config_json, batch = run.config.model_dump_json(), run.plan.batch_id
    down = run.setup.down_reasons()
    queue = deque(chunks)
    per_task = run.setup.settings.chunks_per_task if remote else 1
    active: dict[PrefectFuture[Any], tuple[list[int], ChunkProgress]] = {}
    finished: SimpleQueue[PrefectFuture[Any]] = SimpleQueue()
    stored: list[StoredChunk] = []
    failure = _Failure(run)

    def admit() -> None:
        group = [queue.popleft() for _ in range(min(per_task, len(queue)))]
        progress = ChunkProgress()
        if remote:
            future = with_retries(move_chunks_on_worker).submit(group, config_json, batch,
                                                                 down)
        else:
            future = with_retries(move_chunk).submit(ref(group[0]), ref(run), ref(progress))
        active[future] = ([c.index for c in group], progress)
        future.add_done_callback(finished.put)

    # In-process, each task takes a slot of the run's window while it holds a chunk's bytes,
    # so tasks can be queued ahead: a slot never waits on this loop. A Dask worker is another
    # process: there the loop itself keeps the window.
    ahead = run.setup.settings.max_in_flight * (1 if remote else 2)

    given = len(chunks)

    def top_up() -> None:
        nonlocal given
        while len(active) < ahead and not failure:
            if not queue and refill is not None:
                more = refill()
                queue.extend(more)
                given += len(more)
            if not queue:
                return
            admit()

    top_up()
    while active:
        future = finished.get()
        indices, progress = active.pop(future)
        try:
            with failure.failing_as("distribution", indices[0]):
                outcomes = _outcomes(future, progress)
        except StageError as exc:
            failure.add(exc, exc.chunk if exc.chunk is not None else indices[0])
            queue.clear()
            continue
        for chunk, timings, last in outcomes:
            for stage, (nbytes, seconds) in timings.items():
                # a retry resumes at the stage that failed: its retries are counted there
                run.setup.recorder.record(stage, nbytes=int(nbytes), seconds=seconds,
                                          attempts=chunk.attempts if stage == last else 1)
            try:
                with failure.failing_as("storage", chunk.index):
                    _stored(run, chunk, stored, given, live, "distribution", remote)
            except StageError as exc:
                failure.add(exc, chunk.index)
                queue.clear()
                break
            if on_stored is not None:
                on_stored(chunk)
        top_up()
    failure.raise_first()
    return stored


def _outcomes(future: PrefectFuture[Any], progress: ChunkProgress) -> list[Moved]:
    """A finished task's chunks: a ``move-chunk``'s from ``progress`` when it left it there.

    Otherwise (a Dask worker's list, or a failed task) from the future, which raises the
    task's error.
    """
    future.wait()
    if progress.moved is not None and future.state.is_completed():
        return [progress.moved]
    result: Moved | list[Moved] = future.result()
    return result if isinstance(result, list) else [result]
