from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.distribute.replication import ReplicaWriter
from skyferry.errors import NodeUnavailableError
from skyferry.hashing import content_hash
from skyferry.storage import Store
from skyferry.topology import load_topology

# How long a write to the capped node holds on, waiting to see a second one start. Only the
# capped case waits it out (three times); without a cap the second write ends the wait.
OVERLAP_WINDOW_S = 0.5


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


def _capped(max_writes: int | None) -> ReplicaWriter:
    topo = load_topology()
    nodes = [n.model_copy(update={"max_writes": max_writes}) if n.name == "aws-node-1" else n
             for n in topo.nodes]
    topo = topo.model_copy(update={"nodes": nodes})
    return ReplicaWriter(topo, NodeHealth(), Placer(topo, "aws", topo.source_region, replicas=3),
                         "aws")


@pytest.mark.parametrize("max_writes", [None, 1])
def test_a_nodes_max_writes_caps_its_writes_in_flight(
        home: Path, monkeypatch: pytest.MonkeyPatch, max_writes: int | None) -> None:
    writer = _capped(max_writes)
    lock, active, peak = threading.Lock(), [0], [0]
    overlapped = threading.Event()
    real_put = Store.put

    def put(store: Store, key: str, data: bytes | memoryview) -> None:
        if store.name != "aws-node-1":
            return real_put(store, key, data)
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] > 1:
                overlapped.set()
        try:
            overlapped.wait(OVERLAP_WINDOW_S)  # every chance for another write to start
            return real_put(store, key, data)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(Store, "put", put)
    chunks = {i: bytes([i + 1]) * 4096 for i in range(3)}
    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        outcomes = list(pool.map(
            lambda i: writer.write(i, f"d/chunk-{i:05d}.bin", chunks[i],
                                   content_hash(chunks[i]), planned, 2), chunks))
    for i, outcome in zip(chunks, outcomes, strict=True):
        assert [r.node for r in outcome.replicas if r.state == "verified"] == planned
        for name in planned:
            assert (home / "nodes" / name / "d" / f"chunk-{i:05d}.bin").read_bytes() == chunks[i]
    if max_writes is None:
        assert peak[0] >= 2  # without a cap the three chunks' writes overlap on the node
    else:
        assert peak[0] == 1
    assert writer._queued == dict.fromkeys(planned, 0)


def test_a_write_waiting_for_a_slot_of_a_node_gone_down_gives_up(home: Path) -> None:
    writer = _capped(1)
    node = writer.topology.node("aws-node-1")
    slot = writer._slot(node)
    assert slot is not None and slot.acquire(blocking=False)  # a hung write holds the slot
    writer.health.mark(node.name, "down", "did not finish writing within 7.0s")
    data = b"replica bytes"
    writer._enter(node.name, len(data))
    with pytest.raises(NodeUnavailableError, match=r"aws-node-1 was marked down .*'d/x\.bin'"):
        writer._write_one(node, "d/x.bin", data, content_hash(data), None)
    assert not (home / "nodes" / "aws-node-1" / "d" / "x.bin").exists()
    assert writer._queued == {node.name: 0}
