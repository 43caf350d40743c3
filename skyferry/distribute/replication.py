"""Write a chunk's replicas concurrently, verify each, and reach the quorum.

A failed replica marks its node down for the run and moves to the next ranked node. Every
planned node that did not get its replica is recorded as a hint, so a later repair can put
the replica where placement wanted it (or complete it, when no node could take it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.errors import (
    NodeUnavailableError,
    QuorumNotMetError,
    ReplicaVerificationError,
    StorageError,
)
from skyferry.models import ReplicaRecord
from skyferry.storage import Store
from skyferry.topology import Node, Topology

__all__ = ["ReplicaWriter", "WriteOutcome", "verify_replica"]

logger = logging.getLogger("skyferry.distribute")

# Replica writes run on one pool per run, whose idle threads are reused across its chunks
# (a new pool per chunk started three threads per chunk: a fifth of the chunk tasks' time
# with 64 small chunks, by py-spy). Backend calls have deadlines and are cancelled when
# their node is marked down or the run ends (``Store.cancel``), so no thread outlives it.
WRITE_THREADS = 128
SLOT_POLL_S = 0.25  # how often a write waiting for a node's slot checks the node is not down
CLOSE_WAIT_S = 10.0  # how long close() waits for the writers' threads to finish


def verify_replica(store: Store, key: str, digest: str, size: int,
                   md5: str | None = None) -> str:
    """Check a written replica; return how: ``"checksum"`` or ``"read-back"``.

    A remote store that computed an MD5 on upload is checked against ``md5`` (no second
    transfer); anything else is read back, streamed, and compared by content hash.
    """
    if md5 is not None and not store.is_local:
        found_size, stored = store.stored_md5(key)
        if stored is not None:
            if found_size != size or stored != md5:
                raise ReplicaVerificationError(
                    f"replica {key!r} on node {store.name}: the store's checksum does not "
                    "match the content", node=store.name, key=key)
            return "checksum"
    found_digest, found = store.digest_of(key)
    if found != size or found_digest != digest:
        raise ReplicaVerificationError(
            f"replica {key!r} on node {store.name} does not match its content hash",
            node=store.name, key=key,
        )
    return "read-back"


@dataclass
class WriteOutcome:
    replicas: list[ReplicaRecord]
    node_failures: int
    cross_cloud: int
    errors: list[str] = field(default_factory=list)
    md5: str | None = None  # the bytes' MD5, when a store that checksums uploads got a replica
    at_risk: bool = False  # every verified replica in one cloud, though there are more


class ReplicaWriter:
    """Writes replicas for one run; shares node stores and health across chunks."""

    def __init__(self, topology: Topology, health: NodeHealth, placer: Placer,
                 source_cloud: str) -> None:
        self.topology = topology
        self.health = health
        self.placer = placer
        self.source_cloud = source_cloud
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()
        self._queued: dict[str, int] = {}  # per node: bytes of the writes in flight to it
        self._entered: dict[str, int] = {}  # per node: bytes ever handed to it in this run
        self._slots: dict[str, threading.Semaphore] = {}  # per node with max_writes
        self._pool = ThreadPoolExecutor(max_workers=WRITE_THREADS,
                                        thread_name_prefix="skyferry-replica")

    def close(self) -> None:
        """Cancel what is still in flight (a hung node's writes), and end the threads."""
        with self._lock:
            stores = list(self._stores.values())
        for store in stores:
            store.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for thread in list(getattr(self._pool, "_threads", ())):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("replica writer %s is still in a backend call", thread.name)

    def _enter(self, node: str, size: int) -> tuple[int, int]:
        """Queue a write of ``size`` bytes to ``node``; return its ticket for ``_deadline``."""
        with self._lock:
            self._queued[node] = self._queued.get(node, 0) + size
            self._entered[node] = self._entered.get(node, 0) + size
            return self._queued[node], self._entered[node]

    def _leave(self, node: str, size: int) -> None:
        with self._lock:
            self._queued[node] -= size

    def _deadline(self, node: Node, ticket: tuple[int, int]) -> float:
        """The node's timeout, plus the time to move the bytes sharing it at 4 MB/s.

        The writes in flight to one node share its bandwidth, so a deadline for one write
        alone would call a slow but healthy node hung. A write's allowance counts the bytes
        in flight to the node when it was queued (its own included) and every byte queued
        to the node after it: those share the node with it.
        """
        queued, entered = ticket
        with self._lock:
            later = self._entered.get(node.name, 0) - entered
        return node.timeout_s + (queued + later) / 4e6

    def store_of(self, node: Node) -> Store:
        with self._lock:
            if node.name not in self._stores:
                self._stores[node.name] = node.open_store()
            return self._stores[node.name]

    def recheck(self, names: list[str], timeout: float) -> list[str]:
        """Probe the nodes among ``names`` that are down; mark the ones that answer healthy.

        A retried write calls this first: a node that refused one write (a blip, a throttle)
        gets another chance instead of staying down for the rest of the run.
        """
        down = [self.topology.node(n) for n in names if not self.health.healthy(n)]
        down = [n for n in down if n.enabled]
        if not down:
            return []
        pool = ThreadPoolExecutor(max_workers=len(down))
        futures = {n.name: pool.submit(self.store_of(n).probe) for n in down}
        back = []
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
            except FutureTimeout:  # still hung: it stays marked, and its probe is stopped
                self.store_of(self.topology.node(name)).cancel()
                continue
            except Exception:  # still down: it stays marked
                continue
            self.health.mark(name, "healthy")
            back.append(name)
            logger.info("node %s answers again; it takes writes", name)
        pool.shutdown(wait=False)
        return back

    def _slot(self, node: Node) -> threading.Semaphore | None:
        """The node's write slots (``max_writes``), or None when it has no cap."""
        if node.max_writes is None:
            return None
        with self._lock:
            if node.name not in self._slots:
                self._slots[node.name] = threading.BoundedSemaphore(node.max_writes)
            return self._slots[node.name]

    def _wait_for_slot(self, node: Node, slot: threading.Semaphore, key: str) -> None:
        """Take one of the node's write slots; give up once the node is marked down.

        A write that hangs keeps its slot, so the writes behind it would wait for ever; the
        node is marked down when the hung write's allowance runs out, and they stop here.
        """
        while not slot.acquire(timeout=SLOT_POLL_S):
            if not self.health.healthy(node.name):
                raise NodeUnavailableError(
                    f"node {node.name} was marked down while writing {key!r} waited for one "
                    f"of its {node.max_writes} write slots", node=node.name, key=key)

    def _write_one(self, node: Node, key: str, data: bytes | memoryview, digest: str,
                   md5: str | None) -> None:
        try:
            slot = self._slot(node)
            if slot is not None:
                self._wait_for_slot(node, slot, key)
            try:
                store = self.store_of(node)
                store.put(key, data)
                verify_replica(store, key, digest, len(data), md5)
            finally:
                if slot is not None:
                    slot.release()
        finally:
            self._leave(node.name, len(data))

    def _outcome(self, node: Node, future: Future[None], ticket: tuple[int, int],
                 started: float, key: str) -> BaseException | None:
        """The write's error, or a ``NodeUnavailableError`` once its allowance runs out or
        the failure detector finds the node down (the write is abandoned at once)."""
        while True:
            if future.done():
                return future.exception()
            if self.health.state(node.name) == "down":
                why = self.health.reasons.get(node.name, "down")
                return NodeUnavailableError(
                    f"node {node.name} was found down while writing {key!r} ({why}); the "
                    "write is abandoned", node=node.name, key=key)
            deadline = self._deadline(node, ticket)
            left = started + deadline - time.monotonic()
            if left <= 0:
                return NodeUnavailableError(
                    f"node {node.name} did not finish writing {key!r} within "
                    f"{deadline:.1f}s: it is hung or too slow", node=node.name, key=key)
            try:
                return future.exception(timeout=min(left, SLOT_POLL_S))
            except FutureTimeout:
                continue  # the allowance may have grown, or the node been found down

    def write(self, chunk: int, key: str, data: bytes | memoryview, digest: str,
              planned: list[str], quorum: int, min_clouds: int = 1) -> WriteOutcome:
        """Write ``data`` to the planned nodes (or replacements) and verify every replica.

        ``quorum`` replicas must verify, spanning ``min_clouds`` clouds: while the replicas
        span fewer, one more is written on a healthy node of another cloud.
        """
        wanted = len(planned)
        nodes = [self.topology.node(n) for n in planned]
        failures = 0
        used: set[str] = set()
        targets: list[Node] = []
        for node in nodes:
            used.add(node.name)
            if self.health.healthy(node.name):
                targets.append(node)
            else:
                failures += 1
        verified: list[Node] = []
        errors: list[str] = []
        md5: str | None = None  # for stores that checksum uploads; computed once, if needed
        while True:
            current = verified + targets
            clouds = {n.cloud for n in current}
            missing = wanted - len(current)
            if missing > 0 or len(clouds) < min_clouds:
                usable = [n for n in self.topology.nodes if self.health.healthy(n.name)]
                spare = self.placer.rank(n for n in usable if n.name not in used)
                if len(clouds) < 2:
                    spare.sort(key=lambda n: n.cloud in clouds)  # stable: other clouds first
                if missing <= 0:  # enough replicas, too few clouds: one more, elsewhere
                    spare, missing = [n for n in spare if n.cloud not in clouds], 1
                for node in spare[:missing]:
                    used.add(node.name)
                    targets.append(node)
            if not targets:
                break
            if md5 is None and any(not self.store_of(n).is_local for n in targets):
                md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            pool = self._pool
            started = time.monotonic()
            tickets = {n.name: self._enter(n.name, len(data)) for n in targets}
            futures = {n.name: pool.submit(self._write_one, n, key, data, digest, md5)
                       for n in targets}
            failed = []
            for node in targets:
                exc = self._outcome(node, futures[node.name], tickets[node.name], started, key)
                if exc is None:
                    verified.append(node)
                    continue
                if not isinstance(exc, (StorageError, OSError)):
                    raise exc
                failures += 1
                failed.append(node)
                errors.append(str(exc))
                self.health.mark(node.name, "down", str(exc))
                if not futures[node.name].done():  # hung: its calls in flight are abandoned
                    self.store_of(node).cancel()
            targets = []  # a hung write keeps its thread; the run moves on
            if not failed:
                break
        replicas = [ReplicaRecord(node=n.name, cloud=n.cloud, state="verified") for n in verified]
        # A hint for every planned node that did not get its replica (hinted handoff): a
        # repair can move the replica back where placement wanted it once the node is up.
        hinted = [n for n in planned if n not in {v.name for v in verified}]
        for name in hinted:
            node = self.topology.node(name)
            replicas.append(ReplicaRecord(node=node.name, cloud=node.cloud, state="hinted"))
        spanned = sorted({n.cloud for n in verified})
        if len(verified) < quorum or len(spanned) < min_clouds:
            down = "; ".join(f"{n} ({self.health.reasons.get(n, 'down')})"
                             for n in self.health.down_nodes())
            raise QuorumNotMetError(
                f"chunk {chunk} reached {len(verified)} verified replicas in "
                f"{len(spanned)} cloud(s) ({', '.join(spanned) or 'none'}), of a quorum of "
                f"{quorum} spanning {min_clouds}; down: {down or 'none'}"
                + (f"; {'; '.join(errors)}" if errors else ""),
                chunk=chunk, verified=len(verified), quorum=quorum,
            )
        cross = sum(1 for n in verified if n.cloud != self.source_cloud)
        at_risk = len(spanned) < 2 <= len(self.topology.clouds)
        return WriteOutcome(replicas=replicas, node_failures=failures, cross_cloud=cross,
                            errors=errors, md5=md5, at_risk=at_risk)
