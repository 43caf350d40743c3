"""Verify a committed dataset where its replicas are: each one present, the right size, the
right bytes; and what lies under the dataset that no manifest claims.

Two levels, as a scrub has:

- **default**: each node is listed once; a replica must be there with the chunk's size, and,
  on a store that checksums uploads (S3, GCS, Azure), with the MD5 the manifest recorded
  (one metadata request, no data read);
- **deep**: every byte of every replica is read and checked against the chunk's content hash,
  at a bounded rate.

A node that cannot be listed is reported as unreachable: its replicas are not judged, so an
outage never reads as thousands of missing replicas. A node whose listing is empty while the
manifests place replicas on it is judged by its identity marker
(:func:`~skyferry.distribute.access.node_identity`): with its own marker it is the node the
manifests mean, and the replicas are missing; without it (a wrong bucket, prefix or mount)
it is unreachable, and the report says which.

Each manifest's copies are checked the same way: one in the catalog, and one on each node
holding the batch; listed with the right size, and (deep) the same bytes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

from skyferry.commit.copies import CATALOG, Survey
from skyferry.commit.manifest import Catalog, Manifest, open_catalog
from skyferry.commit.snapshots import committed
from skyferry.distribute.access import node_identity, node_store
from skyferry.errors import ObjectNotFoundError, StorageError, TopologyError
from skyferry.models import StoredChunk
from skyferry.ops.tables import delta_log_prefix
from skyferry.storage import ObjectInfo, Store, temp_target
from skyferry.topology import Node, Topology

__all__ = ["EXIT_CODES", "CopyCheck", "ReplicaCheck", "Verdict", "VerifyReport",
           "verify_dataset"]

logger = logging.getLogger("skyferry.ops.verify")

ReplicaStatus = Literal["ok", "missing", "differs", "unreadable"]
DAMAGED = ("missing", "differs", "unreadable")
# What a verify (or a repair) concluded; the command's exit code, and whether the flow fails
Verdict = Literal["healthy", "damaged", "unchecked"]
EXIT_CODES: dict[str, int] = {"healthy": 0, "damaged": 1, "unchecked": 3}


@dataclass(frozen=True)
class ReplicaCheck:
    """One listed replica of one chunk, and what verifying it found."""

    batch_id: str
    chunk: int
    key: str
    node: str
    status: ReplicaStatus
    detail: str = ""


@dataclass(frozen=True)
class CopyCheck:
    """One copy of one manifest, in the catalog or on a node, and what verifying it found."""

    batch_id: str
    key: str
    place: str
    status: ReplicaStatus
    detail: str = ""


@dataclass
class VerifyReport:
    dataset: str
    level: Literal["default", "deep"]
    replicas: list[ReplicaCheck] = field(default_factory=list)
    copies: list[CopyCheck] = field(default_factory=list)  # of the manifests
    orphans: list[str] = field(default_factory=list)  # "node:key"
    unreachable: dict[str, str] = field(default_factory=dict)  # node -> why
    emptied: list[str] = field(default_factory=list)  # empty, with their own marker: all missing
    not_checked: int = 0  # replicas on unreachable nodes
    hints: int = 0  # replicas placement wanted on a node that did not get them
    snapshot: str | None = None  # only the batches of this snapshot were checked
    bytes_read: int = 0
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        found: Counter[str] = Counter(c.status for c in self.replicas)
        return {s: found[s] for s in ("ok", *DAMAGED)}

    def copy_counts(self) -> dict[str, int]:
        found: Counter[str] = Counter(c.status for c in self.copies)
        return {s: found[s] for s in ("ok", *DAMAGED)}

    @property
    def damaged(self) -> list[ReplicaCheck]:
        return [c for c in self.replicas if c.status in DAMAGED]

    @property
    def damaged_copies(self) -> list[CopyCheck]:
        return [c for c in self.copies if c.status in DAMAGED]

    @property
    def healthy(self) -> bool:
        """Every replica and every manifest copy that could be checked is ``ok``."""
        return not (self.damaged or self.damaged_copies)

    @property
    def verdict(self) -> Verdict:
        """``damaged`` when a replica or a manifest copy is; else ``unchecked`` when
        replicas sit on a node that could not be read, or the catalog could not be; else
        ``healthy``. The CLI exits with :data:`EXIT_CODES` of it; the flow fails unless it
        is ``healthy``."""
        if not self.healthy:
            return "damaged"
        if self.not_checked or CATALOG in self.unreachable:
            return "unchecked"
        return "healthy"

    def summary(self) -> str:
        """One line that says why the verdict is not ``healthy`` (empty when it is)."""
        if self.verdict == "damaged":
            return (f"{self.dataset}: {len(self.damaged)} damaged replicas "
                    + ", ".join(f"{n} {s}" for s, n in self.counts().items() if s != "ok" and n)
                    + f"; {len(self.damaged_copies)} damaged manifest copies")
        if self.verdict == "unchecked":
            return (f"{self.dataset}: {self.not_checked} replicas on unreachable places were "
                    "not checked: " + "; ".join(f"{n}: {why}"
                                                 for n, why in self.unreachable.items()))
        return ""

    def by_node(self) -> list[dict[str, object]]:
        """One row per place (a node, or the catalog): its replicas by status, its orphans, its
        manifest copies, and whether it answered."""
        rows = []
        nodes = sorted({c.node for c in self.replicas} | set(self.unreachable)
                       | {o.split(":", 1)[0] for o in self.orphans}
                       | {c.place for c in self.copies})
        for node in nodes:
            mine: Counter[str] = Counter(c.status for c in self.replicas if c.node == node)
            copies: Counter[str] = Counter(c.status for c in self.copies if c.place == node)
            rows.append({"node": node, **{s: mine[s] for s in ("ok", *DAMAGED)},
                         "orphans": sum(1 for o in self.orphans if o.startswith(node + ":")),
                         "manifests_ok": copies["ok"],
                         "manifests_damaged": sum(copies[s] for s in DAMAGED),
                         "unreachable": self.unreachable.get(node, "")})
        return rows

    def to_json(self) -> str:
        body = asdict(self)
        body.update(counts=self.counts(), copy_counts=self.copy_counts(),
                    healthy=self.healthy, verdict=self.verdict)
        return json.dumps(body, indent=1)


class _Throttle:
    """At most ``mb_s`` MB per second over the whole verify, shared by its threads."""

    def __init__(self, mb_s: float | None) -> None:
        self.rate = mb_s * 1e6 if mb_s else None
        self.started = time.monotonic()
        self.taken = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        if self.rate is None:
            return
        with self.lock:
            self.taken += nbytes
            due = self.started + self.taken / self.rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # pacing reads, so a verify can run beside ingestion


def _claimed(catalog: Catalog, dataset: str, manifests: list[Manifest]) -> set[str]:
    """Every key a manifest of ``dataset`` or a pending batch of it claims."""
    keys = {chunk.key for manifest in manifests for chunk in manifest.chunks}
    for plan, _ in catalog.pending_plans():
        if plan.dataset == dataset:
            keys.update(plan.key(c) for c in plan.chunks)
    return keys


def _batch_prefix(manifest_key: str) -> str:
    """Where a batch's objects are, from its manifest's key:
    ``manifests/<dataset>/date=<d>/batch=<id>.json`` -> ``<dataset>/date=<d>/batch=<id>/``."""
    _, dataset, date, batch = manifest_key[:-len(".json")].split("/", 3)
    return f"{dataset}/{date}/{batch}/"


def _list_node(topology: Topology, name: str, dataset: str
               ) -> tuple[Store | None, dict[str, ObjectInfo], str]:
    """The node's store and its objects under ``dataset``, or why it cannot be read."""
    node = topology.node(name)
    if not node.enabled:
        return None, {}, "disabled in the topology"
    try:
        store = node_store(node)
        return store, {o.key: o for o in store.list(dataset)}, ""
    except (StorageError, TopologyError) as exc:
        return None, {}, f"cannot be listed: {exc}"


def _empty_node(store: Store, node: Node, catalog: Catalog, dataset: str, wanted: int) -> str:
    """Why a node whose listing of ``dataset`` is empty, although the manifests place
    ``wanted`` replicas there, is not judged; or "" when its own identity marker is there:
    it is the node the manifests mean, and the replicas are missing."""
    empty = f"its listing of {dataset}/ is empty, but the manifests place {wanted} replicas there"
    try:
        identity, detail = node_identity(store, node, catalog)
    except (StorageError, TopologyError) as exc:
        return f"{empty}, and its identity marker cannot be read: {exc}"
    if identity == "ours":
        logger.warning("node %s answers and holds its own identity marker, but none of the %d "
                       "replicas of %s placed there: they are missing", node.name, wanted,
                       dataset)
        return ""
    return f"{empty}, and {detail}: is it pointed at the wrong bucket, prefix or folder?"


def _check(store: Store, listing: dict[str, ObjectInfo], manifest: Manifest,
           chunk: StoredChunk, node: str, deep: bool, throttle: _Throttle,
           read: list[int]) -> ReplicaCheck:
    """One replica: listed with its size; then its store's checksum, or (``deep``) its
    bytes."""
    def found(status: ReplicaStatus, detail: str = "") -> ReplicaCheck:
        return ReplicaCheck(manifest.batch_id, chunk.index, chunk.key, node, status, detail)

    info = listing.get(chunk.key)
    if info is None:
        return found("missing", "not on the node")
    if info.size != chunk.size:
        return found("differs", f"{info.size} bytes, {chunk.size} expected")
    try:
        if deep:
            throttle.take(chunk.size)
            digest, size = store.digest_of(chunk.key)
            read.append(size)
            if (digest, size) != (chunk.digest, chunk.size):
                return found("differs", "content hash does not match")
        elif chunk.md5 is not None and not store.is_local:
            size, md5 = store.stored_md5(chunk.key)
            if md5 is not None and md5 != chunk.md5:
                return found("differs", "the store's checksum does not match")
    except ObjectNotFoundError:
        return found("missing", "vanished while verifying")
    except StorageError as exc:
        return found("unreadable", str(exc))
    return found("ok")


def _check_copies(catalog: Catalog, survey: Survey, manifest: Manifest, deep: bool
                  ) -> list[CopyCheck]:
    """The manifest's copies: in the catalog, and on each node holding its batch."""
    key = catalog.key_of(manifest)
    entry = survey.entries[key]
    checks = []
    places = catalog.copy_places(manifest)
    for place in [*places, *sorted(set(entry.conflicts) - set(places))]:
        def found(status: ReplicaStatus, detail: str = "", place: str = place) -> CopyCheck:
            return CopyCheck(manifest.batch_id, key, place, status, detail)

        if place in survey.unreachable:
            continue
        if place not in entry.places:
            checks.append(found("missing", "no copy"))
        elif place in entry.conflicts:
            checks.append(found("differs", f"conflict: {entry.conflicts[place]}"))
        elif place in entry.invalid:
            checks.append(found("differs", "not a valid manifest"))
        elif entry.places[place] != len(entry.body):
            checks.append(found("differs", f"{entry.places[place]} bytes, "
                                f"{len(entry.body)} expected"))
        elif place == entry.source:
            checks.append(found("ok"))
        elif place == CATALOG:  # listed, but a node's copy had to be read instead
            checks.append(found("differs", "not a valid manifest"))
        elif deep:
            try:
                same = catalog.places.store(place).get(key) == entry.body
            except (StorageError, TopologyError) as exc:
                checks.append(found("unreadable", str(exc)))
                continue
            checks.append(found("ok") if same else found("differs", "other bytes"))
        else:
            checks.append(found("ok"))
    return checks


def snapshot_batches(catalog: Catalog, dataset: str, snapshot: str) -> set[str]:
    """The batch ids snapshot ``snapshot`` holds, once every one of them is checked to hold
    what it held when the snapshot was taken (see :func:`committed`)."""
    return {m.batch_id for m in committed(catalog, dataset, snapshot).manifests}


def verify_dataset(topology: Topology, dataset: str, *, batch_id: str | None = None,
                   deep: bool = False, concurrency: int = 4,
                   max_mb_s: float | None = None,
                   lost: Collection[str] = (), snapshot: str | None = None) -> VerifyReport:
    """Check every replica the committed manifests of ``dataset`` list (one batch with
    ``batch_id``; the batches of one snapshot with ``snapshot``, its number, tag or id,
    each checked to hold what it held then); see the module's docstring for the two
    levels. ``lost``: nodes the
    operator knows lost their data (a disk replaced, a server that keeps nothing across a
    restart): an empty listing of theirs is the truth, and their replicas are missing."""
    started = time.perf_counter()
    names = {n.name for n in topology.nodes}
    unknown = sorted(set(lost) - names)
    if unknown:
        raise TopologyError(f"--lost names {', '.join(unknown)}, which the topology does not "
                            f"have; its nodes are {', '.join(sorted(names))}", source="lost")
    catalog = open_catalog(topology)
    survey = catalog.survey(dataset)
    every = sorted((Manifest.model_validate_json(e.body) for e in survey.entries.values()),
                   key=lambda m: (m.created_at, m.batch_id))
    manifests = [m for m in every if m.batch_id == batch_id] if batch_id else every
    if snapshot is not None:
        held = snapshot_batches(catalog, dataset, snapshot)
        manifests = [m for m in manifests if m.batch_id in held]
    if not manifests and snapshot is None:
        catalog.manifest(dataset, batch_id)  # raises BatchNotFoundError or ManifestError
    report = VerifyReport(dataset=dataset, level="deep" if deep else "default",
                          snapshot=snapshot)
    report.unreachable.update(survey.unreachable)
    suspects = catalog.suspects(dataset)  # a reader found these bad: read them at any level
    wanted: Counter[str] = Counter(r.node for m in manifests for c in m.chunks
                                   for r in c.verified)
    nodes: dict[str, tuple[Store, dict[str, ObjectInfo]]] = {}
    for node in topology.nodes:
        if node.name in report.unreachable:
            continue
        store, listing, why = _list_node(topology, node.name, dataset)
        if store is not None and not listing and wanted[node.name] and node.name not in lost:
            why = _empty_node(store, node, catalog, dataset, wanted[node.name])
            if not why:
                report.emptied.append(node.name)
        if why:
            report.unreachable[node.name] = why
        elif store is not None:
            nodes[node.name] = (store, listing)
    for manifest in manifests:  # not on a node found unreachable: it is not acted on
        report.copies += [c for c in _check_copies(catalog, survey, manifest, deep)
                          if c.place not in report.unreachable]
    throttle, read = _Throttle(max_mb_s), list[int]()
    jobs: list[tuple[Store, dict[str, ObjectInfo], Manifest, StoredChunk, str]] = []
    for manifest in manifests:
        for chunk in manifest.chunks:
            short = len(chunk.verified) < manifest.replication_factor
            for replica in chunk.replicas:
                if replica.state == "hinted":
                    report.hints += 1
                    if short and replica.node in nodes:
                        report.replicas.append(ReplicaCheck(
                            manifest.batch_id, chunk.index, chunk.key, replica.node,
                            "missing", "hinted: placement wanted it here; never written"))
                    continue
                if replica.node not in nodes:
                    report.not_checked += 1
                    continue
                store, listing = nodes[replica.node]
                jobs.append((store, listing, manifest, chunk, replica.node))
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        report.replicas += pool.map(
            lambda j: _check(j[0], j[1], j[2], j[3], j[4],
                             deep or (j[2].batch_id, j[3].index, j[4]) in suspects,
                             throttle, read), jobs)
    claimed = _claimed(catalog, dataset, every)
    # a batch whose manifest copies disagree, or cannot be read: what any copy might claim
    # is no orphan
    kept = tuple(_batch_prefix(key) for key, entry in survey.entries.items()
                 if entry.conflicts) + tuple(_batch_prefix(key) for key in survey.unreadable) + (
        delta_log_prefix(dataset),)  # a Delta table's log (skyferry/ops/tables.py)
    for name, (_, listing) in sorted(nodes.items()):
        for key in sorted(listing):
            if (temp_target(key) or key) not in claimed and not key.startswith(kept):
                report.orphans.append(f"{name}:{key}")
    report.bytes_read = sum(read)
    report.seconds = round(time.perf_counter() - started, 3)
    counts = report.counts()
    logger.info("verify %s (%s): replicas %s; manifest copies %s; %d orphans; %d unreachable "
                "places", dataset, report.level, counts, report.copy_counts(),
                len(report.orphans), len(report.unreachable))
    return report
