"""The catalog: batch plans, the pending journal, and the manifest that commits a batch.

The catalog layout (all keys relative to the catalog store)::

    manifests/<dataset>/date=<YYYY-MM-DD>/batch=<id>.json   # committed: the commit point
    pending/<dataset>/batch=<id>/plan.json                  # a batch in progress
    pending/<dataset>/batch=<id>/chunk-<n>.json             # a chunk whose replicas verified
    rejects/<dataset>/batch=<id>/chunk-<n>.jsonl            # rejected rows with reasons
    suspects/<dataset>/batch=<id>/chunk-<n>-<node>.json     # a replica a reader found bad

Data objects on nodes live at ``<dataset>/date=<date>/batch=<id>/chunk-<n>.<ext>``.
A reader trusts only what a committed manifest lists.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyferry.config import describe_validation_error
from skyferry.errors import BatchNotFoundError, ManifestError, ObjectNotFoundError
from skyferry.hashing import HASH_ALGORITHM
from skyferry.models import ChunkPlan, SourceFile, StoredChunk
from skyferry.storage import Store, safe_key

__all__ = ["BatchPlan", "Catalog", "Lineage", "Manifest", "chunk_key"]

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
    hash_algorithm: str = HASH_ALGORITHM
    dataset: str
    batch_id: str
    partition_date: str
    created_at: str
    replication_factor: int
    write_quorum: int
    chunks: list[StoredChunk]
    lineage: Lineage
    rows_in: int
    rows_stored: int
    rows_rejected: int
    rows_added: int = 0
    rows_dropped: int = 0
    bytes_stored: int
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


class Catalog:
    """Manifests, the pending journal and rejects, on the catalog store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # committed manifests -------------------------------------------------------------
    def manifest_key(self, dataset: str, date: str, batch_id: str) -> str:
        return safe_key("manifests", dataset, f"date={date}", f"batch={batch_id}.json")

    def commit(self, manifest: Manifest) -> str:
        """Write the manifest atomically: from here on the batch is visible."""
        key = self.manifest_key(manifest.dataset, manifest.partition_date, manifest.batch_id)
        self.store.put(key, manifest.to_json())
        logger.info("committed %s (%d chunks)", key, len(manifest.chunks))
        return key

    def scan(self, dataset: str) -> tuple[list[Manifest], list[ManifestError]]:
        """Every committed manifest of ``dataset``, oldest first, and those that cannot be read.

        One damaged manifest does not hide the others: it is returned as a
        :class:`ManifestError` that names its key, and callers decide what it means for them.
        """
        found, unreadable = [], []
        for info in self.store.list(safe_key("manifests", dataset)):
            if info.key.endswith(".json") and "/batch=" in info.key:
                try:
                    found.append(Manifest.model_validate_json(self.store.get(info.key)))
                except ValidationError as exc:
                    unreadable.append(ManifestError(
                        f"manifest {info.key} in {self.store.url} is unreadable: "
                        f"{describe_validation_error(exc)[:300]}", key=info.key))
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
        names = set()
        for info in self.store.list("manifests"):
            parts = info.key.split("/")
            if len(parts) > 2:
                names.add(parts[1])
        return sorted(names)

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

    def record_chunk(self, plan: BatchPlan, chunk: StoredChunk) -> None:
        self.store.put(self._pending(plan.dataset, plan.batch_id, f"chunk-{chunk.index:05d}.json"),
                       chunk.model_dump_json().encode())

    def done_chunks(self, dataset: str, batch_id: str) -> dict[int, StoredChunk]:
        done = {}
        prefix = safe_key("pending", dataset, f"batch={batch_id}")
        for info in self.store.list(prefix):
            if info.key.rsplit("/", 1)[-1].startswith("chunk-"):
                chunk = StoredChunk.model_validate_json(self.store.get(info.key))
                done[chunk.index] = chunk
        return done

    def done_indices(self, dataset: str, batch_id: str) -> set[int]:
        """Indices of journaled chunks, from the listing alone (cheap enough to poll)."""
        prefix = safe_key("pending", dataset, f"batch={batch_id}")
        names = (info.key.rsplit("/", 1)[-1] for info in self.store.list(prefix))
        return {int(n[6:11]) for n in names if n.startswith("chunk-") and n.endswith(".json")}

    def save_share_report(self, dataset: str, batch_id: str, name: str, body: bytes) -> None:
        self.store.put(self._pending(dataset, batch_id, f"share-{name}.json"), body)

    def share_reports(self, dataset: str, batch_id: str) -> list[bytes]:
        prefix = safe_key("pending", dataset, f"batch={batch_id}")
        return [self.store.get(info.key) for info in self.store.list(prefix)
                if info.key.rsplit("/", 1)[-1].startswith("share-")]

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
