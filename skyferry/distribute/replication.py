"""Write a chunk's replicas concurrently, verify each, and reach the quorum.

A failed replica marks its node down for the run and moves to the next ranked node. Every
planned node that did not get its replica is recorded as a hint, so a later repair can put
the replica where placement wanted it (or complete it, when no node could take it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.errors import (
    NodeUnavailableError,
    QuorumNotMetError,
    ReplicaVerificationError,
    SourceChangedError,
    StorageError,
)
from skyferry.hashing import new_hasher
from skyferry.models import ReplicaRecord
from skyferry.storage import Store
from skyferry.topology import Node, Topology

__all__ = ["FanOut", "Produce", "ReplicaWriter", "WriteOutcome", "verify_replica"]

logger = logging.getLogger("skyferry.distribute")

# Replica writes run on one pool per run, whose idle threads are reused across its chunks
# (a new pool per chunk started three threads per chunk: a fifth of the chunk tasks' time
# with 64 small chunks, by py-spy). Backend calls have deadlines and are cancelled when
# their node is marked down or the run ends (``Store.cancel``), so no thread outlives it.
WRITE_THREADS = 128
SLOT_POLL_S = 0.25  # how often a write waiting for a node's slot checks the node is not down
CLOSE_WAIT_S = 10.0  # how long close() waits for the writers' threads to finish
QUEUE_BLOCKS = 2  # blocks queued to each replica's writer, ahead of the one it is writing
COALESCE = 1 << 20  # smaller pieces of a chunk's output are joined up to this size


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
    digest: str = ""  # the content hash of what was written
    size: int = 0


Produce = Callable[["FanOut"], None]
"""Writes a chunk's stored bytes, block by block, to a :class:`FanOut`. It can be called
again (to feed a replacement node) and must then write the same bytes."""


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

    def _enter(self, node: str, size: int) -> None:
        """Count ``size`` bytes queued to ``node`` (see :meth:`_allowance`)."""
        with self._lock:
            self._queued[node] = self._queued.get(node, 0) + size

    def _leave(self, node: str, size: int) -> None:
        with self._lock:
            self._queued[node] -= size

    def _allowance(self, node: Node) -> float:
        """How long one call of a replica's writer may go unanswered: the node's timeout,
        plus the time to move the bytes queued to the node (every chunk's) at 4 MB/s. The
        writes in flight to one node share its bandwidth, so an allowance for one write
        alone would call a slow but healthy node hung. Time the writer spends waiting for
        skyferry's own next block never counts (see :meth:`_Sink.owed`)."""
        with self._lock:
            queued = self._queued.get(node.name, 0)
        return node.timeout_s + queued / 4e6

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
        A suspect (slow) node is not down: its writes take their turn.
        """
        while not slot.acquire(timeout=SLOT_POLL_S):
            if self.health.state(node.name) == "down":
                raise NodeUnavailableError(
                    f"node {node.name} was marked down while writing {key!r} waited for one "
                    f"of its {node.max_writes} write slots", node=node.name, key=key)

    def write(self, chunk: int, key: str, produce: Produce, planned: list[str], quorum: int,
              min_clouds: int = 1, done: Sequence[str] = (),
              expect: tuple[str, int] | None = None) -> WriteOutcome:
        """Stream the chunk that ``produce`` emits to the planned nodes (or replacements), as
        it is produced, and verify every replica.

        ``quorum`` replicas must verify, spanning ``min_clouds`` clouds: while the replicas
        span fewer, one more is written on a healthy node of another cloud. A node that
        fails is replaced by the next ranked one, fed by running ``produce`` again (its
        bytes must hash the same). ``done`` names nodes that already hold a verified
        replica (an earlier attempt's), with ``expect`` its ``(digest, size)``: only the
        rest are written.
        """
        wanted = len(planned)
        failures = 0
        verified: list[Node] = [self.topology.node(n) for n in done]
        used: set[str] = set(done)
        targets: list[Node] = []
        for node in (self.topology.node(n) for n in planned if n not in used):
            if self.health.healthy(node.name):
                used.add(node.name)
                targets.append(node)
            elif self.health.state(node.name) == "down":
                used.add(node.name)
                failures += 1
            # a suspect node is no failure: it waits among the spares, after every healthy one
        errors: list[str] = []
        md5: str | None = None
        while True:
            current = verified + targets
            clouds = {n.cloud for n in current}
            missing = wanted - len(current)
            if missing > 0 or len(clouds) < min_clouds:
                spare = []
                for state in ("healthy", "suspect"):  # a slow replica rather than none
                    spare += self.placer.spares((n for n in self.topology.nodes if n.enabled
                                                 and n.name not in used
                                                 and self.health.state(n.name) == state),
                                                clouds)
                if missing <= 0:  # enough replicas, too few clouds: one more, elsewhere
                    spare, missing = [n for n in spare if n.cloud not in clouds], 1
                for node in spare[:missing]:
                    used.add(node.name)
                    targets.append(node)
            if not targets:
                break
            fan = FanOut(self, key, targets)
            try:
                produce(fan)
                fan.finish()
            except BaseException:
                fan.abandon()
                raise
            if expect is not None and (fan.digest, fan.size) != expect:
                raise SourceChangedError(
                    f"chunk {chunk} gave other bytes when it was produced again for "
                    f"{', '.join(n.name for n in targets)} ({fan.digest[:12]}, {fan.size} "
                    f"bytes, not {expect[0][:12]}, {expect[1]}): did its source change?",
                    url=key)
            expect = (fan.digest, fan.size)
            md5 = md5 or fan.md5
            failed = []
            for node in targets:
                exc = fan.outcome(node)
                if exc is None:
                    verified.append(node)
                    continue
                if not isinstance(exc, (StorageError, OSError)):
                    raise exc
                failures += 1
                failed.append(node)
                errors.append(str(exc))
                self.health.mark(node.name, "down", str(exc))
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
                done=tuple(n.name for n in verified), expect=expect,
            )
        cross = sum(1 for n in verified if n.cloud != self.source_cloud)
        at_risk = len(spanned) < 2 <= len(self.topology.clouds)
        assert expect is not None
        return WriteOutcome(replicas=replicas, node_failures=failures, cross_cloud=cross,
                            errors=errors, md5=md5, at_risk=at_risk, digest=expect[0],
                            size=expect[1])


class _Sink:
    """One replica's streamed write, on its own thread, fed through a queue of a few blocks.

    Memory: the blocks queued (shared by every sink of the chunk) plus one part in the
    backend's writer, whatever the chunk's size.
    """

    def __init__(self, writer: ReplicaWriter, node: Node, key: str,
                 slot: threading.Semaphore | None) -> None:
        self.writer, self.node, self.key, self.slot = writer, node, key, slot
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self.expect: tuple[str, int] = ("", 0)  # set before the end of the stream is sent
        # When the call the node owes an answer to began (opening the upload, writing a
        # block, the commit, the read-back), or None while the sink waits for skyferry's
        # next block: only that time counts against the node.
        self.owed_since: float | None = None
        self.abandoned: BaseException | None = None
        self.future: Future[None] = writer._pool.submit(self._run)

    def owed(self) -> float:
        """Seconds the node has owed an answer to the call in flight (0 when none is)."""
        since = self.owed_since
        return 0.0 if since is None else time.monotonic() - since

    def _answered(self) -> None:
        self.owed_since = None
        self.writer.health.answer(self.node.name)

    def _run(self) -> None:
        out = None
        try:
            self.owed_since = time.monotonic()
            store = self.writer.store_of(self.node)
            out = store.writer(self.key)
            self._answered()
            while (block := self.queue.get()) is not None:
                self.owed_since = time.monotonic()
                try:
                    if self.abandoned is not None:
                        raise self.abandoned
                    out.write(block)
                finally:
                    self.writer._leave(self.node.name, len(block))
                self._answered()
            if self.abandoned is not None:
                raise self.abandoned
            self.owed_since = time.monotonic()
            out.commit()
            digest, size = self.expect
            if out.size != size:
                raise ReplicaVerificationError(
                    f"replica {self.key!r} on node {self.node.name} has {out.size} bytes, "
                    f"not {size}", node=self.node.name, key=self.key)
            matched = out.checksum_matches()
            if matched is False:
                raise ReplicaVerificationError(
                    f"replica {self.key!r} on node {self.node.name}: the store's checksum does "
                    "not match the content", node=self.node.name, key=self.key)
            if matched is None:  # the store keeps no checksum of it: read it back
                verify_replica(store, self.key, digest, size)
            self._answered()
        except BaseException:
            if out is not None:
                out.abort()
            raise
        finally:
            if self.slot is not None:
                self.slot.release()
            self._drain()

    def _drain(self) -> None:
        """Let go of the blocks still queued (a failed sink takes no more)."""
        while True:
            try:
                block = self.queue.get_nowait()
            except queue.Empty:
                return
            if block is not None:
                self.writer._leave(self.node.name, len(block))


class FanOut:
    """The chunk's output stream: every block goes to the content hash and to each replica's
    sink. A sink that fails, or stops taking blocks for longer than its node's allowance,
    or whose node the failure detector finds down, is dropped; the others go on."""

    def __init__(self, writer: ReplicaWriter, key: str, targets: list[Node]) -> None:
        self.writer, self.key = writer, key
        self.size = 0
        self.digest = ""
        self._hasher = new_hasher()
        remote = any(not writer.store_of(n).is_local for n in targets)
        self._md5 = hashlib.md5(usedforsecurity=False) if remote else None
        self.md5: str | None = None
        self._held: list[bytes] = []  # small pieces not yet passed on
        self._held_size = 0
        self._errors: dict[str, BaseException] = {}
        # A node's write slots (max_writes) are taken here, in one order for every chunk,
        # before any byte moves: a chunk streams to all its replicas in step, so two chunks
        # that each held one node's slot and waited for the other's would wait for ever.
        slots: dict[str, threading.Semaphore] = {}
        for node in sorted(targets, key=lambda n: n.name):
            slot = writer._slot(node)
            if slot is None:
                continue
            try:
                writer._wait_for_slot(node, slot, key)
            except NodeUnavailableError as exc:
                self._errors[node.name] = exc
                continue
            slots[node.name] = slot
        self.sinks = {n.name: _Sink(writer, n, key, slots.get(n.name)) for n in targets
                      if n.name not in self._errors}

    def write(self, block: bytes | memoryview) -> None:
        """Hash ``block`` and pass it on; pieces smaller than :data:`COALESCE` bytes (small
        source files, a Parquet writer's pages) are joined first, so a replica's writer is
        woken once per MB, not once per piece."""
        if not len(block):
            return
        data = bytes(block)  # the caller may reuse its buffer; the sinks keep this one
        self._hasher.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.size += len(data)
        if not self._held and len(data) >= COALESCE:
            self._send(data)
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= COALESCE:
            self._send_held()

    def _send_held(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held, self._held_size = [], 0
            self._send(data)

    def _send(self, data: bytes) -> None:
        for sink in self._live():
            self._put(sink, data)

    def _live(self) -> list[_Sink]:
        return [s for s in self.sinks.values() if s.node.name not in self._errors]

    def _settle(self) -> None:
        """Let go of what ended sinks left queued (the node's queued bytes)."""
        for sink in self.sinks.values():
            if sink.future.done():
                sink._drain()

    def _drop(self, sink: _Sink, exc: BaseException, *, hung: bool = False) -> None:
        """Stop feeding ``sink``. A ``hung`` node is marked down with ``exc`` as its cause
        first, then every call in flight to it is cancelled: the other chunks' writers to it
        end too, and their errors then find the node down for this cause."""
        self._errors[sink.node.name] = exc
        sink.abandoned = exc
        with contextlib.suppress(queue.Full):
            sink.queue.put_nowait(None)
        if sink.future.done():
            return
        if hung:
            self.writer.health.mark(sink.node.name, "down", str(exc))
        if hung or self.writer.health.state(sink.node.name) == "down":
            self.writer.store_of(sink.node).cancel()  # its calls in flight are abandoned

    def _put(self, sink: _Sink, item: bytes | None) -> None:
        node, writer = sink.node, self.writer
        if item is not None:
            writer._enter(node.name, len(item))
        while True:
            if sink.future.done():
                exc = sink.future.exception() or NodeUnavailableError(
                    f"node {node.name} stopped taking {self.key!r}", node=node.name, key=self.key)
                if item is not None:
                    writer._leave(node.name, len(item))
                self._drop(sink, exc)
                return
            if writer.health.state(node.name) == "down":
                why = writer.health.reasons.get(node.name, "down")
                exc = NodeUnavailableError(
                    f"node {node.name} was found down while writing {self.key!r} ({why}); the "
                    "write is abandoned", node=node.name, key=self.key)
                if item is not None:
                    writer._leave(node.name, len(item))
                self._drop(sink, exc)
                return
            allowance = writer._allowance(node)
            if sink.owed() > allowance:
                exc = NodeUnavailableError(
                    f"node {node.name} did not answer a call writing {self.key!r} within "
                    f"{allowance:.1f}s: it is hung or too slow", node=node.name, key=self.key)
                if item is not None:
                    writer._leave(node.name, len(item))
                self._drop(sink, exc, hung=True)
                return
            try:
                sink.queue.put(item, timeout=SLOT_POLL_S)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """End the stream: each sink commits its replica and verifies it."""
        self._send_held()
        self.digest = self._hasher.hexdigest()
        self.md5 = self._md5.hexdigest() if self._md5 is not None else None
        for sink in self._live():
            sink.expect = (self.digest, self.size)
            self._put(sink, None)
        for sink in self._live():
            self._await(sink)
        self._settle()

    def _await(self, sink: _Sink) -> None:
        """Wait for a sink's commit and verification, as long as its node is alive and the
        call it is in has lasted less than its allowance (the node's timeout plus its bytes
        in flight at 4 MB/s, plus the chunk's, which a read-back moves again)."""
        node, writer = sink.node, self.writer
        while True:
            try:
                exc = sink.future.exception(timeout=SLOT_POLL_S)
            except FutureTimeout:
                if writer.health.state(node.name) == "down":
                    why = writer.health.reasons.get(node.name, "down")
                    self._drop(sink, NodeUnavailableError(
                        f"node {node.name} was found down while writing {self.key!r} ({why}); "
                        "the write is abandoned", node=node.name, key=self.key))
                    return
                allowance = writer._allowance(node) + self.size / 4e6
                if sink.owed() > allowance:
                    self._drop(sink, NodeUnavailableError(
                        f"node {node.name} did not finish writing {self.key!r} within "
                        f"{allowance:.1f}s: it is hung or too slow", node=node.name,
                        key=self.key), hung=True)
                    return
                continue
            if exc is not None:
                self._errors[node.name] = exc
            return

    def abandon(self) -> None:
        """The producer failed: drop every sink; nothing becomes visible."""
        for sink in self._live():
            self._drop(sink, NodeUnavailableError(
                f"the write of {self.key!r} was abandoned: producing the chunk failed",
                node=sink.node.name, key=self.key))
        self._settle()

    def outcome(self, node: Node) -> BaseException | None:
        """The node's error, or None when its replica verified."""
        return self._errors.get(node.name)
