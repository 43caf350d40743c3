"""The catalog: batch plans, the pending journal, and the manifest that commits a batch.

The catalog layout (all keys relative to the catalog store)::

    manifests/<dataset>/date=<YYYY-MM-DD>/batch=<id>.json   # committed: the commit point
    pending/<dataset>/batch=<id>/plan.json                  # a batch in progress
    pending/<dataset>/batch=<id>/chunk-<n>.json             # a chunk whose replicas verified
    rejects/<dataset>/batch=<id>/chunk-<n>.jsonl            # rejected rows with reasons
    suspects/<dataset>/batch=<id>/chunk-<n>-<node>.json     # a replica a reader found bad
    snapshots/<dataset>/<seq>.json                          # the log (skyferry.commit.snapshots)
    packs/<dataset>/generation                              # manifest packs (skyferry.commit.packs)
    packs/<dataset>/<generation>-<group>.json

Data objects on nodes live at ``<dataset>/date=<date>/batch=<id>/chunk-<n>.<ext>``, and
each node that holds a batch's data keeps a copy of its manifest at the catalog's key
(:mod:`skyferry.commit.copies`). A reader trusts only what a committed manifest lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyferry.commit.copies import CATALOG, Places, Survey
from skyferry.commit.names import SealedNames
from skyferry.errors import (
    BatchNotFoundError,
    ManifestConflictError,
    ManifestError,
    ManifestQuorumError,
    ObjectNotFoundError,
    StorageError,
)
from skyferry.hashing import HASH_ALGORITHM
from skyferry.models import ChunkPlan, SourceFile, StoredChunk
from skyferry.storage import Store, safe_key
from skyferry.topology import Node, Topology

__all__ = ["BatchPlan", "Catalog", "Lineage", "Manifest", "chunk_key", "open_catalog"]

logger = logging.getLogger("skyferry.store")

MANIFEST_VERSION = 1


def chunk_key(dataset: str, date: str, batch_id: str, index: int, fmt: str) -> str:
    ext = "bin" if fmt == "binary" else "parquet"
    return safe_key(dataset, f"date={date}", f"batch={batch_id}", f"chunk-{index:05d}.{ext}")


class Lineage(BaseModel):
    model_config = ConfigDict(frozen=True)

    sources: list[SourceFile]
    code_version: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    transforms: list[str]
    format: str
    chunk_size: int


class BatchPlan(BaseModel):
    """Everything decided before any byte moves; journaled so a re-run resumes it."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    dataset: str
    batch_id: str
    partition_date: str
    created_at: str
    replicas: int
    quorum: int
    min_clouds: int = 1
    source_cloud: str
    lineage: Lineage
    chunks: list[ChunkPlan]

    def key(self, chunk: ChunkPlan) -> str:
        return chunk_key(self.dataset, self.partition_date, self.batch_id, chunk.index,
                         chunk.format)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    version: int = MANIFEST_VERSION
    revision: int = Field(default=0, description="Raised by each rewrite (a repair): of two "
                          "copies, the higher revision is the newer")
    hash_algorithm: str = HASH_ALGORITHM
    dataset: str
    batch_id: str
    partition_date: str
    created_at: str
    replication_factor: int
    write_quorum: int
    min_clouds: int = Field(default=1, description="Clouds a chunk's verified replicas, "
                            "and the manifest's node copies, span")
    chunks: list[StoredChunk]
    lineage: Lineage
    rows_in: int
    rows_stored: int
    rows_rejected: int
    rows_added: int = 0
    rows_dropped: int = 0
    bytes_stored: int
    freed: list[StoredChunk] = Field(
        default_factory=list, description="Chunks gc freed: every snapshot kept holds a newer "
        "version of their sources. A snapshot that reads one has expired")
    sealed_names: SealedNames | None = Field(
        default=None, description="An encrypted dataset's: its sources are named by "
        "pseudonyms, and these are the real names, encrypted (skyferry/commit/names.py)")
    chunks_at_risk: list[int] = Field(
        default_factory=list, description="Chunks whose verified replicas are all in one "
        "cloud although the topology has more (a run with min_clouds 1): losing that cloud "
        "loses them")

    @classmethod
    def from_plan(cls, plan: BatchPlan, chunks: list[StoredChunk]) -> Manifest:
        ordered = sorted(chunks, key=lambda c: c.index)
        return cls(
            dataset=plan.dataset,
            batch_id=plan.batch_id,
            partition_date=plan.partition_date,
            created_at=plan.created_at,
            replication_factor=plan.replicas,
            write_quorum=plan.quorum,
            min_clouds=plan.min_clouds,
            chunks=ordered,
            lineage=plan.lineage,
            rows_in=sum(c.rows_in for c in ordered),
            rows_stored=sum(c.rows_out for c in ordered),
            rows_rejected=sum(c.rows_rejected for c in ordered),
            rows_added=sum(c.rows_added for c in ordered),
            rows_dropped=sum(c.rows_dropped for c in ordered),
            bytes_stored=sum(c.size for c in ordered),
            chunks_at_risk=[c.index for c in ordered if c.at_risk],
        )

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1, by_alias=True).encode()

    def holders(self) -> dict[str, str]:
        """Node -> cloud of every node holding a verified replica of one of its chunks."""
        return {r.node: r.cloud for c in self.chunks for r in c.verified}


def _parse_copy(body: bytes) -> tuple[int, object] | None:
    """A manifest copy's revision, and what every copy of it must agree on: the batch and
    its chunks (those gc freed too) with their keys, digests and sizes. None when it is not
    a valid manifest."""
    try:
        manifest = Manifest.model_validate_json(body)
    except ValidationError:
        return None
    held = sorted([*manifest.chunks, *manifest.freed], key=lambda c: c.index)
    chunks = tuple((c.index, c.key, c.digest, c.size, c.rows_out) for c in held)
    return manifest.revision, (manifest.dataset, manifest.batch_id, chunks)


def open_catalog(topology: Topology) -> Catalog:
    """The topology's catalog, with its enabled nodes as the places manifests are copied to."""
    return Catalog(topology.catalog_store(), [n for n in topology.nodes if n.enabled])


class Catalog:
    """Manifests, the pending journal and rejects, on the catalog store; copies of each
    manifest on the ``nodes`` that hold its batch (none: the catalog alone)."""

    def __init__(self, store: Store, nodes: Sequence[Node] = ()) -> None:
        self.store = store
        self.places = Places(store, {n.name: n.open_store for n in nodes})

    # committed manifests -------------------------------------------------------------
    def manifest_key(self, dataset: str, date: str, batch_id: str) -> str:
        return safe_key("manifests", dataset, f"date={date}", f"batch={batch_id}.json")

    def key_of(self, manifest: Manifest) -> str:
        return self.manifest_key(manifest.dataset, manifest.partition_date, manifest.batch_id)

    def copy_places(self, manifest: Manifest) -> list[str]:
        """Where the manifest's copies belong: the catalog, and the holders this catalog
        copies to."""
        return [CATALOG, *sorted(n for n in manifest.holders() if n in self.places.openers)]

    def commit(self, manifest: Manifest, *, previous: Manifest | None = None,
               down: Collection[str] = ()) -> str:
        """Commit the manifest: W of its node copies (the batch's write quorum), then the
        catalog's copy.

        From the catalog's copy on, the batch is visible. Too few node copies, or node
        copies in too few clouds, is a :class:`ManifestQuorumError` naming the nodes that
        failed, and no copy is left. ``previous``, the manifest this one rewrites: its copies
        on nodes that no longer hold the batch are removed. ``down``: nodes the run knows
        are down; their copies count as failed without a write that would wait for them.
        """
        if previous is not None:
            with self.rewriting(manifest.dataset):
                return self._commit(manifest, previous, down)
        return self._commit(manifest, None, down)

    def _commit(self, manifest: Manifest, previous: Manifest | None,
                down: Collection[str]) -> str:
        key = self.key_of(manifest)
        body = manifest.to_json()
        holders = {n: c for n, c in manifest.holders().items() if n in self.places.openers}
        written, failed = self.places.write(key, body, (n for n in holders if n not in down))
        failed.update({n: "down in this run" for n in holders if n in down})
        need = min(manifest.write_quorum, len(holders))  # as a chunk's replicas: W copies
        clouds = min(manifest.min_clouds, len(set(holders.values())))
        if len(written) < need or len({holders[n] for n in written}) < clouds:
            self.places.remove(key, written)
            raise ManifestQuorumError(
                f"manifest {key}: {len(written)} of {len(holders)} node copies written "
                f"({need} needed, in {clouds} clouds); failed: "
                + "; ".join(f"{n}: {why}" for n, why in sorted(failed.items())),
                key=key, written=written, failed=failed)
        try:
            self.store.put(key, body)
        except Exception:
            self.places.remove(key, written)
            raise
        if previous is not None:
            retired = set(previous.holders()) - set(holders)
            self.places.remove(key, (n for n in retired if n in self.places.openers))
        for node, why in sorted(failed.items()):
            logger.warning("manifest %s: no copy on %s (repair restores it): %s", key, node,
                           why)
        logger.info("committed %s (%d chunks; copies on %s)", key, len(manifest.chunks),
                    ", ".join([CATALOG, *written]))
        return key

    def restore(self, key: str, body: bytes, places: list[str]) -> dict[str, str]:
        """Write a manifest's copy where it is missing or differs; why each place failed."""
        with self.rewriting(key.split("/")[1]):
            return self.places.write(key, body, places)[1]

    def survey(self, dataset: str) -> Survey:
        """Every place's listing of the dataset's manifests (see :mod:`skyferry.commit.copies`)."""
        return self.places.survey(safe_key("manifests", dataset), _parse_copy)

    def scan(self, dataset: str) -> tuple[list[Manifest], list[ManifestError]]:
        """Every committed manifest of ``dataset``, oldest first, and those that cannot be read.

        The catalog's manifests and those only the nodes keep, so a lost catalog loses none.
        One damaged manifest does not hide the others: it is returned as a
        :class:`ManifestError` that names its key, and callers decide what it means for them;
        copies that disagree on a batch's chunks are a :class:`ManifestConflictError`.
        """
        survey = self.survey(dataset)
        found = [Manifest.model_validate_json(e.body) for e in survey.entries.values()
                 if not e.conflicts]
        unreadable = [ManifestError(f"manifest {key} is unreadable in every place that keeps "
                                    f"it: {why[:300]}", key=key)
                      for key, why in survey.unreadable.items()]
        for key, entry in survey.entries.items():
            if entry.conflicts:
                batch = Manifest.model_validate_json(entry.body).batch_id
                places = sorted([entry.source, *entry.conflicts])
                unreadable.append(ManifestConflictError(
                    f"the copies of batch {batch}'s manifest {key} disagree: "
                    + "; ".join(f"{p}: {why}" for p, why in sorted(entry.conflicts.items()))
                    + "; nothing of the batch is read or removed until an operator restores "
                    "the right copy to every place (skyferry verify names them)",
                    key=key, batch_id=batch, places=places))
        for error in unreadable:
            logger.warning("%s", error)
        return sorted(found, key=lambda m: (m.created_at, m.batch_id)), unreadable

    def manifests(self, dataset: str) -> list[Manifest]:
        """Every readable committed manifest of ``dataset``, oldest first (see :meth:`scan`)."""
        return self.scan(dataset)[0]

    def manifest(self, dataset: str, batch_id: str | None = None) -> Manifest:
        manifests, unreadable = self.scan(dataset)
        if batch_id is not None:
            manifests = [m for m in manifests if m.batch_id == batch_id]
            for error in unreadable:
                if error.key.endswith(f"/batch={batch_id}.json"):
                    raise error
        if not manifests:
            what = f"dataset {dataset!r}"
            if batch_id:
                what = f"batch {batch_id} of {what}"
            raise BatchNotFoundError(f"no committed manifest for {what} in {self.store.url}",
                                     dataset=dataset, batch_id=batch_id)
        return manifests[-1]

    def datasets(self) -> list[str]:
        """Every dataset with a manifest in any place that can be listed."""
        listed, _ = self.places.each(self.places.names,
                                     lambda store: [o.key for o in store.list("manifests")])
        return sorted({parts[1] for keys in listed.values() for key in keys
                       if len(parts := key.split("/")) > 2})

    def retract(self, manifest: Manifest) -> None:
        """Delete every copy of a manifest, the catalog's last: the batch stops being
        visible. A node copy that cannot be deleted keeps the catalog's, and raises."""
        key = self.key_of(manifest)
        with self.rewriting(manifest.dataset):
            stayed = self.places.remove(key, self.copy_places(manifest)[1:])
            if stayed:
                raise ManifestQuorumError(
                    f"manifest {key} stays: its copies on {', '.join(sorted(stayed))} could "
                    "not be deleted", key=key, written=sorted(stayed), failed=stayed)
            self.store.delete(key)

    # manifest packs (skyferry.commit.packs) -----------------------------------------------
    def pack_generation(self, dataset: str) -> str | None:
        """The dataset's pack generation: packs made under another one are stale. None
        when there is none yet (or it cannot be read)."""
        try:
            token = self.store.get(safe_key("packs", dataset, "generation")).decode()
        except (StorageError, UnicodeDecodeError):
            return None
        return token if len(token) == 32 and token.isalnum() else None

    def new_pack_generation(self, dataset: str) -> str:
        """Start a new pack generation: every pack made before it is stale. Returns it."""
        token = uuid.uuid4().hex
        self.store.put(safe_key("packs", dataset, "generation"), token.encode())
        return token

    @contextlib.contextmanager
    def rewriting(self, dataset: str) -> Iterator[None]:
        """Around a change to a committed manifest (a rewrite, a restore, a retraction): a
        new pack generation before and after it, so that no pack made while it ran is
        read afterwards; then the stale packs are deleted."""
        self.new_pack_generation(dataset)
        try:
            yield
        finally:  # a failed change may have changed some copies
            kept = self.new_pack_generation(dataset)
        prefix = safe_key("packs", dataset)
        with contextlib.suppress(StorageError):
            for name in self.store.names(prefix):
                if name.endswith(".json") and not name.startswith((kept, ".tmp-")):
                    self.store.delete(f"{prefix}/{name}")

    # the pending journal ------------------------------------------------------------------
    def _pending(self, dataset: str, batch_id: str, name: str) -> str:
        return safe_key("pending", dataset, f"batch={batch_id}", name)

    def save_plan(self, plan: BatchPlan) -> None:
        self.store.put(self._pending(plan.dataset, plan.batch_id, "plan.json"),
                       plan.model_dump_json(by_alias=True).encode())

    def load_plan(self, dataset: str, batch_id: str) -> BatchPlan | None:
        try:
            raw = self.store.get(self._pending(dataset, batch_id, "plan.json"))
        except ObjectNotFoundError:
            return None
        return BatchPlan.model_validate_json(raw)

    def record_chunk(self, plan: BatchPlan, chunk: StoredChunk) -> int:
        """Journal a stored chunk; the bytes written."""
        body = chunk.model_dump_json().encode()
        self.store.put(self._pending(plan.dataset, plan.batch_id, f"chunk-{chunk.index:05d}.json"),
                       body)
        return len(body)

    def done_chunks(self, dataset: str, batch_id: str) -> dict[int, StoredChunk]:
        done = {}
        prefix = safe_key("pending", dataset, f"batch={batch_id}")
        for info in self.store.list(prefix):
            if info.key.rsplit("/", 1)[-1].startswith("chunk-"):
                chunk = StoredChunk.model_validate_json(self.store.get(info.key))
                done[chunk.index] = chunk
        return done

    def journaled(self, dataset: str, batch_id: str, index: int) -> StoredChunk | None:
        """Chunk ``index``'s journal entry, if it was stored."""
        try:
            raw = self.store.get(self._pending(dataset, batch_id, f"chunk-{index:05d}.json"))
        except ObjectNotFoundError:
            return None
        return StoredChunk.model_validate_json(raw)

    def done_indices(self, dataset: str, batch_id: str) -> set[int]:
        """Indices of journaled chunks, from the listing alone (cheap enough to poll)."""
        prefix = safe_key("pending", dataset, f"batch={batch_id}")
        names = (info.key.rsplit("/", 1)[-1] for info in self.store.list(prefix))
        return {int(n[6:11]) for n in names if n.startswith("chunk-") and n.endswith(".json")}

    def save_note(self, dataset: str, batch_id: str, name: str, body: bytes) -> None:
        """Keep ``body`` beside the batch's journal (``note-<name>.json``): dropped with it."""
        self.store.put(self._pending(dataset, batch_id, f"note-{name}.json"), body)

    def notes(self, dataset: str, batch_id: str) -> list[bytes]:
        """Every note kept beside the batch's journal."""
        prefix = safe_key("pending", dataset, f"batch={batch_id}")
        return [self.store.get(info.key) for info in self.store.list(prefix)
                if info.key.rsplit("/", 1)[-1].startswith("note-")]

    def drop_pending(self, dataset: str, batch_id: str) -> None:
        for info in list(self.store.list(safe_key("pending", dataset, f"batch={batch_id}"))):
            self.store.delete(info.key)

    def pending_plans(self) -> list[tuple[BatchPlan, float | None]]:
        plans = []
        for info in self.store.list("pending"):
            if info.key.endswith("/plan.json"):
                plans.append((BatchPlan.model_validate_json(self.store.get(info.key)), info.mtime))
        return plans

    # suspects: replicas a reader found bad, for the next verify to look at first -------
    def _suspect(self, dataset: str, batch_id: str, chunk: int, node: str) -> str:
        return safe_key("suspects", dataset, f"batch={batch_id}", f"chunk-{chunk:05d}-{node}.json")

    def note_suspect(self, dataset: str, batch_id: str, chunk: int, node: str, why: str) -> None:
        """Remember that a reader found this replica bad (a failover)."""
        self.store.put(self._suspect(dataset, batch_id, chunk, node),
                       json.dumps({"node": node, "why": why}).encode())

    def suspects(self, dataset: str) -> set[tuple[str, int, str]]:
        """``(batch_id, chunk, node)`` of every replica a reader found bad."""
        found = set()
        for info in self.store.list(safe_key("suspects", dataset)):
            _, _, batch, name = info.key.split("/", 3)
            chunk, _, node = name[len("chunk-"):-len(".json")].partition("-")
            found.add((batch[len("batch="):], int(chunk), node))
        return found

    def clear_suspect(self, dataset: str, batch_id: str, chunk: int, node: str) -> None:
        self.store.delete(self._suspect(dataset, batch_id, chunk, node))

    # rejects ------------------------------------------------------------------------------
    def rejects_key(self, dataset: str, batch_id: str, index: int) -> str:
        return safe_key("rejects", dataset, f"batch={batch_id}", f"chunk-{index:05d}.jsonl")

    def save_rejects(self, key: str, rejects: list[dict[str, Any]]) -> None:
        body = "".join(json.dumps(r, default=str) + "\n" for r in rejects)
        self.store.put(key, body.encode())

    def load_rejects(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.store.get(key).decode().splitlines() if line]
