"""Process stage task: decode, validate, transform and encode one chunk."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from skyferry.models import IngestedChunk, ProcessedChunk
from skyferry.pipeline import RunContext, process_chunk_fn
from tasks._retry import retry_delays, retry_transient

__all__ = ["process_chunk"]

_DELAYS = retry_delays()


@task(name="process-chunk", retries=len(_DELAYS), retry_delay_seconds=_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def process_chunk(ingested: IngestedChunk, ctx: RunContext) -> ProcessedChunk:
    started = time.perf_counter()
    result = process_chunk_fn(ingested, ctx)
    attempts = int(task_run.run_count or 1)
    ctx.recorder.record("processing", nbytes=ingested.bytes_read,
                        seconds=time.perf_counter() - started, attempts=attempts)
    return result.model_copy(update={"attempts": attempts})
