"""Snapshots: the set of committed batches a dataset shows at one moment.

Every commit (and, later, every rollback or quarantine) appends a snapshot to the dataset's
log. A snapshot is named by its sequence number and by an id derived from its content: the
dataset, its parent's id and the batches it holds, each with the digest of its chunks (what
every copy of its manifest must agree on, so a repair that moves replicas changes no
snapshot). A reader that opens a snapshot reads exactly its batches for its whole life.

The log, at the catalog and on every enabled node (no single point of loss, as manifests)::

    snapshots/<dataset>/<seq:012d>.json              # one snapshot: the batches it adds and drops
    snapshots/<dataset>/full/<seq:012d>.json         # every 100th: all its batches

Sequence numbers are given out by an exclusive create at the catalog: of two commits that
append at once, one gets the number and the other appends after it. A snapshot is rebuilt
from the last full list at or below it and the few entries after that.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import blake3
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyferry.commit.copies import CATALOG, Places
from skyferry.commit.manifest import Catalog, Manifest
from skyferry.commit.packs import read_packed
from skyferry.errors import (
    ManifestConflictError,
    ManifestError,
    SnapshotError,
    StorageError,
    TopologyError,
)
from skyferry.memory import many_objects
from skyferry.models import BatchLineage
from skyferry.storage import safe_key, temp_target

__all__ = ["BatchRef", "Committed", "Snapshot", "SnapshotLog", "Tag", "batch_digest",
           "committed", "lineage_of"]

logger = logging.getLogger("skyferry.store")

FULL_EVERY = 100  # a full list of batches every this many snapshots
_APPEND_TRIES = 20
_PAGE = 64  # entries read at once while looking for an id
_READERS = 8  # slices of a snapshot's manifests read at once
_TAG_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

Operation = Literal["commit", "rollback", "quarantine", "release", "genesis"]


def batch_digest(manifest: Manifest) -> str:
    """The digest of a batch's content: its chunks' keys, digests, sizes and rows (what every
    copy of its manifest agrees on; a repair's rewrite keeps it)."""
    chunks = manifest.chunks
    if manifest.freed:  # a chunk gc freed is still part of what the batch committed
        chunks = sorted([*chunks, *manifest.freed], key=lambda c: c.index)
    content = [manifest.dataset, manifest.batch_id,
               [[c.index, c.key, c.digest, c.size, c.rows_out] for c in chunks]]
    return blake3.blake3(json.dumps(content, separators=(",", ":")).encode()).hexdigest()[:32]


def lineage_of(manifest: Manifest) -> BatchLineage:
    """The batch's lineage: its sources' versions, chunk digests, schema, transforms by name
    and skyferry's version."""
    held = sorted([*manifest.chunks, *manifest.freed], key=lambda c: c.index)
    return BatchLineage(batch_id=manifest.batch_id, sources=manifest.lineage.sources,
                        chunk_digests=[c.digest for c in held], schema=manifest.lineage.schema_,
                        transforms=manifest.lineage.transforms, format=manifest.lineage.format,
                        code_version=manifest.lineage.code_version)


class BatchRef(BaseModel):
    """A committed batch as a snapshot holds it."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    digest: str
    created_at: str
    rows: int
    bytes: int

    @classmethod
    def of(cls, manifest: Manifest) -> BatchRef:
        return cls(batch_id=manifest.batch_id, digest=batch_digest(manifest),
                   created_at=manifest.created_at, rows=manifest.rows_stored,
                   bytes=manifest.bytes_stored)


class Snapshot(BaseModel):
    """One entry of the log: what it adds to and drops from its parent."""

    model_config = ConfigDict(frozen=True)

    version: int = 1
    dataset: str
    seq: int
    id: str
    parent: str | None
    created_at: str
    operation: Operation
    added: list[BatchRef] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list, description="batch ids")
    batches: int = Field(description="batches the snapshot holds")
    rows: int
    bytes: int
    quarantined: list[str] = Field(default_factory=list, description="batch ids hidden from "
                                   "this snapshot and every later one until released")
    note: str = ""
    lineage: list[BatchLineage] = Field(default_factory=list, description="where the batches "
                                        "this snapshot commits came from")


class Tag(BaseModel):
    """A name for a snapshot, given once."""

    model_config = ConfigDict(frozen=True)

    name: str
    dataset: str
    snapshot: str
    seq: int
    created_at: str


class _Full(BaseModel):
    """Every batch of one snapshot."""

    seq: int
    id: str
    batches: list[BatchRef]


def _snapshot_id(dataset: str, seq: int, parent: str | None, batches: Iterable[BatchRef]
                 ) -> str:
    content = [dataset, seq, parent, sorted([b.batch_id, b.digest] for b in batches)]
    return blake3.blake3(json.dumps(content, separators=(",", ":")).encode()).hexdigest()[:16]


class SnapshotLog:
    """A dataset's snapshots, kept at the catalog and on the catalog's nodes."""

    def __init__(self, catalog: Catalog, dataset: str, *, down: Collection[str] = ()) -> None:
        self.catalog, self.dataset = catalog, dataset
        self.down = set(down)  # nodes known to be down: no copy is waited for there
        self.places: Places = catalog.places
        self._prefix = safe_key("snapshots", dataset)

    def key(self, seq: int) -> str:
        return f"{self._prefix}/{seq:012d}.json"

    def full_key(self, seq: int) -> str:
        return f"{self._prefix}/full/{seq:012d}.json"

    # reading ---------------------------------------------------------------------------
    def sequence(self) -> list[int]:
        """Every snapshot's number, oldest first: the catalog's listing (the catalog gives
        the numbers out), unless it cannot be listed, lacks a number, or is behind the nodes
        (a node holds the number after its newest); then every place's."""
        try:
            seqs = sorted(self._numbers(self.catalog.store.names(self._prefix)))
        except StorageError as exc:
            logger.warning("the catalog cannot list %s's snapshots; asking the nodes: %s",
                           self.dataset, exc)
            return self._everywhere()
        if not seqs or len(seqs) != seqs[-1] + 1:  # numbers are given out from 0, in turn
            return self._everywhere()
        after = self.key(seqs[-1] + 1)
        nodes = [p for p in self.places.names if p != CATALOG and p not in self.down]
        found, _ = self.places.each(nodes, lambda store: store.exists(after))
        return self._everywhere() if any(found.values()) else seqs

    def _everywhere(self) -> list[int]:
        """Every snapshot's number that any place lists (a snapshot whose catalog copy is
        lost is still in the log)."""
        listed, failed = self.places.each(
            [p for p in self.places.names if p not in self.down],
            lambda store: store.names(self._prefix))
        if not listed:
            raise SnapshotError(f"no place that keeps {self.dataset}'s snapshots could be "
                                f"listed: " + "; ".join(f"{p}: {w}" for p, w in failed.items()),
                                dataset=self.dataset)
        for place, why in sorted(failed.items()):
            logger.warning("%s's snapshots cannot be listed at %s: %s", self.dataset, place, why)
        return sorted({n for keys in listed.values() for n in self._numbers(keys)})

    @staticmethod
    def _numbers(names: Iterable[str]) -> set[int]:
        """The sequence numbers among the names of the log's folder."""
        return {int(name[:-5]) for name in names
                if name.endswith(".json") and name[:-5].isdigit()}

    def entry(self, seq: int) -> Snapshot:
        return Snapshot.model_validate_json(self._read(self.key(seq)))

    def entries(self, seqs: Sequence[int]) -> list[Snapshot]:
        """The entries ``seqs``, read at once."""
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(seqs)))) as pool:
            return list(pool.map(self.entry, seqs))

    def _read(self, key: str) -> bytes:
        """``key`` from the catalog, else from the first node that has it."""
        why: dict[str, str] = {}
        for place in self.places.names:
            try:
                return self.places.store(place).get(key)
            except (StorageError, TopologyError) as exc:
                why[place] = str(exc)
        raise SnapshotError(f"snapshot {key} cannot be read in any place: "
                            + "; ".join(f"{p}: {w}" for p, w in why.items()),
                            dataset=self.dataset)

    def head(self) -> Snapshot | None:
        seqs = self.sequence()
        return self.entry(seqs[-1]) if seqs else None

    def batches(self, seq: int) -> list[BatchRef]:
        """Every batch snapshot ``seq`` holds, in the order they were added."""
        base = (seq // FULL_EVERY) * FULL_EVERY
        held: dict[str, BatchRef] = {}
        start = 0
        if base:
            try:
                full = _Full.model_validate_json(self._read(self.full_key(base)))
                held = {b.batch_id: b for b in full.batches}
                start = base + 1
            except (SnapshotError, ValidationError) as exc:
                logger.warning("the full list of %s's snapshot %d cannot be read (%s); "
                               "rebuilding it from the log", self.dataset, base, exc)
        for entry in self.entries(range(start, seq + 1)):
            for batch_id in entry.removed:
                held.pop(batch_id, None)
            for ref in entry.added:
                held[ref.batch_id] = ref
        return list(held.values())

    def resolve(self, ref: str | None = None, *, as_of: datetime | None = None
                ) -> Snapshot | None:
        """The snapshot ``ref`` names: its sequence number, a tag, its id (or the first 8 or
        more characters of it); with ``as_of``, the newest snapshot made at or before that
        time; with neither, the newest (None when the log is empty)."""
        seqs = self.sequence()
        if as_of is not None:
            return self._as_of(seqs, as_of)
        if ref is None:
            return self.entry(seqs[-1]) if seqs else None
        if ref.isdigit() and len(ref) < 8:
            if int(ref) in seqs:
                return self.entry(int(ref))
            raise SnapshotError(f"{self.dataset} has no snapshot {ref}", dataset=self.dataset)
        tag = self.tags().get(ref)
        if tag is not None:
            return self.entry(tag.seq)
        if len(ref) < 8:
            raise SnapshotError(f"{self.dataset} has no tag {ref!r} (a snapshot is named by "
                                "its number, a tag, or 8 or more characters of its id)",
                                dataset=self.dataset)
        newest_first = seqs[::-1]
        for at in range(0, len(newest_first), _PAGE):  # recent snapshots are found first
            for entry in self.entries(newest_first[at:at + _PAGE]):
                if entry.id.startswith(ref):
                    return entry
        raise SnapshotError(f"{self.dataset} has no snapshot {ref!r}", dataset=self.dataset)

    def _as_of(self, seqs: list[int], when: datetime) -> Snapshot:
        """The newest snapshot made at or before ``when`` (a binary search of the log)."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        low, high, found = 0, len(seqs) - 1, None
        while low <= high:
            mid = (low + high) // 2
            entry = self.entry(seqs[mid])
            if datetime.fromisoformat(entry.created_at) <= when:
                found, low = entry, mid + 1
            else:
                high = mid - 1
        if found is None:
            raise SnapshotError(f"{self.dataset} has no snapshot made at or before "
                                f"{when.isoformat()}", dataset=self.dataset)
        return found

    # tags ------------------------------------------------------------------------------
    def tag_key(self, name: str) -> str:
        return f"{self._prefix}/tags/{name}.json"

    def tags(self) -> dict[str, Tag]:
        """Every tag of the dataset, from every place that keeps one."""
        listed, _ = self.places.each(
            self.places.names, lambda store: store.names(f"{self._prefix}/tags"))
        names = {n[:-5] for found in listed.values() for n in found
                 if n.endswith(".json") and temp_target(n) is None}  # not a write under way
        return {name: Tag.model_validate_json(self._read(self.tag_key(name)))
                for name in sorted(names)}

    def tag(self, name: str, ref: str | None = None) -> Tag:
        """Name snapshot ``ref`` (default: the newest) ``name``; a name is given once."""
        if not _TAG_NAME.fullmatch(name) or name.isdigit():
            raise SnapshotError(f"tag name {name!r}: letters, digits, '.', '_' and '-', up to "
                                "64, not only digits", dataset=self.dataset)
        snapshot = self.resolve(ref)
        if snapshot is None:
            raise SnapshotError(f"{self.dataset} has no snapshot to tag", dataset=self.dataset)
        tag = Tag(name=name, dataset=self.dataset, snapshot=snapshot.id, seq=snapshot.seq,
                  created_at=datetime.now(timezone.utc).isoformat())
        body = tag.model_dump_json(indent=1).encode()
        if name in self.tags() or not self.catalog.store.create(self.tag_key(name), body):
            raise SnapshotError(f"{self.dataset} has a tag {name!r} already",
                                dataset=self.dataset)
        self._copy_to_nodes(self.tag_key(name), body, f"tag {name}")
        return tag

    # writing ---------------------------------------------------------------------------
    def adopt(self, manifests: Sequence[Manifest]) -> Snapshot | None:
        """Append the committed ``manifests`` that no snapshot ever held (a commit
        interrupted between its manifest and its snapshot); none on an empty log, which the
        next commit starts. A batch that a rollback or a quarantine took out stays out."""
        head = self.head()
        if head is None:
            return None
        held = {b.batch_id for b in self.batches(head.seq)}
        strays = [m for m in manifests if m.batch_id not in held]
        if strays:  # which of them the log ever held: the whole log is read, rarely
            ever = {ref.batch_id for entry in self.entries(self.sequence())
                    for ref in entry.added} | set(head.quarantined)
            strays = [m for m in strays if m.batch_id not in ever]
        if not strays:
            return None
        return self.append("commit", add=strays,
                           note="committed before its snapshot was written")

    def append(self, operation: Operation, *, add: Sequence[Manifest | BatchRef] = (),
               remove: Sequence[str] = (), quarantine: Sequence[str] = (),
               release: Sequence[str] = (), note: str = "",
               base: Callable[[], Sequence[Manifest]] | None = None) -> Snapshot | None:
        """A new snapshot: the newest one, with ``add`` (committed manifests, or batches as
        a snapshot holds them) added and the batch ids ``remove`` dropped; none when that
        changes nothing. Batches in ``quarantine`` are dropped and kept out of every later
        snapshot until they are in ``release``. An empty log starts from the manifests
        ``base()`` gives (those committed before the log existed)."""
        refs = [a if isinstance(a, BatchRef) else BatchRef.of(a) for a in add]
        origins = {a.batch_id: a for a in add if isinstance(a, Manifest)}
        for _ in range(_APPEND_TRIES):
            seqs = self.sequence()
            if seqs:
                parent = self.entry(seqs[-1])
                held = {b.batch_id: b for b in self.batches(parent.seq)}
                seq, parent_id = parent.seq + 1, parent.id
                hidden = (set(parent.quarantined) | set(quarantine)) - set(release)
            else:
                adding = {r.batch_id for r in refs}
                before = [m for m in (base() if base else ()) if m.batch_id not in adding]
                held = {m.batch_id: BatchRef.of(m) for m in before}
                seq, parent_id, hidden = 0, None, set(quarantine)
                if held and operation != "genesis":
                    genesis = self._entry(0, None, "genesis", held, list(held.values()), [],
                                          set(), "the batches committed before the log")
                    self._write(genesis.model_copy(
                        update={"lineage": [lineage_of(m) for m in before]}), held)
                    continue
            added = [r for r in refs
                     if r.batch_id not in hidden and held.get(r.batch_id) != r]
            removed = [b for b in {*remove, *hidden} if b in held]
            if not added and not removed and seqs and hidden == set(parent.quarantined):
                return None
            for batch_id in removed:
                held.pop(batch_id)
            for ref in added:
                held[ref.batch_id] = ref
            snapshot = self._entry(seq, parent_id, operation, held, added, sorted(removed),
                                   hidden, note)
            snapshot = snapshot.model_copy(update={"lineage": [
                lineage_of(origins[r.batch_id]) for r in added if r.batch_id in origins]})
            if self._write(snapshot, held):
                return snapshot
        raise SnapshotError(f"{self.dataset}: {_APPEND_TRIES} snapshots were appended by "
                            "others while this one tried; try again", dataset=self.dataset)

    def rollback(self, ref: str) -> Snapshot:
        """A new snapshot that holds what snapshot ``ref`` held (nothing is deleted; a
        quarantined batch stays hidden)."""
        target = self.resolve(ref)
        head = self.head()
        if target is None or head is None:
            raise SnapshotError(f"{self.dataset} has no snapshot {ref!r}", dataset=self.dataset)
        wanted = {b.batch_id: b for b in self.batches(target.seq)}
        held = {b.batch_id for b in self.batches(head.seq)}
        made = self.append("rollback", add=list(wanted.values()),
                           remove=sorted(held - set(wanted)),
                           note=f"to snapshot {target.seq} ({target.id})")
        return made or head

    def _entry(self, seq: int, parent: str | None, operation: Operation,
               held: dict[str, BatchRef], added: list[BatchRef], removed: list[str],
               quarantined: set[str], note: str) -> Snapshot:
        return Snapshot(
            dataset=self.dataset, seq=seq, id=_snapshot_id(self.dataset, seq, parent,
                                                           held.values()),
            parent=parent, created_at=datetime.now(timezone.utc).isoformat(),
            operation=operation, added=added, removed=removed, batches=len(held),
            rows=sum(b.rows for b in held.values()),
            bytes=sum(b.bytes for b in held.values()), quarantined=sorted(quarantined),
            note=note)

    def _copy_to_nodes(self, key: str, body: bytes, what: str) -> None:
        nodes = [p for p in self.places.names if p != CATALOG and p not in self.down]
        _, failed = self.places.write(key, body, nodes)
        failed.update({n: "down" for n in self.down if n in self.places.openers})
        for node, why in sorted(failed.items()):
            logger.warning("%s of %s: no copy on %s: %s", what, self.dataset, node, why)

    def _write(self, snapshot: Snapshot, held: dict[str, BatchRef]) -> bool:
        """Claim the snapshot's number at the catalog, then copy it to the nodes; False when
        another append took the number first."""
        body = snapshot.model_dump_json(indent=1).encode()
        full = None
        if snapshot.seq and snapshot.seq % FULL_EVERY == 0:
            full = _Full(seq=snapshot.seq, id=snapshot.id,
                         batches=list(held.values())).model_dump_json().encode()
            self.places.write(self.full_key(snapshot.seq), full, [CATALOG])
        if not self.catalog.store.create(self.key(snapshot.seq), body):
            return False
        self._copy_to_nodes(self.key(snapshot.seq), body, f"snapshot {snapshot.seq}")
        if full is not None:
            self._copy_to_nodes(self.full_key(snapshot.seq), full,
                                f"snapshot {snapshot.seq}'s full list")
        logger.info("snapshot %d of %s (%s): %d batches, %s", snapshot.seq, self.dataset,
                    snapshot.id, snapshot.batches, snapshot.operation)
        return True


@dataclass(frozen=True)
class Committed:
    """What a reader reads: a snapshot (None: a dataset committed before the log, read
    whole), its batches' manifests, oldest first, and ``unreadable``: the manifests of its
    batches that no place could give (the reader reads the rest, and reports them)."""

    snapshot: Snapshot | None
    manifests: list[Manifest]
    unreadable: list[ManifestError]


def _from_catalog(catalog: Catalog, dataset: str, wanted: Sequence[BatchRef]
                  ) -> list[Manifest] | None:
    """The manifests of ``wanted`` read from the catalog: from its manifest packs, and by key
    where a pack is missing (:mod:`skyferry.commit.packs`), each one's chunks checked against
    the snapshot's digest; None when any one is missing, unreadable or other than the
    snapshot holds (then every place is surveyed, which names what is wrong)."""
    def some(refs: Sequence[BatchRef]) -> list[Manifest] | None:
        found = []
        for ref in refs:
            key = catalog.manifest_key(dataset, ref.created_at[:10], ref.batch_id)
            try:
                manifest = Manifest.model_validate_json(catalog.store.get(key))
            except (StorageError, ValidationError):
                return None
            if batch_digest(manifest) != ref.digest:
                return None
            found.append(manifest)
        return found

    def one_by_one(refs: Sequence[BatchRef]) -> list[Manifest] | None:
        if catalog.store.is_local:  # parsing holds the interpreter: threads only slow it
            return some(refs)
        # a few slices at once, so that a remote catalog's reads overlap
        step = max(1, -(-len(refs) // _READERS))
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            slices = list(pool.map(some, [refs[i:i + step] for i in range(0, len(refs), step)]))
        if any(found is None for found in slices):
            return None
        return [m for found in slices for m in found or ()]

    return read_packed(catalog, dataset, wanted, one_by_one)


def committed(catalog: Catalog, dataset: str, snapshot: str | Snapshot | None = None
              ) -> Committed:
    """The manifests of ``snapshot`` (a :class:`Snapshot`, or its number, tag or id; None:
    the newest), each checked to hold what it held when the snapshot was taken.

    A batch of the snapshot whose copies disagree, whose manifest is gone, or whose manifest
    holds other chunks raises; one whose manifest no place can read is left out and named in
    ``unreadable``, as a read of the whole dataset names it."""
    log = SnapshotLog(catalog, dataset)
    chosen = snapshot if isinstance(snapshot, Snapshot) else log.resolve(snapshot)
    if chosen is not None:
        wanted = log.batches(chosen.seq)
        with many_objects():
            quick = _from_catalog(catalog, dataset, wanted)
        if quick is not None:
            return Committed(chosen, quick, [])
    manifests, unreadable = catalog.scan(dataset)
    if chosen is None:  # no log yet: every committed batch
        for problem in unreadable:
            if isinstance(problem, ManifestConflictError):
                raise problem
        if not manifests:
            if unreadable:
                raise unreadable[0]
            catalog.manifest(dataset)  # raises BatchNotFoundError
        return Committed(None, manifests, unreadable)
    wanted_by_id = {b.batch_id: b for b in wanted}
    found = {m.batch_id: m for m in manifests if m.batch_id in wanted_by_id}
    mine = [p for p in unreadable if any(f"/batch={b}.json" in p.key for b in wanted_by_id)]
    for problem in mine:
        if isinstance(problem, ManifestConflictError):
            raise problem
    for batch_id, ref in wanted_by_id.items():
        manifest = found.get(batch_id)
        if manifest is None:
            if any(f"/batch={batch_id}.json" in p.key for p in mine):
                continue
            raise SnapshotError(f"batch {batch_id} of snapshot {chosen.id} of {dataset} has no "
                                "committed manifest: the dataset was dropped, or the snapshot "
                                "expired and gc freed the batch", dataset=dataset)
        if batch_digest(manifest) != ref.digest:
            raise SnapshotError(f"batch {batch_id} of {dataset} holds other chunks than when "
                                f"snapshot {chosen.id} was taken", dataset=dataset)
    return Committed(chosen, [found[b] for b in wanted_by_id if b in found], mine)
