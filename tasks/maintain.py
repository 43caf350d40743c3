"""Maintenance tasks: verify a committed dataset's replicas, and repair them."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from skyferry.ops.repair import RepairReport, repair_dataset
from skyferry.ops.verify import VerifyReport, verify_dataset
from skyferry.topology import Topology

__all__ = ["repair_replicas", "verify_replicas"]


@task(name="verify-replicas", cache_policy=NONE)
def verify_replicas(topology: Topology, dataset: str, batch_id: str | None,
                    deep: bool) -> VerifyReport:
    return verify_dataset(topology, dataset, batch_id=batch_id, deep=deep)


@task(name="repair-replicas", cache_policy=NONE)
def repair_replicas(topology: Topology, dataset: str, batch_id: str | None, deep: bool,
                    max_node_share: float, probe_timeout_s: float,
                    node: str | None = None) -> RepairReport:
    return repair_dataset(topology, dataset, batch_id=batch_id, node=node, deep=deep,
                          max_node_share=max_node_share, probe_timeout_s=probe_timeout_s)
