from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.errors import InsufficientNodesError
from skyferry.topology import load_topology


@pytest.fixture
def placer(home: Path) -> Placer:
    topo = load_topology()
    return Placer(topo, "aws", topo.source_region, replicas=3)


def test_aws_source_keeps_two_replicas_home_and_one_abroad(placer: Placer) -> None:
    plans = placer.plan([100] * 20, NodeHealth(), quorum=2)
    topo = placer.topology
    for nodes in plans:
        clouds = [topo.node(n).cloud for n in nodes]
        assert len(set(nodes)) == 3
        assert clouds.count("aws") >= 2
        assert any(c != "aws" for c in clouds)
    assert plans[0][0] == "aws-node-1"  # same region, no egress: the cheapest, closest node


def test_load_is_balanced_by_bytes_across_equal_nodes(placer: Placer) -> None:
    plans = placer.plan([100] * 20, NodeHealth(), quorum=2)
    abroad = Counter(n for nodes in plans for n in nodes if not n.startswith("aws"))
    assert abroad == {"gcp-node-1": 10, "gcp-node-2": 10}
    assert placer.load["gcp-node-1"] == placer.load["gcp-node-2"] == 1000


def test_down_nodes_are_avoided_and_clouds_still_span(placer: Placer) -> None:
    health = NodeHealth()
    health.mark("aws-node-2", "down")
    health.mark("gcp-node-1", "down")
    plans = placer.plan([1] * 5, health, quorum=2)
    for nodes in plans:
        assert "aws-node-2" not in nodes and "gcp-node-1" not in nodes
        assert {placer.topology.node(n).cloud for n in nodes} >= {"aws"}
        assert len({placer.topology.node(n).cloud for n in nodes}) >= 2


def test_gcp_source_prefers_gcp(home: Path) -> None:
    topo = load_topology()
    plans = Placer(topo, "gcp", None, replicas=3).plan([1], NodeHealth(), quorum=2)
    clouds = [topo.node(n).cloud for n in plans[0]]
    assert clouds[:2] == ["gcp", "gcp"] and clouds[2] != "gcp"


def test_too_few_healthy_nodes_for_the_quorum(placer: Placer) -> None:
    health = NodeHealth()
    for name in ("aws-node-1", "aws-node-2", "gcp-node-1", "gcp-node-2"):
        health.mark(name, "down")
    with pytest.raises(InsufficientNodesError) as info:
        placer.plan([1], health, quorum=2)
    assert info.value.healthy == 1 and info.value.required == 2
    assert "azure-node-1" in str(info.value)
