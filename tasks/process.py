"""Process stage task: decode, validate, transform and encode one chunk."""

from __future__ import annotations

import time

from skyferry.models import IngestedChunk, ProcessedChunk
from skyferry.pipeline import RunContext, process_chunk_fn
from tasks._common import finish, io_task

__all__ = ["process_chunk"]


@io_task("process-chunk")
def process_chunk(ingested: IngestedChunk, ctx: RunContext) -> ProcessedChunk:
    started = time.perf_counter()
    result = process_chunk_fn(ingested, ctx)
    return finish(ctx, "processing", result, started, ingested.bytes_read)
