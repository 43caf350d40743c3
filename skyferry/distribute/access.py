"""The one way to a committed chunk's replicas: export, repair, verify and the training
reader all read them here.

- :func:`node_store`: one :class:`~skyferry.storage.Store` per node in a process, opened
  once (a run's :class:`~skyferry.distribute.replication.ReplicaWriter` keeps its own, so
  that ending the run can cancel its calls without touching anyone else's).
- :meth:`Replicas.read`: a chunk streamed from its best replica in ranged reads of
  :data:`BLOCK` bytes, hashed as it goes, into an output the caller opens for each attempt.
  The output is committed only once the whole chunk matched its content hash; a replica
  that is missing, unreadable, cut short or corrupt, even halfway through, is noted once
  in the catalog (the next verify reads it first), its output is discarded, and the next
  replica is read. Memory: one block, whatever the chunk's size.
- :meth:`Replicas.produce`: the same stream as a
  :data:`~skyferry.distribute.replication.Produce` for new replicas (a repair): it raises
  before the write can commit when the bytes do not match, so no new replica holds them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from skyferry.commit.manifest import Catalog, Manifest
from skyferry.crypto import (
    HEADER_SIZE,
    SEGMENT,
    TAG,
    DataKey,
    Decryptor,
    Keyring,
    chunk_context,
    keys_spec,
    load_keyring,
)
from skyferry.errors import (
    DecryptionError,
    IntegrityError,
    KeyUnavailableError,
    ObjectNotFoundError,
    ReplicaVerificationError,
    StorageError,
    TopologyError,
)
from skyferry.hashing import content_hash, new_hasher
from skyferry.models import SealedChunk, StoredChunk
from skyferry.storage import Store
from skyferry.topology import Node, Topology

__all__ = ["BLOCK", "MARKER_KEY", "ChunkOutput", "FileOutput", "ReplicaRef", "Replicas",
           "SourceReplicaError", "mark_nodes", "node_identity", "node_store"]

logger = logging.getLogger("skyferry.distribute.access")

BLOCK = 8 << 20  # bytes per ranged read of a replica

_STORES: dict[tuple[str, bool], Store] = {}
_STORES_LOCK = threading.Lock()


def node_store(node: Node) -> Store:
    """The node's store, opened once in this process (per node definition)."""
    key = (node.model_dump_json(), node.durable_writes)
    with _STORES_LOCK:
        store = _STORES.get(key)
    if store is None:
        store = node.open_store()
        with _STORES_LOCK:
            store = _STORES.setdefault(key, store)
    return store


@dataclass(frozen=True)
class ReplicaRef:
    """A committed chunk as replica access needs it: where it is and what it must hash to."""

    dataset: str
    batch_id: str
    index: int
    key: str
    digest: str
    size: int
    nodes: tuple[str, ...]  # its verified replicas, in the order to try
    sealed: SealedChunk | None = field(default=None, kw_only=True)  # encrypted: how to open

    @classmethod
    def of(cls, manifest: Manifest, chunk: StoredChunk) -> ReplicaRef:
        return cls(manifest.dataset, manifest.batch_id, chunk.index, chunk.key, chunk.digest,
                   chunk.size, tuple(r.node for r in chunk.verified), sealed=chunk.sealed)

    @property
    def plain(self) -> tuple[str, int]:
        """What the chunk's readable bytes hash to, and their size (the stored bytes', unless
        they are encrypted)."""
        if self.sealed is None:
            return self.digest, self.size
        return self.sealed.plain_digest, self.sealed.plain_size

    @property
    def where(self) -> str:
        return f"chunk {self.index} of {self.dataset}/batch={self.batch_id}"


class ChunkOutput(Protocol):
    """Where one attempt at reading a chunk goes. Nothing it holds may be visible as the
    chunk until :meth:`commit`."""

    def write(self, offset: int, block: bytes) -> None: ...

    def discard(self) -> None: ...

    def commit(self) -> None: ...


class Replicas:
    """Verified reads of a topology's replicas, with failover (see the module's docstring).
    ``on_bytes(node, n)`` is told of every block read; ``failovers`` lists each chunk that
    was read from another replica than the first, and why."""

    def __init__(self, topology: Topology, catalog: Catalog | None = None, *,
                 on_bytes: Callable[[str, int], None] | None = None,
                 keys: str | None = None) -> None:
        self.topology, self.catalog, self.on_bytes = topology, catalog, on_bytes
        self.failovers: list[str] = []
        self._noted: set[tuple[str, str, int, str]] = set()
        self._lock = threading.Lock()
        self._keys = keys
        self._keyring: Keyring | None = None

    def keyring(self, ref: ReplicaRef | None = None) -> Keyring:
        """The master keys that open ``ref`` (loaded once): ``keys``, else
        ``SKYFERRY_KEYS``, else the topology's ``encryption.master_keys``."""
        with self._lock:
            if self._keyring is None:
                spec = keys_spec(self._keys, self.topology.encryption)
                if not spec:
                    wrapped = (", ".join(sorted(ref.sealed.wrapped))
                               if ref is not None and ref.sealed else "unknown")
                    what = ref.where if ref is not None else "the dataset"
                    raise KeyUnavailableError(
                        f"{what} is encrypted (master key {wrapped}) and no keys are "
                        "given: pass --keys, set SKYFERRY_KEYS or the topology's "
                        "encryption.master_keys", key_id=wrapped)
                self._keyring = load_keyring(spec)
            return self._keyring

    def data_key(self, ref: ReplicaRef) -> DataKey:
        """The data key of an encrypted chunk, unwrapped; a typed error naming the master
        key it needs when none of this process's opens it."""
        assert ref.sealed is not None
        return self.keyring(ref).unwrap(bytes.fromhex(ref.sealed.key_id), ref.sealed.wrapped)

    def store(self, node: str) -> Store:
        return node_store(self.topology.node(node))

    def blocks(self, node: str, ref: ReplicaRef) -> Iterator[bytes]:
        """The replica's bytes on ``node`` in ranged reads, unverified; a replica of another
        size than the chunk's is a :class:`ReplicaVerificationError` before any byte."""
        store = self.store(node)
        size = store.size(ref.key)
        if size != ref.size:
            raise ReplicaVerificationError(
                f"the replica of {ref.where} on {node} has {size} bytes, not {ref.size} "
                "(corrupt or cut short)",
                node=node, key=ref.key)
        for offset in range(0, size, BLOCK):
            data = store.get(ref.key, offset, min(offset + BLOCK, size))
            if len(data) != min(BLOCK, size - offset):
                raise ReplicaVerificationError(
                    f"the replica of {ref.where} on {node} ended at {offset + len(data)} of "
                    f"{size} bytes", node=node, key=ref.key)
            if self.on_bytes is not None:
                self.on_bytes(node, len(data))
            yield data

    def verified_blocks(self, node: str, ref: ReplicaRef) -> Iterator[bytes]:
        """:meth:`blocks`, hashed: after the last block, bytes that do not match the chunk's
        content hash raise :class:`ReplicaVerificationError` (so a caller commits nothing
        it was given until the iteration ends cleanly)."""
        hasher = new_hasher()
        for block in self.blocks(node, ref):
            hasher.update(block)
            yield block
        if hasher.hexdigest() != ref.digest:
            raise ReplicaVerificationError(
                f"the replica of {ref.where} on {node} does not match its content hash "
                "(corrupt)", node=node, key=ref.key)

    def read(self, ref: ReplicaRef, output: Callable[[], ChunkOutput],
             order: Sequence[str] | None = None) -> str:
        """Stream the chunk into a new ``output()`` per replica tried, ``order`` (default:
        the chunk's own) first to last, and commit the first whose bytes hash right;
        return the node read."""
        problems: list[str] = []
        key = self.data_key(ref) if ref.sealed is not None else None  # before any byte
        for node in order if order is not None else ref.nodes:
            out = output() if key is None else _Opening(output(), key, ref)
            try:
                offset = 0
                for block in self.verified_blocks(node, ref):
                    out.write(offset, block)
                    offset += len(block)
            except (StorageError, TopologyError, DecryptionError) as exc:
                out.discard()
                problems.append(f"{node}: {exc}")
                self.suspect(ref, node, str(exc))
                continue
            except BaseException:
                out.discard()
                raise
            out.commit()
            if problems:
                line = f"{ref.where}: {'; '.join(problems)} -> read {node}"
                with self._lock:
                    self.failovers.append(line)
                logger.warning("%s failed over to %s (%s)", ref.where, node, "; ".join(problems))
            return node
        raise IntegrityError(
            f"no healthy replica of {ref.where}: {'; '.join(problems) or 'no verified replicas'}",
            dataset=ref.dataset, batch_id=ref.batch_id, chunk=ref.index)

    def produce(self, ref: ReplicaRef, node: str) -> Callable[[WriteTarget], None]:
        """Write the replica on ``node`` into ``fan`` (a new replica's stream), checking its
        hash before the stream ends: bytes that do not match raise, and the write commits
        nothing (see :class:`~skyferry.distribute.replication.ReplicaWriter`)."""
        def produce(fan: WriteTarget) -> None:
            try:
                for block in self.verified_blocks(node, ref):
                    fan.write(block)
            except (StorageError, TopologyError) as exc:
                self.suspect(ref, node, str(exc))
                raise SourceReplicaError(str(exc), node=node, key=ref.key) from exc
        return produce

    def suspect(self, ref: ReplicaRef, node: str, why: str) -> None:
        """Note a bad replica in the catalog (once), so that the next verify reads it."""
        noted = (ref.dataset, ref.batch_id, ref.index, node)
        with self._lock:
            if noted in self._noted:
                return
            self._noted.add(noted)
        logger.warning("the replica of %s on %s is bad: %s", ref.where, node, why)
        if self.catalog is None:
            return
        try:
            self.catalog.note_suspect(ref.dataset, ref.batch_id, ref.index, node, why)
        except StorageError as exc:
            logger.warning("could not note the bad replica of %s on %s: %s", ref.where, node,
                           exc)


class _Opening:
    """An encrypted chunk's bytes in, its plaintext out to ``inner``. Each segment is
    checked as it arrives (a changed, moved or cut segment raises at once), the plaintext
    is hashed, and ``inner`` commits only when all of it matches the manifest."""

    def __init__(self, inner: ChunkOutput, key: DataKey, ref: ReplicaRef) -> None:
        assert ref.sealed is not None
        self.inner, self.key, self.ref, self.sealed = inner, key, ref, ref.sealed
        self._pending = bytearray()
        self._decryptor: Decryptor | None = None
        self._segment = 0
        self._at = 0
        self._hasher = new_hasher()

    def _emit(self, data: bytes) -> None:
        assert self._decryptor is not None
        step = SEGMENT + TAG
        plain = self._decryptor.open(self._segment, data)
        self._segment += -(-len(data) // step)
        self._hasher.update(plain)
        self.inner.write(self._at, plain)
        self._at += len(plain)

    def write(self, offset: int, block: bytes) -> None:
        self._pending += block
        if self._decryptor is None:
            if len(self._pending) < HEADER_SIZE:
                return
            self._decryptor = Decryptor(self.key, chunk_context(self.ref.key, self.ref.batch_id),
                                        bytes(self._pending[:HEADER_SIZE]),
                                        self.sealed.plain_size)
            del self._pending[:HEADER_SIZE]
        whole = len(self._pending) // (SEGMENT + TAG) * (SEGMENT + TAG)
        if whole:
            data = bytes(self._pending[:whole])
            del self._pending[:whole]
            self._emit(data)

    def discard(self) -> None:
        self.inner.discard()

    def commit(self) -> None:
        try:
            if self._decryptor is None:
                raise DecryptionError(f"{self.ref.where} is shorter than an encrypted header")
            if self._pending:
                self._emit(bytes(self._pending))
                self._pending.clear()
            if (self._segment != self._decryptor.segments or self._at != self.sealed.plain_size
                    or self._hasher.hexdigest() != self.sealed.plain_digest):
                raise DecryptionError(f"{self.ref.where} opened to other bytes than the "
                                      "manifest's plaintext hash")
        except BaseException:
            self.inner.discard()
            raise
        self.inner.commit()


class WriteTarget(Protocol):
    def write(self, block: bytes | memoryview) -> None: ...


class SourceReplicaError(StorageError):
    """The replica a new one was being copied from failed (not the node being written)."""


class FileOutput:
    """A chunk read into a local file: written to ``temp``, renamed to ``path`` on commit."""

    def __init__(self, path: Path, temp: Path | None = None) -> None:
        self.path = path
        self.temp = temp or path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        self._fh: BinaryIO | None = open(self.temp, "wb")  # noqa: SIM115 (closed on commit)

    def write(self, offset: int, block: bytes) -> None:
        assert self._fh is not None
        self._fh.write(block)

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.temp.unlink(missing_ok=True)

    def commit(self) -> None:
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        os.replace(self.temp, self.path)


# A node's identity, kept by the node itself (as HDFS keeps a storage ID in its VERSION
# file): an empty listing on a node that has it means its replicas are gone; without it (a
# wrong bucket, prefix or mount), that the node is not the one the manifests mean.
MARKER_KEY = "_skyferry/node.json"
Identity = Literal["ours", "absent", "other"]


def catalog_id(catalog: Catalog) -> str:
    """A short id of the catalog a topology commits to (its location's hash)."""
    return content_hash(catalog.store.url.encode())[:16]


def mark_node(store: Store, node: Node, catalog: Catalog) -> bool:
    """Give the node its identity marker unless it has one; whether it was written."""
    body = {"format": 1, "node": node.name, "id": uuid.uuid4().hex,
            "catalog": catalog_id(catalog)}
    return store.create(MARKER_KEY, json.dumps(body).encode())


def mark_nodes(topology: Topology, healthy: Callable[[str], bool], catalog: Catalog) -> None:
    """Mark every enabled node that ``healthy`` names, at once; a node that cannot be marked
    now is marked by a later run (logged, not raised)."""
    def mark(node: Node) -> None:
        try:
            if mark_node(node_store(node), node, catalog):
                logger.info("node %s got its identity marker (%s)", node.name, MARKER_KEY)
        except (StorageError, TopologyError) as exc:
            logger.warning("node %s: could not write its identity marker: %s", node.name, exc)

    nodes = [n for n in topology.nodes if n.enabled and healthy(n.name)]
    if nodes:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            list(pool.map(mark, nodes))


def node_identity(store: Store, node: Node, catalog: Catalog) -> tuple[Identity, str]:
    """Whether the node's root holds its own marker (``ours``), none (``absent``), or
    another's (``other``), and in words."""
    try:
        body = json.loads(store.get(MARKER_KEY))
    except ObjectNotFoundError:
        return "absent", f"no skyferry node marker at its root ({MARKER_KEY})"
    except ValueError:
        return "other", f"its node marker ({MARKER_KEY}) is unreadable"
    if not isinstance(body, dict) or body.get("node") != node.name:
        found = body.get("node") if isinstance(body, dict) else None
        return "other", f"its node marker names node {found!r}, not {node.name!r}"
    if body.get("catalog") != catalog_id(catalog):
        return "other", "its node marker is of another catalog's topology"
    return "ours", ""
