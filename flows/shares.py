"""Cloud shares: which cloud's work pool computes which chunks of a batch.

The parent flow plans a batch, then splits its chunks into one share per cloud. The shares
are balanced by bytes, so every pool works; within one chunk's worth of balance a chunk goes
to a cloud that holds one of its planned replicas (one of its writes then stays inside that
cloud). A cloud whose pool cannot take work (no live worker, or its child run failed) is left
out, and its chunks go to the other clouds by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, Field

from skyferry.models import ChunkPlan
from skyferry.topology import Topology

__all__ = ["ShareReport", "assign_shares", "share_deployment"]

CHILD_FLOW = "cloud-share"


def share_deployment(cloud: str) -> str:
    """The child deployment that runs ``cloud``'s share: ``cloud-share/<cloud>-share``."""
    return f"{CHILD_FLOW}/{cloud}-share"


def assign_shares(chunks: Sequence[ChunkPlan], topology: Topology,
                  clouds: Iterable[str]) -> dict[str, list[int]]:
    """Split ``chunks`` over ``clouds`` (the ones that can take work), balanced by bytes.

    Deterministic: the same chunks and clouds give the same shares.
    """
    allowed = sorted(set(clouds))
    if not allowed:
        raise ValueError("no cloud can take work")
    cloud_of = {n.name: n.cloud for n in topology.nodes}
    load = dict.fromkeys(allowed, 0)
    shares: dict[str, list[int]] = {c: [] for c in allowed}
    for chunk in chunks:
        near = {cloud_of.get(n) for n in chunk.nodes}
        # a cloud that holds a replica is ahead by one chunk: locality, within balance
        cloud = min(allowed, key=lambda c: (load[c] - (chunk.size if c in near else 0), c))
        shares[cloud].append(chunk.index)
        load[cloud] += chunk.size
    return {c: idx for c, idx in shares.items() if idx}


class ShareReport(BaseModel):
    """What a child run did with its share; saved in the pending journal for the parent."""

    cloud: str
    ran_on: str = Field(description="The work pool, or 'in-process'.")
    flow_run_id: str | None = None
    chunks: list[int] = Field(default_factory=list)
    stored: list[int] = Field(default_factory=list)
    stages: dict[str, list[float]] = Field(default_factory=dict)
    down_reasons: dict[str, str] = Field(default_factory=dict)
