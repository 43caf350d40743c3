"""Configuration blocks: the topology of storage nodes and the cost table between clouds."""

from __future__ import annotations

from blocks.topology import Link, Node, Topology, load_topology

__all__ = ["Link", "Node", "Topology", "load_topology"]
