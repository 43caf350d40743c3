"""Events a person should hear of, for the automations of ``deployments/alerts.yaml``.

A failed or crashed run and a node marked down are Prefect's own events and skyferry's
``skyferry.node.down``. This module adds two on the dataset's resource
(``skyferry.dataset.<name>``): ``skyferry.batch.at-risk``, a committed batch whose chunks
all sit in one cloud, and ``skyferry.egress.exceeded``, a run whose egress went over its
plan (or a run refused for its budget). Each payload names the dataset, the batch and the
command to run next.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event

from skyferry.config import PipelineConfig
from skyferry.metrics import PipelineResult

__all__ = ["EGRESS_SLACK", "emit_budget_refused", "emit_run_alerts"]

logger = logging.getLogger("skyferry.flows")

EGRESS_SLACK = 1.10  # egress over the plan by more than this factor is an alert


def _emit(name: str, dataset: str, payload: dict[str, Any]) -> None:
    try:
        emit_event(event=name,
                   resource={"prefect.resource.id": f"skyferry.dataset.{dataset}",
                             "prefect.resource.name": dataset},
                   payload={"dataset": dataset, **payload})
    except Exception as exc:  # an event lost is no reason to fail a committed run
        logger.warning("could not send the event %s for %s: %s", name, dataset, exc)


def emit_run_alerts(result: PipelineResult) -> None:
    """After a commit: chunks at risk, and egress over the plan."""
    if result.chunks_at_risk:
        _emit("skyferry.batch.at-risk", result.dataset, {
            "batch": result.batch_id, "chunks": result.chunks_at_risk[:50],
            "next": f"skyferry repair {result.dataset} --batch {result.batch_id} (once a "
                    "node of another cloud is up)"})
    planned, actual = result.planned_egress_usd, result.egress_usd
    if planned is not None and actual is not None and actual > planned * EGRESS_SLACK + 1e-6:
        _emit("skyferry.egress.exceeded", result.dataset, {
            "batch": result.batch_id, "planned_usd": round(planned, 6),
            "actual_usd": round(actual, 6),
            "next": f"skyferry plan SOURCE --dataset {result.dataset} (compare its routes with "
                    "the run's placement artifact)"})


def emit_budget_refused(config: PipelineConfig, planned_usd: float, limit_usd: float) -> None:
    """A run refused before any write: its plan's egress is over ``--max-egress-usd``."""
    _emit("skyferry.egress.exceeded", config.dataset, {
        "batch": config.batch_id or "unplanned", "planned_usd": round(planned_usd, 6),
        "limit_usd": limit_usd,
        "next": f"skyferry plan {config.source} --dataset {config.dataset}, then raise "
                "--max-egress-usd or change the topology"})
