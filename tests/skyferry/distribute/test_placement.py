from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.errors import InsufficientNodesError
from skyferry.topology import LinkCost, load_topology


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


def test_load_is_balanced_by_bytes_across_the_nodes_of_one_cost_tier(placer: Placer) -> None:
    # from aws us-east-1: gcp (35 ms, $0.09) and azure (40 ms, $0.09) are within the default
    # balance_within (10 ms, $0) of each other: one tier, so azure takes its share
    assert placer.tier["gcp-node-1"] == placer.tier["gcp-node-2"] == placer.tier["azure-node-1"]
    plans = placer.plan([100] * 21, NodeHealth(), quorum=2)
    abroad = Counter(n for nodes in plans for n in nodes if not n.startswith("aws"))
    assert abroad == {"gcp-node-1": 7, "gcp-node-2": 7, "azure-node-1": 7}


def test_the_topology_sets_the_tolerance(home: Path) -> None:
    topo = load_topology().model_copy(update={"balance_within": LinkCost(
        latency_ms=0, egress_usd_per_gb=0)})
    plans = Placer(topo, "aws", topo.source_region, replicas=3).plan([100] * 20, NodeHealth(),
                                                                      quorum=2)
    abroad = Counter(n for nodes in plans for n in nodes if not n.startswith("aws"))
    assert abroad == {"gcp-node-1": 10, "gcp-node-2": 10}  # azure is 5 ms further


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=60))
def test_a_tier_never_differs_by_more_than_one_chunk(sizes: list[int]) -> None:
    topo = load_topology()  # its folders are never touched here
    placer = Placer(topo, "aws", topo.source_region, replicas=3)
    placer.plan(sizes, NodeHealth(), quorum=2)
    tier = [placer.load[n] for n in ("gcp-node-1", "gcp-node-2", "azure-node-1")]
    assert max(tier) - min(tier) <= max(sizes)
    assert sum(placer.load.values()) == 3 * sum(sizes)


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
