"""Network-aware replica placement, and the run's view of node health.

Nodes are grouped into cost tiers: sorted by egress cost, then latency from the source, a
node joins the tier of the cheapest node before it when its cost is within the topology's
``balance_within`` of that node's. Within a tier the node with the fewest bytes placed comes
first (load balance), then the cheaper, then by name. The first replica takes the best
node; the replicas must span at least two clouds when two are available (failure domains).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
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
    # per node, the monotonic time a call of the run's own to it last completed: evidence
    # that the node answers, whatever its probes show
    answered: dict[str, float] = field(default_factory=dict)
    # called as (node, new state, reason) on every change of a node's state, after it
    listeners: list[Callable[[str, HealthState, str], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mark(self, node: str, state: HealthState, reason: str = "") -> None:
        with self._lock:
            previous = self.states.get(node, "healthy")
            self.states[node] = state
            if reason and (previous != state or node not in self.reasons):
                self.reasons[node] = reason  # a node already down keeps its first cause
            listeners = list(self.listeners) if previous != state else []
        if previous != state and state != "healthy":
            logger.warning("node %s is now %s%s", node, state, f": {reason}" if reason else "")
        elif previous != state:
            logger.info("node %s is healthy again", node)
        for listener in listeners:
            listener(node, state, reason)

    def answer(self, node: str) -> None:
        """A call to ``node`` (a block written, an upload committed, a replica read back)
        completed now."""
        self.answered[node] = time.monotonic()  # one dict store: atomic, no lock needed

    def state(self, node: str) -> HealthState:
        return self.states.get(node, "healthy")

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
        self.tier = self.tiers()

    def tiers(self) -> dict[str, int]:
        """Each node's cost tier from the source: 0 is the cheapest (see the module)."""
        within = self.topology.balance_within
        costs = {n.name: self.topology.cost(self.source_cloud, self.source_region, n)
                 for n in self.topology.nodes}
        order = sorted(costs, key=lambda n: (costs[n].egress_usd_per_gb, costs[n].latency_ms,
                                             n))
        tiers: dict[str, int] = {}
        head = None
        for name in order:
            cost = costs[name]
            if head is None or not (
                    cost.egress_usd_per_gb <= head.egress_usd_per_gb
                    + within.egress_usd_per_gb + 1e-12
                    and cost.latency_ms <= head.latency_ms + within.latency_ms + 1e-9):
                head = cost
                tier = len(set(tiers.values()))
            tiers[name] = tier
        return tiers

    def rank(self, candidates: Iterable[Node]) -> list[Node]:
        tiers = self.tier

        def key(node: Node) -> tuple[int, int, float, float, str]:
            cost = self.topology.cost(self.source_cloud, self.source_region, node)
            return (tiers[node.name], self.load[node.name], cost.egress_usd_per_gb,
                    cost.latency_ms, node.name)

        return sorted(candidates, key=key)

    def spares(self, candidates: Iterable[Node], held: Iterable[str] = ()) -> list[Node]:
        """Nodes to take a chunk's next replica, best first: while the clouds in ``held``
        (the clouds already holding one) number fewer than two, other clouds before them;
        within that, by :meth:`rank`. The one ranking of spare nodes: a write that lost a
        node, and a repair."""
        ranked = self.rank(candidates)
        clouds = set(held)
        if len(clouds) < 2:
            ranked.sort(key=lambda n: n.cloud in clouds)  # stable: rank holds within each
        return ranked

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
