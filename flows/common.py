"""What the flows share: in-process references for tasks, and structured log fields."""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event
from prefect.utilities.annotations import quote

from skyferry.config import PipelineConfig
from skyferry.distribute.placement import HealthState
from skyferry.run.context import RunSetup
from skyferry.secrets import scrub
from skyferry.stages import Stage

__all__ = ["emit_node_events", "event", "ref"]

logger = logging.getLogger("skyferry.flows")
NODE_EVENTS = {"suspect": "skyferry.node.suspect", "down": "skyferry.node.down",
               "healthy": "skyferry.node.recovered"}


def ref(value: Any) -> Any:
    """Hand an in-process reference to a task without Prefect walking its fields."""
    return quote(value)


def event(config: PipelineConfig, stage: Stage, batch_id: str | None = None,
          chunk: int | None = None) -> dict[str, Any]:
    """Structured fields for a log event: the dataset, the batch, the stage and the chunk."""
    return {"dataset": config.dataset, "batch": batch_id or config.batch_id, "stage": stage,
            "chunk": chunk}


def emit_node_events(setup: RunSetup) -> None:
    """Send each change of a node's state during the run as a Prefect event
    (``skyferry.node.suspect``, ``.down``, ``.recovered``) on the resource
    ``skyferry.node.<name>``: automations can act on them (prefect.yaml)."""
    clouds = {n.name: n.cloud for n in setup.topology.nodes}

    def emit(node: str, state: HealthState, reason: str) -> None:
        try:
            emit_event(event=NODE_EVENTS[state],
                       resource={"prefect.resource.id": f"skyferry.node.{node}",
                                 "prefect.resource.name": node,
                                 "skyferry.cloud": clouds.get(node, "")},
                       payload={"state": state, "reason": scrub(reason)[:500],
                                "dataset": setup.config.dataset})
        except Exception as exc:  # an event lost is no reason to fail a write
            logger.warning("could not send the event for node %s: %s", node, exc)

    setup.health.listeners.append(emit)
