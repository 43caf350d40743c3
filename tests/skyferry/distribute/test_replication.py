from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.distribute.replication import FanOut, ReplicaWriter
from skyferry.hashing import content_hash
from skyferry.storage import ObjectWriter, Store
from skyferry.topology import load_topology

# How long a write to the capped node holds on, waiting to see a second one start. Only the
# capped case waits it out (three times); without a cap the second write ends the wait.
OVERLAP_WINDOW_S = 0.5


@pytest.fixture
def writer(home: Path) -> ReplicaWriter:
    topo = load_topology()
    return ReplicaWriter(topo, NodeHealth(), Placer(topo, "aws", topo.source_region, replicas=3),
                         "aws")


def blocks_of(data: bytes, size: int = 1000) -> Callable[[FanOut], None]:
    """A producer that streams ``data`` in blocks of ``size`` bytes."""
    def produce(fan: FanOut) -> None:
        for start in range(0, len(data), size):
            fan.write(data[start:start + size])
    return produce


def test_a_writes_allowance_counts_the_bytes_sharing_its_node(writer: ReplicaWriter) -> None:
    node = writer.topology.node("gcp-node-1")
    assert writer._allowance(node) == pytest.approx(node.timeout_s)
    writer._enter(node.name, 8_000_000)
    assert writer._allowance(node) == pytest.approx(node.timeout_s + 2.0)  # 8 MB, 4 MB/s
    writer._enter(node.name, 8_000_000)  # another chunk's block, queued to the same node
    assert writer._allowance(node) == pytest.approx(node.timeout_s + 4.0)
    other = writer.topology.node("gcp-node-2")
    assert writer._allowance(other) == pytest.approx(other.timeout_s)  # per node
    writer._leave(node.name, 8_000_000)
    writer._leave(node.name, 8_000_000)
    assert writer._allowance(node) == pytest.approx(node.timeout_s)


def test_a_streamed_write_stores_the_bytes_and_leaves_nothing_queued(
        writer: ReplicaWriter, home: Path) -> None:
    data = bytes(range(256)) * 40
    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    outcome = writer.write(0, "d/chunk-00000.bin", blocks_of(data), planned, 2)
    assert [r.node for r in outcome.replicas if r.state == "verified"] == planned
    assert (outcome.digest, outcome.size) == (content_hash(data), len(data))
    for name in planned:
        assert (home / "nodes" / name / "d" / "chunk-00000.bin").read_bytes() == data
        assert not list((home / "nodes" / name / "d").glob(".tmp-*"))
    assert writer._queued == dict.fromkeys(planned, 0)


def test_a_failed_producer_leaves_no_replica(writer: ReplicaWriter, home: Path) -> None:
    def produce(fan: FanOut) -> None:
        fan.write(b"half a chunk" * 200_000)  # enough to reach the replicas' writers
        raise ValueError("the source broke off")

    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    with pytest.raises(ValueError, match="broke off"):
        writer.write(0, "d/chunk-00000.bin", produce, planned, 2)
    writer.close()  # the sinks' threads end
    for name in planned:
        assert not list((home / "nodes" / name).rglob("*chunk-00000*")), name
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
    real_open, real_commit = Store.writer, ObjectWriter.commit

    def open_writer(store: Store, key: str, **kw: Any) -> ObjectWriter:
        if store.name == "aws-node-1":
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                if active[0] > 1:
                    overlapped.set()
            overlapped.wait(OVERLAP_WINDOW_S)  # every chance for another write to start
        return real_open(store, key, **kw)

    def commit(out: ObjectWriter) -> None:
        real_commit(out)
        if out.store.name == "aws-node-1":
            with lock:
                active[0] -= 1

    monkeypatch.setattr(Store, "writer", open_writer)
    monkeypatch.setattr(ObjectWriter, "commit", commit)
    chunks = {i: bytes([i + 1]) * 4096 for i in range(3)}
    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        outcomes = list(pool.map(
            lambda i: writer.write(i, f"d/chunk-{i:05d}.bin", blocks_of(chunks[i]), planned, 2),
            chunks))
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
    data = b"replica bytes"
    planned = ["aws-node-1", "gcp-node-1"]
    done: list[Any] = []
    waiting, real_wait = threading.Event(), writer._wait_for_slot

    def wait(node_: Any, slot_: Any, key: str) -> None:
        waiting.set()
        real_wait(node_, slot_, key)

    writer._wait_for_slot = wait  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: done.append(
        writer.write(0, "d/x.bin", blocks_of(data), planned, 1)))
    thread.start()
    assert waiting.wait(30)  # the write waits for the node's one slot
    writer.health.mark(node.name, "down", "did not finish writing within 7.0s")
    thread.join(timeout=30)
    (outcome,) = done
    assert "aws-node-1" not in {r.node for r in outcome.replicas if r.state == "verified"}
    assert any("aws-node-1 was marked down" in e for e in outcome.errors), outcome.errors
    assert len([r for r in outcome.replicas if r.state == "verified"]) == 2  # re-placed
    writer.close()
    assert not (home / "nodes" / "aws-node-1" / "d" / "x.bin").exists()
    assert writer._queued.get(node.name, 0) == 0


def test_a_write_waiting_for_a_slot_of_a_slow_node_takes_its_turn(home: Path) -> None:
    """A node turned suspect (slow) while a chunk waits for its one write slot is not down:
    the chunk writes its replica there once the slot is free, and the node stays up."""
    writer = _capped(1)
    node = writer.topology.node("aws-node-1")
    slot = writer._slot(node)
    assert slot is not None and slot.acquire(blocking=False)  # a slow write holds the slot
    data = b"replica bytes"
    planned = ["aws-node-1", "gcp-node-1"]
    done: list[Any] = []
    waiting, real_wait = threading.Event(), writer._wait_for_slot

    def wait(node_: Any, slot_: Any, key: str) -> None:
        waiting.set()
        real_wait(node_, slot_, key)

    writer._wait_for_slot = wait  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: done.append(
        writer.write(0, "d/x.bin", blocks_of(data), planned, 2)))
    thread.start()
    assert waiting.wait(30)
    seen, real_state = threading.Event(), writer.health.state

    def state(name: str) -> Any:
        found = real_state(name)
        if name == node.name and found == "suspect":
            seen.set()
        return found

    writer.health.state = state  # type: ignore[method-assign]
    writer.health.mark(node.name, "suspect", "slow: each of its last 2 probes took 920 ms")
    assert seen.wait(30)  # the waiting write polled its slot and found the node suspect
    slot.release()  # the slow write ends
    thread.join(timeout=30)
    (outcome,) = done
    assert [r.node for r in outcome.replicas if r.state == "verified"] == planned
    assert outcome.errors == [] and outcome.node_failures == 0
    assert writer.health.state(node.name) == "suspect"
    assert (home / "nodes" / "aws-node-1" / "d" / "x.bin").read_bytes() == data
    writer.close()


def test_chunks_that_share_capped_nodes_in_any_order_all_finish(home: Path) -> None:
    """Every chunk streams to its replicas in step, so a chunk holding one capped node's slot
    while waiting for another's, held by a chunk waiting for the first, would wait for ever:
    slots are taken in one order for every chunk."""
    topo = load_topology()
    capped = {"aws-node-1", "gcp-node-1"}
    topo = topo.model_copy(update={"nodes": [
        n.model_copy(update={"max_writes": 1}) if n.name in capped else n for n in topo.nodes]})
    writer = ReplicaWriter(topo, NodeHealth(), Placer(topo, "aws", topo.source_region, 3), "aws")
    data = {i: bytes([i]) * 200_000 for i in range(6)}  # many blocks: the queues fill
    orders = [["aws-node-1", "gcp-node-1"], ["gcp-node-1", "aws-node-1"]]
    pool = ThreadPoolExecutor(max_workers=len(data))
    futures = [pool.submit(writer.write, i, f"d/c{i}.bin", blocks_of(data[i], 1000),
                           orders[i % 2], 2) for i in data]
    try:
        outcomes = [f.result(timeout=60) for f in futures]
    finally:
        pool.shutdown(wait=False)
        writer.close()
    for i, outcome in zip(data, outcomes, strict=True):
        assert sorted(r.node for r in outcome.replicas if r.state == "verified") == sorted(
            capped)
        for name in capped:
            assert (home / "nodes" / name / "d" / f"c{i}.bin").read_bytes() == data[i]


def test_time_spent_producing_the_next_block_is_not_held_against_a_node(home: Path) -> None:
    """A producer far slower than the nodes' timeout (a heavy transform, a busy machine):
    the writers wait for skyferry's next block without owing anything, so every replica
    verifies and no node is marked down."""
    topo = load_topology()
    topo = topo.model_copy(update={"nodes": [n.model_copy(update={"timeout_s": 0.3})
                                             for n in topo.nodes]})
    health = NodeHealth()
    writer = ReplicaWriter(topo, health, Placer(topo, "aws", topo.source_region, replicas=3),
                           "aws")
    data = bytes(range(256)) * 8192  # 2 MiB: two blocks of 1 MiB

    def slow(fan: FanOut) -> None:
        for start in range(0, len(data), 1 << 20):
            time.sleep(1.0)  # more than three timeouts of the nodes between blocks
            fan.write(data[start:start + (1 << 20)])
        time.sleep(1.0)

    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    try:
        outcome = writer.write(0, "d/chunk-00000.bin", slow, planned, 2)
    finally:
        writer.close()
    assert [r.node for r in outcome.replicas if r.state == "verified"] == planned
    assert outcome.node_failures == 0 and health.down_nodes() == []
    for name in planned:
        assert (home / "nodes" / name / "d" / "chunk-00000.bin").read_bytes() == data
    assert set(health.answered) == set(planned)  # each write was evidence the node answers


def test_a_suspect_node_is_avoided_but_takes_a_replica_that_would_go_nowhere(
        home: Path) -> None:
    """A suspect node (slow probes: a busy emulator) is no failure. A healthy spare takes
    its replica; with no spare left, it takes the replica itself rather than leave a hint."""
    data = bytes(range(256)) * 64
    planned = ["aws-node-1", "gcp-node-1", "azure-node-1"]
    full = load_topology()
    for names, expected in ((None, ["aws-node-1", "aws-node-2", "azure-node-1"]),
                            (planned, planned)):
        topo = full if names is None else full.model_copy(
            update={"nodes": [n for n in full.nodes if n.name in names]})
        health = NodeHealth()
        health.mark("gcp-node-1", "suspect", "slow: each of its last 2 probes took 600 ms")
        writer = ReplicaWriter(topo, health, Placer(topo, "aws", topo.source_region, 3), "aws")
        try:
            outcome = writer.write(0, "d/chunk-00000.bin", blocks_of(data), planned, 2)
        finally:
            writer.close()
        assert sorted(r.node for r in outcome.replicas if r.state == "verified") == sorted(expected)
        assert outcome.node_failures == 0
        for name in expected:
            assert (home / "nodes" / name / "d" / "chunk-00000.bin").read_bytes() == data
