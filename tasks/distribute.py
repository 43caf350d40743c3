"""Distribute task: probe the nodes (a chunk's replicas are written by ``move-chunk``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from skyferry.distribute import probe
from skyferry.run.context import RunSetup

__all__ = ["probe_nodes"]


@task(name="probe-nodes", cache_policy=NONE)
def probe_nodes(setup: RunSetup) -> dict[str, float | None]:
    """Each node's round trip, or None when it is down; marks the run's node health."""
    return probe.probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
