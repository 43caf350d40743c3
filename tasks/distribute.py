"""Distribute stage tasks: probe the nodes, then write and verify each chunk's replicas."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from skyferry.models import ProcessedChunk, StoredChunk
from skyferry.pipeline import RunContext, distribute_chunk_fn, probe_nodes_fn
from tasks._common import finish, io_task

__all__ = ["distribute_chunk", "probe_nodes"]


@task(name="probe-nodes", cache_policy=NONE)
def probe_nodes(ctx: RunContext) -> dict[str, float | None]:
    """The failure detector: each node's round trip, or None when it is down."""
    return probe_nodes_fn(ctx)


@io_task("write-replicas")
def distribute_chunk(processed: ProcessedChunk, ctx: RunContext) -> StoredChunk:
    started = time.perf_counter()
    result = distribute_chunk_fn(processed, ctx, attempt=int(task_run.run_count or 1))
    return finish(ctx, "distribution", result, started, processed.size * len(result.verified))
