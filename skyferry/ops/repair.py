"""Repair a committed dataset: every chunk back to R verified replicas.

A repair first verifies (:mod:`skyferry.ops.verify`). Then, for each chunk that has fewer
good replicas than its manifest's replication factor (a replica missing, changed or
unreadable, or a hint that was never written):

- it streams the chunk from a good replica into new replicas, as a run writes them (a
  :class:`~skyferry.distribute.replication.ReplicaWriter`), on the nodes placement would
  choose now (healthy, nearest to the copy, at least two clouds when the topology has
  them, the least loaded first); the copy's content hash is checked before any new
  replica commits (a bad copy: the next good one is read), and each new replica is
  verified as a run does. Memory: a few blocks, whatever the chunk's size;
- only then does it remove a bad copy that is left on a node it did not rewrite;
- a hint whose node is healthy is replayed: that node is the first choice for a new
  replica, as placement wanted; a hint of a chunk that has R replicas again is dropped;
- it records the chunk's replicas in its manifest, rewritten atomically with a higher
  revision, once every new replica is verified, and commits it as a run does: to the
  catalog and to every node now holding the batch;
- a manifest copy that is missing or differs, in the catalog or on a node, is written again
  from the copy a reader uses: a lost catalog comes back this way.

A node that could not be listed is not acted on: its replicas stay in the manifest as they
are. Before it touches anything, a repair stops if one node would lose more than
``max_node_share`` of the replicas it holds: that much damage on one node is more likely a
wrong configuration than rot. A node that answers empty but holds its own identity marker
(see :mod:`skyferry.ops.verify`), or that the operator names ``lost``, lost its replicas
for certain: they are re-created, without the brake.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

from skyferry.commit.copies import Survey
from skyferry.commit.manifest import Catalog, Manifest, open_catalog
from skyferry.commit.snapshots import SnapshotLog
from skyferry.distribute.access import ReplicaRef, Replicas, SourceReplicaError, mark_nodes
from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.distribute.probe import probe_nodes
from skyferry.distribute.replication import ReplicaWriter
from skyferry.errors import (
    ConfigError,
    QuorumNotMetError,
    SkyferryError,
    StorageError,
    TopologyError,
)
from skyferry.models import ReplicaRecord, StoredChunk
from skyferry.ops.verify import Verdict, VerifyReport, snapshot_batches, verify_dataset
from skyferry.storage import Store
from skyferry.topology import Node, Topology

__all__ = ["RepairReport", "repair_dataset"]

logger = logging.getLogger("skyferry.ops.repair")


@dataclass
class RepairReport:
    dataset: str
    found: VerifyReport
    recreated: list[str] = field(default_factory=list)  # "batch/chunk -> node"
    hints_replayed: int = 0
    removed: list[str] = field(default_factory=list)  # "node:key", bad copies
    unrecoverable: list[str] = field(default_factory=list)  # "batch=<id> chunk <n>: why"
    short: list[str] = field(default_factory=list)  # chunks left under R: no node to take one
    braked: dict[str, str] = field(default_factory=dict)  # node -> why nothing was touched
    manifests_updated: list[str] = field(default_factory=list)
    copies_restored: list[str] = field(default_factory=list)  # "place:key", manifest copies
    copies_failed: list[str] = field(default_factory=list)  # "place:key: why"
    snapshot_added: list[str] = field(default_factory=list)  # batches no snapshot held
    bytes_copied: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every committed chunk that could be checked has R verified replicas again."""
        return not (self.unrecoverable or self.short or self.braked or self.copies_failed)

    @property
    def verdict(self) -> Verdict:
        """``damaged`` while damage is left; else the verify's ``unchecked`` (a place that
        could not be read), or ``healthy``. Exit codes and the flow as for a verify."""
        if not self.complete:
            return "damaged"
        return "unchecked" if self.found.verdict == "unchecked" else "healthy"

    def summary(self) -> str:
        """One line that says why the verdict is not ``healthy`` (empty when it is)."""
        if self.verdict == "damaged":
            left = self.unrecoverable + self.short + self.copies_failed + [
                f"{node}: {why}" for node, why in self.braked.items()]
            return f"repair of {self.dataset} left chunks at risk: " + "; ".join(left[:10])
        return self.found.summary()

    def to_json(self) -> str:
        body = asdict(self)
        body["found"] = json.loads(self.found.to_json())
        body["complete"] = self.complete
        body["verdict"] = self.verdict
        return json.dumps(body, indent=1)


def _brakes(found: VerifyReport, manifests: list[Manifest], share: float,
            lost: Collection[str] = ()) -> dict[str, str]:
    held: Counter[str] = Counter(r.node for m in manifests for c in m.chunks for r in c.verified)
    bad: Counter[str] = Counter(c.node for c in found.damaged)
    return {node: (f"{bad[node]} of its {held[node]} replicas are damaged, more than "
                   f"{share:.0%}: check the node's configuration, or repair with a higher "
                   "max_node_share")
            for node in bad
            if node not in lost and held[node] and bad[node] / held[node] > share}


class _Repairer:
    """One repair's nodes: their stores, their health, and the bytes placed on each."""

    def __init__(self, topology: Topology, catalog: Catalog, found: VerifyReport,
                 report: RepairReport, probe_timeout_s: float) -> None:
        self.topology = topology
        self.catalog = catalog
        self.suspects = catalog.suspects(found.dataset)
        self.report = report
        self.unreachable = set(found.unreachable)
        self.status = {(c.batch_id, c.chunk, c.node): c.status for c in found.replicas}
        self.health = NodeHealth()
        for node, why in found.unreachable.items():
            self.health.mark(node, "down", why)
        probe_nodes(topology, self.health, probe_timeout_s)
        mark_nodes(topology, self.health.healthy, catalog)
        self.replicas = Replicas(topology, catalog)
        self.placers: dict[str, Placer] = {}
        self.writers: dict[str, ReplicaWriter] = {}

    def store(self, node: str) -> Store:
        return self.replicas.store(node)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def writer(self, cloud: str) -> ReplicaWriter:
        """The writer of new replicas copied from ``cloud``: its spares ranked from there."""
        if cloud not in self.writers:
            placer = self.placers.setdefault(cloud, Placer(self.topology, cloud, None, 1))
            self.writers[cloud] = ReplicaWriter(self.topology, self.health, placer, cloud)
        return self.writers[cloud]

    def targets(self, source: str, keep: list[str], hinted: list[str]) -> list[Node]:
        """Healthy nodes without a copy, best first: where a hint says placement wanted the
        chunk, then the spare ranking from the copy's cloud (:meth:`Placer.spares`)."""
        self.writer(self.topology.node(source).cloud)
        placer = self.placers[self.topology.node(source).cloud]
        ranked = placer.spares((n for n in self.topology.nodes
                                if self.health.healthy(n.name) and n.name not in keep),
                               {self.topology.node(n).cloud for n in keep})
        ranked.sort(key=lambda n: n.name not in hinted)
        return ranked

    def place(self, node: Node, size: int) -> None:
        for placer in self.placers.values():
            placer.load[node.name] = placer.load.get(node.name, 0) + size

    def chunk(self, manifest: Manifest, chunk: StoredChunk) -> StoredChunk:
        """The chunk, brought back to R verified replicas where it can be."""
        report = self.report
        where = f"batch={manifest.batch_id} chunk {chunk.index}"
        state = {n: self.status.get((manifest.batch_id, chunk.index, n))
                 for n in (r.node for r in chunk.verified)}
        good = [n for n, s in state.items() if s == "ok"]
        unknown = [n for n in state if n in self.unreachable]  # not judged, not acted on
        bad = [n for n in state if n not in good and n not in unknown]
        hinted = [r.node for r in chunk.replicas if r.state == "hinted"]
        need = manifest.replication_factor - len(good) - len(unknown)
        if need <= 0 and not bad and not hinted:
            self.settled(manifest, chunk, unknown)
            return chunk
        written: list[str] = []
        md5 = chunk.md5
        if need > 0:
            copied = self.write(manifest, chunk, good, good + unknown, hinted, need, where)
            if copied is None:
                if not good and not unknown:
                    report.unrecoverable.append(
                        f"{where}: no replica whose hash verifies (listed on "
                        f"{', '.join(state) or 'no node'})")
                else:
                    report.short.append(f"{where}: no good copy could be read")
                return chunk
            written, md5 = copied[0], md5 or copied[1]
        for node in bad:  # only now that the new replicas are verified
            if node in written or state[node] == "missing":
                continue
            try:
                self.store(node).delete(chunk.key)
                report.removed.append(f"{node}:{chunk.key}")
            except (StorageError, TopologyError) as exc:
                logger.warning("%s: the bad copy on %s stays: %s", where, node, exc)
        keep = good + unknown + written
        self.settled(manifest, chunk, unknown)
        replicas = [ReplicaRecord(node=n, cloud=self.topology.node(n).cloud, state="verified")
                    for n in keep]
        if len(keep) < manifest.replication_factor:  # still short: the hints wait
            replicas += [ReplicaRecord(node=n, cloud=self.topology.node(n).cloud,
                                       state="hinted") for n in hinted if n not in keep]
        return chunk.model_copy(update={"replicas": tuple(replicas), "md5": md5})

    def settled(self, manifest: Manifest, chunk: StoredChunk, unknown: list[str]) -> None:
        """Forget what readers found wrong with the chunk's replicas: it is dealt with."""
        for batch, index, node in self.suspects:
            if (batch, index) == (manifest.batch_id, chunk.index) and node not in unknown:
                self.catalog.clear_suspect(manifest.dataset, batch, index, node)

    def write(self, manifest: Manifest, chunk: StoredChunk, good: list[str], keep: list[str],
              hinted: list[str], need: int, where: str) -> tuple[list[str], str | None] | None:
        """Write and verify ``need`` new replicas, streamed from the first of ``good`` whose
        bytes verify (:meth:`Replicas.produce`) through a :class:`ReplicaWriter`; the nodes
        that verified and the MD5 of the bytes, or None when no good copy could be read."""
        ref = ReplicaRef.of(manifest, chunk)
        for source in good:
            targets = [n.name for n in self.targets(source, keep, hinted)[:need]]
            if not targets:
                break
            writer = self.writer(self.topology.node(source).cloud)
            try:
                outcome = writer.write(chunk.index, chunk.key, self.replicas.produce(ref, source),
                                       [*keep, *targets], len(keep) + 1, done=keep,
                                       expect=(chunk.digest, chunk.size))
            except SourceReplicaError as exc:
                logger.warning("%s: the copy on %s cannot be copied: %s", where, source, exc)
                continue
            except QuorumNotMetError as exc:
                logger.warning("%s: no new replica verified: %s", where, exc)
                written, md5 = [], None
            else:
                written = [r.node for r in outcome.replicas
                           if r.state == "verified" and r.node not in keep]
                md5 = outcome.md5
            for name in written:
                self.place(self.topology.node(name), chunk.size)
                self.report.bytes_copied += chunk.size
                self.report.recreated.append(f"{where} -> {name}")
                self.report.hints_replayed += name in hinted
            if len(written) < need:
                self.report.short.append(
                    f"{where}: {len(keep) + len(written)} replicas of "
                    f"{len(keep) + need}; no healthy node left to take another")
            return written, md5
        return None


def _repair_manifests(repairer: _Repairer, catalog: Catalog, manifests: list[Manifest],
                      survey: Survey, bad_copies: dict[str, list[str]],
                      report: RepairReport) -> None:
    """Each manifest's chunks back to R replicas, the manifest rewritten when they changed;
    its damaged copies written again when they did not."""
    for manifest in manifests:
        chunks = [repairer.chunk(manifest, chunk) for chunk in manifest.chunks]
        key = catalog.key_of(manifest)
        if chunks != manifest.chunks:  # every replica it now lists has verified
            rewritten = manifest.model_copy(update={"chunks": chunks,
                                                    "revision": manifest.revision + 1})
            try:
                catalog.commit(rewritten, previous=manifest)
            except (SkyferryError, StorageError) as exc:
                report.copies_failed.append(f"{key}: {exc}")
                continue
            report.manifests_updated.append(key)
            report.copies_restored += [f"{p}:{key}" for p in bad_copies.get(key, [])]
        elif key in bad_copies:
            failed = catalog.restore(key, survey.entries[key].body, bad_copies[key])
            report.copies_restored += [f"{p}:{key}" for p in bad_copies[key]
                                       if p not in failed]
            report.copies_failed += [f"{p}:{key}: {why}" for p, why in failed.items()]


def repair_dataset(topology: Topology, dataset: str, *, batch_id: str | None = None,
                   node: str | None = None, lost: Collection[str] = (),
                   deep: bool = False, max_node_share: float = 0.5,
                   probe_timeout_s: float = 5.0, snapshot: str | None = None
                   ) -> RepairReport:
    """Bring every chunk of ``dataset`` (one batch with ``batch_id``; the batches of one
    snapshot with ``snapshot``) back to R verified replicas; see the module's docstring.
    ``node``: only the batches with a replica or a hint on that node (a node that came back:
    its hints are replayed). ``lost``: nodes known to have lost their data (see
    :func:`~skyferry.ops.verify.verify_dataset`)."""
    started = time.perf_counter()
    if not 0.0 <= max_node_share <= 1.0:  # NaN too: it would turn the brake off
        raise ConfigError(f"max_node_share must be a share from 0 to 1, not {max_node_share}",
                          source="max_node_share")
    found = verify_dataset(topology, dataset, batch_id=batch_id, deep=deep, lost=lost,
                           snapshot=snapshot)
    held = snapshot_batches(open_catalog(topology), dataset, snapshot) if snapshot else None
    report = RepairReport(dataset=dataset, found=found)
    catalog = open_catalog(topology)
    survey = catalog.survey(dataset)
    wanted = {k: e for k, e in survey.entries.items()
              if (batch_id is None or k.endswith(f"/batch={batch_id}.json"))
              and (held is None or k[:-len(".json")].rsplit("/batch=", 1)[-1] in held)}
    for key, entry in sorted(wanted.items()):  # which copy is right is not repair's guess
        if entry.conflicts:
            report.copies_failed.append(
                f"{key}: its copies disagree on the batch's chunks ("
                + "; ".join(f"{p}: {why}" for p, why in sorted(entry.conflicts.items()))
                + "): the batch is left untouched")
    manifests = sorted((Manifest.model_validate_json(e.body) for e in wanted.values()
                        if not e.conflicts), key=lambda m: (m.created_at, m.batch_id))
    if node is not None:
        manifests = [m for m in manifests
                     if node in {r.node for c in m.chunks for r in c.replicas}]
    bad_copies: dict[str, list[str]] = {}
    for check in found.damaged_copies:
        bad_copies.setdefault(check.key, []).append(check.place)
    # a node known to have lost its data (--lost, or emptied with its own identity marker):
    # no brake, for its damage is no sign of a wrong configuration
    report.braked = _brakes(found, manifests, max_node_share, [*lost, *found.emptied])
    for node, why in report.braked.items():
        logger.error("repair of %s stopped before touching anything: %s: %s", dataset, node,
                     why)
    if not report.braked:
        repairer = _Repairer(topology, catalog, found, report, probe_timeout_s)
        try:
            _repair_manifests(repairer, catalog, manifests, survey, bad_copies, report)
        finally:
            repairer.close()
        if batch_id is None and node is None and snapshot is None:
            adopted = SnapshotLog(catalog, dataset).adopt(manifests)
            report.snapshot_added = [b.batch_id for b in adopted.added] if adopted else []
    report.seconds = round(time.perf_counter() - started, 3)
    logger.info("repair %s: %d replicas re-created, %d hints replayed, %d bad copies removed, "
                "%d chunks unrecoverable, %d manifest copies restored", dataset,
                len(report.recreated), report.hints_replayed, len(report.removed),
                len(report.unrecoverable), len(report.copies_restored))
    return report
