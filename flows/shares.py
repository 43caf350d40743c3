"""Cloud shares: which cloud's work pool computes which chunks of a batch.

The parent flow plans a batch, then splits its chunks into one share per cloud. The shares
are balanced by bytes, so every pool works; within one chunk's worth of balance a chunk goes
to a cloud that holds one of its planned replicas (one of its writes then stays inside that
cloud). Deployed, the shares are cut into units that the children claim as they go
(:mod:`skyferry.distribute.claims`); a cloud whose pool cannot take work is left out.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from skyferry.distribute.claims import assign_shares

__all__ = ["ShareReport", "assign_shares", "share_deployment"]

CHILD_FLOW = "cloud-share"


def share_deployment(cloud: str) -> str:
    """The child deployment that runs ``cloud``'s share: ``cloud-share/<cloud>-share``."""
    return f"{CHILD_FLOW}/{cloud}-share"


class ShareReport(BaseModel):
    """What a child run did with its share; saved in the pending journal for the parent."""

    cloud: str
    ran_on: str = Field(description="The work pool, or 'in-process'.")
    flow_run_id: str | None = None
    chunks: list[int] = Field(default_factory=list)
    stored: list[int] = Field(default_factory=list)
    units: list[int] = Field(default_factory=list, description="Units this child finished.")
    units_stolen: int = Field(default=0, description="Units whose home was another cloud.")
    units_retaken: int = Field(default=0, description="Units taken after a claim expired.")
    busy_s: float = Field(default=0.0, description="Seconds spent moving claimed units.")
    stages: dict[str, list[float]] = Field(default_factory=dict)
    down_reasons: dict[str, str] = Field(default_factory=dict)
