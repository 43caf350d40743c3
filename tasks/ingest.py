"""Ingest stage tasks: list the source, plan the batch, read and hash each chunk."""

from __future__ import annotations

import time

from skyferry.manifest import BatchPlan
from skyferry.models import ChunkPlan, IngestedChunk, SourceFile
from skyferry.pipeline import RunContext, build_plan, ingest_chunk_fn, new_source_files
from tasks._common import finish, io_task

__all__ = ["ingest_chunk", "list_new_files", "plan_batch"]


@io_task("list-new-files")
def list_new_files(ctx: RunContext) -> list[SourceFile]:
    return new_source_files(ctx)


@io_task("plan-batch")
def plan_batch(ctx: RunContext, files: list[SourceFile]) -> tuple[BatchPlan, bool]:
    return build_plan(ctx, files)


@io_task("ingest-chunk")
def ingest_chunk(chunk: ChunkPlan, ctx: RunContext) -> IngestedChunk:
    started = time.perf_counter()
    result = ingest_chunk_fn(chunk, ctx)
    return finish(ctx, "ingestion", result, started, result.bytes_read)
