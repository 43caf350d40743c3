"""Distribute stage tasks: probe the nodes, then write and verify each chunk's replicas."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from skyferry.models import ProcessedChunk, StoredChunk
from skyferry.pipeline import RunContext, distribute_chunk_fn, probe_nodes_fn
from tasks._retry import retry_delays, retry_transient

__all__ = ["distribute_chunk", "probe_nodes"]

_DELAYS = retry_delays()


@task(name="probe-nodes", cache_policy=NONE)
def probe_nodes(ctx: RunContext) -> dict[str, float | None]:
    return probe_nodes_fn(ctx)


@task(name="write-replicas", retries=len(_DELAYS), retry_delay_seconds=_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NONE)
def distribute_chunk(processed: ProcessedChunk, ctx: RunContext) -> StoredChunk:
    started = time.perf_counter()
    result = distribute_chunk_fn(processed, ctx)
    attempts = int(task_run.run_count or 1)
    ctx.recorder.record("distribution", nbytes=processed.size * len(result.verified),
                        seconds=time.perf_counter() - started, attempts=attempts)
    return result.model_copy(update={"attempts": attempts})
