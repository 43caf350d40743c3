"""Network-aware replica placement, and the run's view of node health.

Nodes are ranked by egress cost, then latency from the source, then bytes already placed on
them (load balance), then name. The first replica takes the best node; the replicas must
span at least two clouds when two are available (failure domains).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from skyferry.errors import InsufficientCloudsError, InsufficientNodesError
from skyferry.topology import Node, Topology

__all__ = ["NodeHealth", "Placer", "HealthState"]

logger = logging.getLogger("skyferry.distribute")

HealthState = Literal["healthy", "suspect", "down"]


@dataclass
class NodeHealth:
    """Thread-safe health of every node during a run."""

    states: dict[str, HealthState] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mark(self, node: str, state: HealthState, reason: str = "") -> None:
        with self._lock:
            previous = self.states.get(node)
            self.states[node] = state
            if reason and (previous != state or node not in self.reasons):
                self.reasons[node] = reason  # a node already down keeps its first cause
        if previous != state and state != "healthy":
            logger.warning("node %s is now %s%s", node, state, f": {reason}" if reason else "")

    def healthy(self, node: str) -> bool:
        return self.states.get(node, "healthy") == "healthy"

    def down_nodes(self) -> list[str]:
        return sorted(n for n, s in self.states.items() if s != "healthy")


class Placer:
    """Chooses replica nodes for chunks; deterministic for the same inputs."""

    def __init__(self, topology: Topology, source_cloud: str, source_region: str | None,
                 replicas: int) -> None:
        self.topology = topology
        self.source_cloud = source_cloud
        self.source_region = source_region
        self.replicas = replicas
        self.load: dict[str, int] = {n.name: 0 for n in topology.nodes}

    def rank(self, candidates: Iterable[Node]) -> list[Node]:
        def key(node: Node) -> tuple[float, float, int, str]:
            cost = self.topology.cost(self.source_cloud, self.source_region, node)
            return (cost.egress_usd_per_gb, cost.latency_ms, self.load[node.name], node.name)

        return sorted(candidates, key=key)

    def choose(self, size: int, usable: Sequence[Node], exclude: Iterable[str] = ()) -> list[Node]:
        """Up to ``replicas`` nodes from ``usable`` (minus ``exclude``), spanning 2+ clouds."""
        skip = set(exclude)
        ranked = self.rank(n for n in usable if n.name not in skip)
        chosen: list[Node] = []
        clouds_available = {n.cloud for n in ranked}
        for node in ranked:
            if len(chosen) == self.replicas:
                break
            clouds = {n.cloud for n in chosen}
            last_slot = len(chosen) == self.replicas - 1
            if last_slot and len(clouds) == 1 and node.cloud in clouds and len(
                    clouds_available) > 1:
                continue  # keep the last slot for another failure domain
            chosen.append(node)
        for node in chosen:
            self.load[node.name] += size
        return chosen

    def plan(self, sizes: Sequence[int], health: NodeHealth, quorum: int,
             min_clouds: int = 1) -> list[list[str]]:
        usable = [n for n in self.topology.nodes if health.healthy(n.name)]
        if len(usable) < quorum:
            down = "; ".join(f"{n} ({health.reasons.get(n, 'down')})"
                             for n in health.down_nodes())
            raise InsufficientNodesError(
                f"only {len(usable)} healthy nodes ({', '.join(n.name for n in usable) or 'none'})"
                f" for a write quorum of {quorum}; down: {down}",
                healthy=len(usable), required=quorum,
            )
        clouds = sorted({n.cloud for n in usable})
        if len(clouds) < min_clouds:
            down = "; ".join(f"{n} ({health.reasons.get(n, 'down')})"
                             for n in health.down_nodes())
            raise InsufficientCloudsError(
                f"the healthy nodes span {len(clouds)} cloud(s) ({', '.join(clouds) or 'none'})"
                f", and each chunk's replicas must span {min_clouds}; down: {down or 'none'}. "
                "min_clouds: 1 takes availability instead, with the chunks at risk listed",
                clouds=clouds, required=min_clouds)
        return [[n.name for n in self.choose(size, usable)] for size in sizes]
