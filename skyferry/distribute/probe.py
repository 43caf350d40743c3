"""Probe the nodes: a sentinel written, read and deleted on each, with a timeout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from skyferry.distribute.placement import NodeHealth
from skyferry.storage import Store
from skyferry.topology import Node, Topology

__all__ = ["probe_nodes"]


def probe_nodes(topology: Topology, health: NodeHealth,
                timeout: float) -> dict[str, float | None]:
    """Each node's round trip in seconds, or None when it is down; marks ``health``.

    Nodes ``health`` already holds down (a parent run found them so) are not probed again.
    A node whose store cannot be set up fails its probe like one that does not answer.
    """
    latencies: dict[str, float | None] = {}
    nodes = list(topology.nodes)
    pool = ThreadPoolExecutor(max_workers=max(1, len(nodes)))
    known_down = set(health.down_nodes())
    stores: dict[str, Store] = {}  # filled as each node's store is set up, to stop a hung probe
    futures = {n.name: pool.submit(_probe, n, stores) for n in nodes
               if n.enabled and n.name not in known_down}
    for node in nodes:
        latencies[node.name] = None
        if not node.enabled:
            health.mark(node.name, "down", "disabled in the topology")
            continue
        if node.name in known_down:
            continue
        try:
            latency = futures[node.name].result(timeout=timeout)
        except FutureTimeout:
            health.mark(node.name, "down", f"probe timed out after {timeout}s")
            if node.name in stores:
                stores[node.name].cancel()
            continue
        except Exception as exc:
            health.mark(node.name, "down", f"probe failed: {type(exc).__name__}: {exc}")
            continue
        health.mark(node.name, "healthy")
        health.latency_s[node.name] = latency
        latencies[node.name] = latency
    pool.shutdown(wait=False, cancel_futures=True)
    return latencies


def _probe(node: Node, stores: dict[str, Store]) -> float:
    store = stores[node.name] = node.open_store()
    return store.probe()
