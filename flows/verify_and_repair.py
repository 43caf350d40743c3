"""The ``verify-and-repair`` flow: check every replica of a committed dataset where it is,
and, with ``repair``, bring every chunk back to R verified replicas.

Its per-node table is an artifact of the run. The run fails, after publishing it, unless
the verdict is ``healthy`` (see :attr:`~skyferry.ops.verify.VerifyReport.verdict`): damage
left, or a place that could not be checked; the CLI exits non-zero for the same verdicts.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.common import ref
from skyferry.config import get_settings
from skyferry.errors import ReplicasAtRiskError
from skyferry.ops.verify import VerifyReport
from skyferry.topology import load_topology
from tasks.maintain import repair_replicas, verify_replicas

__all__ = ["verify_and_repair"]


@flow(name="verify-and-repair", log_prints=False, validate_parameters=True)
def verify_and_repair(dataset: str, batch_id: str | None = None, deep: bool = False,
                      repair: bool = False, max_node_share: float = 0.5,
                      topology: str | None = None, node: str | None = None) -> dict[str, Any]:
    """Verify ``dataset`` (``deep``: every byte), and with ``repair`` re-create what is
    missing or damaged and replay hints. ``node``: repair only the batches with a replica or
    a hint on it (the ``node-recovered-repair`` automation sets it). Returns the report as
    JSON-ready data."""
    logger = get_run_logger()
    topo = load_topology(topology)
    if repair:
        repaired = repair_replicas(ref(topo), dataset, batch_id, deep, max_node_share,
                                   get_settings().probe_timeout_s, node)
        found, body = repaired.found, json.loads(repaired.to_json())
    else:
        found = verify_replicas(ref(topo), dataset, batch_id, deep)
        body = json.loads(found.to_json())
    _publish(found, "repair" if repair else "verify")
    logger.info("%s %s (%s): %s", "repaired" if repair else "verified", dataset, found.level,
                found.counts())
    outcome = repaired if repair else found
    if outcome.verdict != "healthy":  # the same verdict as the CLI's exit code
        raise ReplicasAtRiskError(outcome.summary(), dataset=dataset)
    return dict(body)


def _publish(found: VerifyReport, what: str) -> None:
    slug = "".join(c if c.isalnum() else "-" for c in found.dataset.lower()).strip("-")
    create_table_artifact(table=found.by_node(), key=f"{slug}-{what}",
                          description=f"{what} of {found.dataset} ({found.level}): replicas by "
                                      "node, as found before any repair")
