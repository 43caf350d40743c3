"""The ``cloud-share`` child flow: one cloud's share of a planned batch.

The parent (``multicloud-pipeline``) plans a batch and journals the plan; each child takes the
chunk indices it was handed, drives them through ingest → process → distribute, and journals
every stored chunk. When deployed, a child runs on its cloud's work pool (``run_deployment``);
otherwise it runs in-process as a subflow. Either way the journal is the only thing it shares
with the parent, so it can run on another machine.

Task arguments are wrapped in ``quote()``: they are in-process references, and Prefect would
otherwise walk every field of every record on each submission.

Chunks move through the stages in a bounded window (``max_in_flight``): as soon as a chunk
leaves one stage its next task is submitted, and a new chunk enters only when one is stored.
Memory is bounded by the window times the chunk size, whatever the dataset's size.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from queue import SimpleQueue
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from blocks.credentials import resolve_credentials_with_blocks
from flows.live import LiveStatus
from flows.runners import make_task_runner, uses_processes
from skyferry.config import PipelineConfig, get_settings
from skyferry.errors import SkyferryError, StageError, stage_of
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.pipeline import (
    RunContext,
    build_context,
    journal_chunk_fn,
    load_pending_plan,
    probe_nodes_fn,
    process_chunk_fn,
)
from skyferry.shares import CHILD_FLOW, ShareReport
from tasks._common import with_retries
from tasks.distribute import distribute_chunk, probe_nodes
from tasks.ingest import ingest_chunk
from tasks.move import Moved, move_chunk, move_chunk_here
from tasks.process import process_chunk

__all__ = ["InFlight", "cloud_share", "event", "ref", "run_chunk_stages", "stage_error"]

_NEXT: dict[str, tuple[str, Any]] = {
    "ingestion": ("processing", process_chunk),
    "processing": ("distribution", distribute_chunk),
}


def ref(value: Any) -> Any:
    """Hand an in-process reference to a task without Prefect walking its fields."""
    return quote(value)


def event(ctx: RunContext, stage: str, chunk: int | None = None) -> dict[str, Any]:
    """Structured fields for a log event: the batch, the stage and the chunk."""
    batch = ctx.plan.batch_id if ctx.plan else ctx.config.batch_id
    return {"dataset": ctx.config.dataset, "batch": batch, "stage": stage, "chunk": chunk}


def stage_error(stage: str, ctx: RunContext, exc: BaseException,
                batch_id: str | None = None) -> StageError:
    batch = batch_id or (ctx.plan.batch_id if ctx.plan else None) or ctx.config.batch_id
    error = StageError(str(exc), stage=stage, batch_id=batch or "unplanned",
                       dataset=ctx.config.dataset)
    error.__cause__ = exc
    return error


class InFlight:
    """Slots for chunks in flight: what bounds memory.

    One run (or one child run on its own pool) has one window of ``max_in_flight`` chunks.
    """

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)

    def try_take(self) -> bool:
        return self._slots.acquire(blocking=False)

    def take(self) -> None:
        self._slots.acquire()

    def give(self) -> None:
        self._slots.release()


def run_chunk_stages(chunks: list[ChunkPlan], ctx: RunContext,
                     live: LiveStatus | None = None) -> list[StoredChunk]:
    """Drive every chunk through ingest → process → distribute in a bounded window.

    By default each chunk is one task (:func:`run_fused_chunks`); with
    ``task_granularity="stage"`` each stage of each chunk is its own task.
    """
    if uses_processes(ctx.settings) or ctx.settings.task_granularity == "chunk":
        return run_fused_chunks(chunks, ctx, live)
    logger = get_run_logger()
    assert ctx.plan is not None
    slots = InFlight(ctx.settings.max_in_flight)
    queue = deque(chunks)
    active: dict[PrefectFuture[Any], tuple[str, int]] = {}
    stored: list[StoredChunk] = []
    failure: tuple[str, BaseException] | None = None

    def current_stage() -> str:
        counts = Counter(stage for stage, _ in active.values())
        return counts.most_common(1)[0][0] if counts else "storage"

    def admit() -> None:
        chunk = queue.popleft()
        future = with_retries(ingest_chunk).submit(ref(chunk), ref(ctx))
        active[future] = ("ingestion", chunk.index)

    def fill() -> None:
        while queue and failure is None and slots.try_take():
            admit()

    fill()
    while active or (queue and failure is None):
        if not active:  # every slot is with another share: wait for one to come back
            slots.take()
            admit()
            fill()
            continue
        future = next(as_completed(list(active)))
        stage, index = active.pop(future)
        try:
            value = future.result()
        except Exception as exc:
            slots.give()
            logger.error("chunk %s failed in %s: %s", index, stage, exc,
                         extra=event(ctx, stage, index))
            ctx.recorder.record(stage, nbytes=0, seconds=0.0, ok=False)
            if failure is None:
                failure = (stage, exc)
            queue.clear()
            continue
        if stage == "ingestion" and value.plan.format == "binary":
            # Binary passes through unchanged: no processing task to pay for.
            value = process_chunk_fn(value, ctx)
            ctx.recorder.record("processing", nbytes=value.size, seconds=0.0)
            stage = "processing"
        if stage in _NEXT:
            next_stage, next_task = _NEXT[stage]
            active[with_retries(next_task).submit(ref(value), ref(ctx))] = (next_stage, index)
            continue
        slots.give()
        try:
            journal_chunk_fn(ctx, value)
        except Exception as exc:
            failure = failure or ("storage", exc)
            queue.clear()
            continue
        stored.append(value)
        logger.info("chunk %s stored on %s (%d/%d of this share)", index,
                    ",".join(r.node for r in value.verified), len(stored), len(chunks),
                    extra=event(ctx, "storage", index))
        if live is not None:
            live.update(current_stage())
        fill()
    if failure is not None:
        raise stage_error(failure[0], ctx, failure[1]) from failure[1]
    return stored


def run_fused_chunks(chunks: list[ChunkPlan], ctx: RunContext,
                     live: LiveStatus | None = None) -> list[StoredChunk]:
    """The same window, one ``move-chunk`` task per chunk.

    On a thread runner the task shares ``ctx``; on a process-based runner it gets only
    serializable arguments and rebuilds the context on its worker.
    """
    logger = get_run_logger()
    assert ctx.plan is not None
    remote = uses_processes(ctx.settings)
    config_json, batch = ctx.config.model_dump_json(), ctx.plan.batch_id
    down = {n: ctx.health.reasons.get(n, "") for n in ctx.health.down_nodes()}
    queue = deque(chunks)
    active: dict[PrefectFuture[Any], int] = {}
    finished: SimpleQueue[PrefectFuture[Any]] = SimpleQueue()
    outbox: dict[int, Moved] = {}
    stored: list[StoredChunk] = []
    failure: BaseException | None = None

    def admit() -> None:
        chunk = queue.popleft()
        if remote:
            future = with_retries(move_chunk).submit(chunk, config_json, batch, down)
        else:
            future = with_retries(move_chunk_here).submit(ref(chunk), ref(ctx), ref(outbox))
        active[future] = chunk.index
        future.add_done_callback(finished.put)

    # In-process, each task takes a slot of the run's window (ctx.in_flight) while it holds
    # a chunk's bytes, so tasks can be queued ahead: a slot never waits on this loop. A Dask
    # worker is another process: there the loop itself keeps the window.
    ahead = ctx.settings.max_in_flight * (1 if remote else 2)
    while queue and len(active) < ahead:
        admit()
    while active:
        future = finished.get()
        index = active.pop(future)
        try:
            chunk, timings, last = _outcome(future, index, outbox)
            for stage, (nbytes, seconds) in timings.items():
                # a retry resumes at the stage that failed: its retries are counted there
                ctx.recorder.record(stage, nbytes=int(nbytes), seconds=seconds,
                                    attempts=chunk.attempts if stage == last else 1)
            journal_chunk_fn(ctx, chunk)
        except Exception as exc:
            stage = stage_of(exc, "distribution")
            logger.error("chunk %s failed in %s: %s", index, stage, exc,
                         extra=event(ctx, stage, index))
            ctx.recorder.record(stage, nbytes=0, seconds=0.0, ok=False)
            failure = failure or exc
            queue.clear()
            continue
        stored.append(chunk)
        logger.info("chunk %s stored on %s (%d/%d of this share)", index,
                    ",".join(r.node for r in chunk.verified), len(stored), len(chunks),
                    extra=event(ctx, "storage", index))
        if live is not None:
            live.update("distribution")
        if queue and failure is None:
            admit()
    if failure is not None:
        raise stage_error(stage_of(failure, "distribution"), ctx, failure) from failure
    return stored


def _outcome(future: PrefectFuture[Any], index: int, outbox: dict[int, Moved]) -> Moved:
    """A finished ``move-chunk`` task's result: from ``outbox`` when it left it there.

    Otherwise (a Dask worker, or a failed task) from the future, which raises the task's error.
    """
    future.wait()
    moved = outbox.pop(index, None)
    if moved is not None and future.state.is_completed():
        return moved
    result: Moved = future.result()
    return result


@flow(name=CHILD_FLOW, log_prints=False, validate_parameters=True,
      task_runner=make_task_runner(get_settings()))
def cloud_share(config: PipelineConfig, batch_id: str, cloud: str, chunks: list[int],
                pool: str | None = None, progress_artifact: str | None = None,
                started_at: float | None = None, done_at_start: int = 0,
                known_down: dict[str, str] | None = None) -> ShareReport:
    """Ingest, process and distribute the chunks ``chunks`` of a planned batch.

    ``known_down`` are nodes an earlier in-process share found down, with why; they are
    avoided without being probed again. A child on another pool probes every node itself.
    """
    resolve_credentials_with_blocks()
    try:
        ctx = build_context(config)
    except SkyferryError as exc:
        raise StageError(str(exc), stage="setup", batch_id=batch_id,
                         dataset=config.dataset) from exc
    try:
        return _run_share(ctx, config, batch_id, cloud, chunks, pool, progress_artifact,
                          started_at, done_at_start, known_down)
    finally:
        ctx.close()


def _run_share(ctx: RunContext, config: PipelineConfig, batch_id: str, cloud: str,
               chunks: list[int], pool: str | None, progress_artifact: str | None,
               started_at: float | None, done_at_start: int,
               known_down: dict[str, str] | None) -> ShareReport:
    logger = get_run_logger()
    try:
        plan = load_pending_plan(ctx, batch_id)
        for node, reason in (known_down or {}).items():
            ctx.health.mark(node, "down", reason)
        if uses_processes(ctx.settings):
            probe_nodes_fn(ctx)  # the flow's own process; the cluster gets the chunk tasks
        else:
            probe_nodes(ref(ctx))
        done = ctx.catalog.done_indices(plan.dataset, batch_id)
        by_index = {c.index: c for c in plan.chunks}
        todo = [by_index[i] for i in chunks if i not in done]
    except StageError:
        raise
    except Exception as exc:
        raise stage_error("ingestion", ctx, exc, batch_id) from exc
    where = pool or "in-process"
    logger.info("%s share of batch %s: %d chunks, %d to do, on %s", cloud, batch_id,
                len(chunks), len(todo), where, extra=event(ctx, "ingestion"))
    with LiveStatus(UUID(progress_artifact) if progress_artifact else None, ctx.catalog,
                    plan, started_at=started_at or time.time(), done_at_start=done_at_start,
                    health=ctx.health) as live:
        stored = run_chunk_stages(todo, ctx, live)
        live.update("distribution", force=True)
    run_id = str(flow_run.id) if flow_run.id else None
    report = ShareReport(
        cloud=cloud, ran_on=where, flow_run_id=run_id, chunks=list(chunks),
        stored=[c.index for c in stored], stages=ctx.recorder.snapshot(),
        down_reasons={n: ctx.health.reasons.get(n, "") for n in ctx.health.down_nodes()},
    )
    ctx.catalog.save_share_report(plan.dataset, batch_id, f"{cloud}-{run_id or 'local'}",
                                  report.model_dump_json().encode())
    return report
