"""Ingest stage tasks: list the source, plan the batch, read and hash each chunk."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from skyferry.manifest import BatchPlan
from skyferry.models import ChunkPlan, IngestedChunk, SourceFile
from skyferry.pipeline import RunContext, build_plan, ingest_chunk_fn, new_source_files
from tasks._retry import retry_delays, retry_transient

__all__ = ["ingest_chunk", "list_new_files", "plan_batch"]

_DELAYS = retry_delays()


@task(name="list-new-files", retries=len(_DELAYS), retry_delay_seconds=_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def list_new_files(ctx: RunContext) -> list[SourceFile]:
    return new_source_files(ctx)


@task(name="plan-batch", retries=len(_DELAYS), retry_delay_seconds=_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def plan_batch(ctx: RunContext, files: list[SourceFile]) -> tuple[BatchPlan, bool]:
    return build_plan(ctx, files)


@task(name="ingest-chunk", retries=len(_DELAYS), retry_delay_seconds=_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def ingest_chunk(chunk: ChunkPlan, ctx: RunContext) -> IngestedChunk:
    started = time.perf_counter()
    result = ingest_chunk_fn(chunk, ctx)
    attempts = int(task_run.run_count or 1)
    ctx.recorder.record("ingestion", nbytes=result.bytes_read,
                        seconds=time.perf_counter() - started, attempts=attempts)
    return result.model_copy(update={"attempts": attempts})
