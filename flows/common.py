"""What the flows share: in-process references for tasks, and structured log fields."""

from __future__ import annotations

from typing import Any

from prefect.utilities.annotations import quote

from skyferry.config import PipelineConfig

__all__ = ["event", "ref"]


def ref(value: Any) -> Any:
    """Hand an in-process reference to a task without Prefect walking its fields."""
    return quote(value)


def event(config: PipelineConfig, stage: str, batch_id: str | None = None,
          chunk: int | None = None) -> dict[str, Any]:
    """Structured fields for a log event: the dataset, the batch, the stage and the chunk."""
    return {"dataset": config.dataset, "batch": batch_id or config.batch_id, "stage": stage,
            "chunk": chunk}
