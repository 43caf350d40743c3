from __future__ import annotations

from pathlib import Path

import pytest

from blocks.topology import load_topology
from skyferry.hashing import content_hash
from skyferry.placement import NodeHealth, Placer
from skyferry.replication import ReplicaWriter


@pytest.fixture
def writer(home: Path) -> ReplicaWriter:
    topo = load_topology()
    return ReplicaWriter(topo, NodeHealth(), Placer(topo, "aws", topo.source_region, replicas=3),
                         "aws")


def test_a_writes_allowance_counts_the_bytes_sharing_its_node(writer: ReplicaWriter) -> None:
    node = writer.topology.node("gcp-node-1")
    first = writer._enter(node.name, 8_000_000)
    assert writer._deadline(node, first) == pytest.approx(node.timeout_s + 2.0)  # 8 MB, 4 MB/s
    second = writer._enter(node.name, 8_000_000)  # queued behind the first, in flight with it
    assert writer._deadline(node, second) == pytest.approx(node.timeout_s + 4.0)
    # the first shares the node with the second from now on: its allowance grows too
    assert writer._deadline(node, first) == pytest.approx(node.timeout_s + 4.0)
    other = writer.topology.node("gcp-node-2")
    assert writer._deadline(other, writer._enter(other.name, 8_000_000)) == pytest.approx(
        other.timeout_s + 2.0)  # per node
    writer._leave(node.name, 8_000_000)
    writer._leave(node.name, 8_000_000)
    third = writer._enter(node.name, 8_000_000)  # after both finished: alone again
    assert writer._deadline(node, third) == pytest.approx(node.timeout_s + 2.0)


def test_finished_writes_leave_nothing_queued(writer: ReplicaWriter, home: Path) -> None:
    data = bytes(range(256)) * 40
    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    outcome = writer.write(0, "d/chunk-00000.bin", data, content_hash(data), planned, 2)
    assert [r.node for r in outcome.replicas if r.state == "verified"] == planned
    for name in planned:
        assert (home / "nodes" / name / "d" / "chunk-00000.bin").read_bytes() == data
    assert writer._queued == dict.fromkeys(planned, 0)
