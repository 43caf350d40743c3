"""Distribute tasks: probe the nodes, and write and verify one chunk's replicas."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from skyferry.distribute import probe
from skyferry.models import StoredChunk
from skyferry.run import chunk as chunk_stages
from skyferry.run.chunk import Processed
from skyferry.run.context import BatchRun, RunSetup
from tasks._common import io_task, run_stage_task

__all__ = ["probe_nodes", "write_replicas"]


@task(name="probe-nodes", cache_policy=NONE)
def probe_nodes(setup: RunSetup) -> dict[str, float | None]:
    """Each node's round trip, or None when it is down; marks the run's node health."""
    return probe.probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)


@io_task("write-replicas")
def write_replicas(processed: Processed, run: BatchRun) -> StoredChunk:
    return run_stage_task("distribution", chunk_stages.write_replicas, processed, run)
