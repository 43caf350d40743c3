"""The ``multicloud-pipeline`` flow: ingest, process, distribute and store, mapped over chunks.

Task arguments are wrapped in ``quote()``: they are in-process references, and Prefect would
otherwise walk every field of every record on each submission.

Chunks move through the stages in a bounded window (``max_in_flight``): as soon as a chunk
leaves one stage its next task is submitted, and a new chunk enters only when one is stored.
Memory is bounded by the window times the chunk size, whatever the dataset's size.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from skyferry.config import PipelineConfig, Settings, get_settings
from skyferry.errors import SkyferryError, StageError
from skyferry.metrics import PipelineResult
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.pipeline import (
    RunContext,
    build_context,
    journal_chunk_fn,
    process_chunk_fn,
    summarize,
)
from skyferry.report import placement_markdown, stage_breakdown
from tasks.distribute import distribute_chunk, probe_nodes
from tasks.ingest import ingest_chunk, list_new_files, plan_batch
from tasks.process import process_chunk
from tasks.store import commit_manifest

__all__ = ["multicloud_pipeline", "run_pipeline"]

_NEXT: dict[str, tuple[str, Any]] = {
    "ingestion": ("processing", process_chunk),
    "processing": ("distribution", distribute_chunk),
}


def _ref(value: Any) -> Any:
    """Hand an in-process reference to a task without Prefect walking its fields."""
    return quote(value)


def _event(ctx: RunContext, stage: str, chunk: int | None = None) -> dict[str, Any]:
    """Structured fields for a log event: the batch, the stage and the chunk."""
    batch = ctx.plan.batch_id if ctx.plan else ctx.config.batch_id
    return {"dataset": ctx.config.dataset, "batch": batch, "stage": stage, "chunk": chunk}


def _fail(stage: str, ctx: RunContext, exc: BaseException) -> StageError:
    batch = ctx.plan.batch_id if ctx.plan else (ctx.config.batch_id or "unplanned")
    error = StageError(str(exc), stage=stage, batch_id=batch, dataset=ctx.config.dataset)
    error.__cause__ = exc
    return error


def run_chunk_stages(chunks: list[ChunkPlan], ctx: RunContext, *, total: int,
                     already_done: int) -> list[StoredChunk]:
    """Drive every chunk through ingest → process → distribute in a bounded window."""
    logger = get_run_logger()
    window = ctx.settings.max_in_flight
    queue = deque(chunks)
    active: dict[PrefectFuture[Any], tuple[str, int]] = {}
    stored: list[StoredChunk] = []
    failure: tuple[str, BaseException] | None = None
    progress_id = create_progress_artifact(
        progress=100.0 * already_done / max(total, 1),
        description=f"chunks stored of {total}",
    )

    last_update = time.monotonic()

    def admit() -> None:
        chunk = queue.popleft()
        active[ingest_chunk.submit(_ref(chunk), _ref(ctx))] = ("ingestion", chunk.index)

    while queue and len(active) < window:
        admit()
    while active:
        future = next(as_completed(list(active)))
        stage, index = active.pop(future)
        try:
            value = future.result()
        except Exception as exc:
            logger.error("chunk %s failed in %s: %s", index, stage, exc,
                         extra=_event(ctx, stage, index))
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
            active[next_task.submit(_ref(value), _ref(ctx))] = (next_stage, index)
            continue
        try:
            journal_chunk_fn(ctx, value)
        except Exception as exc:
            failure = failure or ("storage", exc)
            queue.clear()
            continue
        stored.append(value)
        done = already_done + len(stored)
        logger.info("chunk %s stored on %s (%d/%d)", index,
                    ",".join(r.node for r in value.verified), done, total,
                    extra=_event(ctx, "storage", index))
        now = time.monotonic()
        if isinstance(progress_id, UUID) and (now - last_update >= 1.0 or done == total):
            # each update is an API call (~50 ms on the ephemeral server): at most once a second
            update_progress_artifact(progress_id, progress=100.0 * done / max(total, 1))
            last_update = now
        if queue and failure is None:
            admit()
    if failure is not None:
        raise _fail(failure[0], ctx, failure[1]) from failure[1]
    return stored


@flow(name="multicloud-pipeline", log_prints=False, validate_parameters=True)
def multicloud_pipeline(config: PipelineConfig) -> PipelineResult:
    """Ingest a source, process it, store every chunk on R nodes (W verified), commit."""
    started = time.perf_counter()
    logger = get_run_logger()
    try:
        ctx = build_context(config)
    except SkyferryError as exc:
        raise StageError(str(exc), stage="setup", batch_id=config.batch_id or "unplanned",
                         dataset=config.dataset) from exc
    stage = "ingestion"
    try:
        latencies = probe_nodes(_ref(ctx))
        logger.info("nodes: %s", {n: ("down" if v is None else f"{v * 1000:.1f} ms")
                                  for n, v in latencies.items()})
        if config.batch_id is not None:
            for manifest in ctx.catalog.manifests(config.dataset):
                if manifest.batch_id == config.batch_id:
                    logger.info("batch %s is already committed; nothing to do", config.batch_id)
                    return PipelineResult(status="already_committed", dataset=config.dataset,
                                          batch_id=config.batch_id,
                                          chunks_skipped=len(manifest.chunks),
                                          duration_s=round(time.perf_counter() - started, 3))
        files = list_new_files(_ref(ctx))
        if not files:
            logger.info("no new or changed files under %s", config.source)
            return PipelineResult(status="up_to_date", dataset=config.dataset,
                                  duration_s=round(time.perf_counter() - started, 3))
        plan, resumed = plan_batch(_ref(ctx), _ref(files))
        done = ctx.catalog.done_chunks(plan.dataset, plan.batch_id) if resumed else {}
        todo = [c for c in plan.chunks if c.index not in done]
        logger.info("batch %s: %d chunks, %d to do, %d already stored", plan.batch_id,
                    len(plan.chunks), len(todo), len(done), extra=_event(ctx, "ingestion"))
        new = run_chunk_stages(todo, ctx, total=len(plan.chunks), already_done=len(done))
        stage = "storage"
        manifest, key = commit_manifest(_ref(ctx), _ref(list(done.values()) + new))
    except StageError:
        raise
    except Exception as exc:
        raise _fail(stage, ctx, exc) from exc
    result = summarize(ctx, manifest, key, new, len(done), started)
    result.flow_run_id = str(flow_run.id) if flow_run.id else None
    publish_artifacts(result)
    logger.info("committed %s: %d chunks, %d rows stored, %d rejected", key,
                len(manifest.chunks), result.rows_stored, result.rows_rejected,
                extra=_event(ctx, "storage"))
    return result


def publish_artifacts(result: PipelineResult) -> None:
    """The stage breakdown (bottleneck flagged) and the placement summary, in the Prefect UI."""
    slug = "".join(c if c.isalnum() else "-" for c in result.dataset.lower()).strip("-")
    create_table_artifact(table=stage_breakdown(result), key=f"{slug}-stage-breakdown",
                          description=f"Stages of {result.dataset} batch {result.batch_id}")
    create_markdown_artifact(markdown=placement_markdown(result), key=f"{slug}-placement",
                             description=f"Where the replicas of batch {result.batch_id} went")


def run_pipeline(config: PipelineConfig, settings: Settings | None = None) -> PipelineResult:
    """Run the flow (ephemeral API unless PREFECT_API_URL is set) and return its result.

    A failed run returns ``status="failed"`` with the error and the stage it failed in.
    """
    settings = settings or get_settings()
    runner: Any = ThreadPoolTaskRunner(max_workers=settings.max_workers)
    state = multicloud_pipeline.with_options(task_runner=runner)(config=config,
                                                                 return_state=True)
    try:
        result: PipelineResult = state.result()
        return result
    except StageError as exc:
        logging.getLogger("skyferry.pipeline").error("%s", exc)
        return PipelineResult(status="failed", dataset=config.dataset, batch_id=exc.batch_id,
                              error=str(exc), error_stage=exc.stage)
