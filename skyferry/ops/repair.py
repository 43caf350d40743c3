"""Repair a committed dataset: every chunk back to R verified replicas.

A repair first verifies (:mod:`skyferry.ops.verify`). Then, for each chunk that has fewer
good replicas than its manifest's replication factor (a replica missing, changed or
unreadable, or a hint that was never written):

- it reads the chunk from a good replica, and checks that copy's content hash;
- it writes new replicas on the nodes placement would choose now (healthy, nearest to the
  copy, at least two clouds when the topology has them, the least loaded first), and
  verifies each one as a run does;
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
wrong configuration than rot.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

from skyferry.commit.manifest import Catalog, Manifest, open_catalog
from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.distribute.probe import probe_nodes
from skyferry.distribute.replication import verify_replica
from skyferry.errors import ConfigError, SkyferryError, StorageError, TopologyError
from skyferry.hashing import content_hash
from skyferry.models import ReplicaRecord, StoredChunk
from skyferry.ops.verify import VerifyReport, verify_dataset
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
    bytes_copied: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every committed chunk that could be checked has R verified replicas again."""
        return not (self.unrecoverable or self.short or self.braked or self.copies_failed)

    def to_json(self) -> str:
        body = asdict(self)
        body["found"] = json.loads(self.found.to_json())
        body["complete"] = self.complete
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
        self.stores: dict[str, Store] = {}
        self.placers: dict[str, Placer] = {}

    def store(self, node: str) -> Store:
        if node not in self.stores:
            self.stores[node] = self.topology.node(node).open_store()
        return self.stores[node]

    def read_good(self, chunk: StoredChunk, nodes: list[str]) -> tuple[bytes, str] | None:
        """The chunk's bytes from the first of ``nodes`` whose copy hashes right."""
        for node in nodes:
            try:
                data = self.store(node).get(chunk.key)
            except (StorageError, TopologyError) as exc:
                logger.warning("chunk %d: the copy on %s is unreadable: %s", chunk.index,
                               node, exc)
                continue
            if len(data) == chunk.size and content_hash(data) == chunk.digest:
                return data, node
            logger.warning("chunk %d: the copy on %s does not match its hash", chunk.index,
                           node)
        return None

    def targets(self, source: str, keep: list[str], hinted: list[str]) -> list[Node]:
        """Healthy nodes without a copy, best first: where a hint says placement wanted the
        chunk, then other clouds while the kept copies span one, then by rank (cost and
        latency from the copy's cloud, then the bytes placed)."""
        cloud = self.topology.node(source).cloud
        placer = self.placers.setdefault(cloud, Placer(self.topology, cloud, None, 1))
        ranked = placer.rank(n for n in self.topology.nodes
                             if self.health.healthy(n.name) and n.name not in keep)
        clouds = {self.topology.node(n).cloud for n in keep}
        if len(clouds) < 2:
            ranked.sort(key=lambda n: n.cloud in clouds)  # stable: rank holds within each
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
        if need > 0:
            copy = self.read_good(chunk, good)
            if copy is None:
                if not good and not unknown:
                    report.unrecoverable.append(
                        f"{where}: no replica whose hash verifies (listed on "
                        f"{', '.join(state) or 'no node'})")
                else:
                    report.short.append(f"{where}: no good copy could be read")
                return chunk
            written = self.write(chunk, copy, good + unknown, hinted, need, where)
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
        return chunk.model_copy(update={"replicas": tuple(replicas)})

    def settled(self, manifest: Manifest, chunk: StoredChunk, unknown: list[str]) -> None:
        """Forget what readers found wrong with the chunk's replicas: it is dealt with."""
        for batch, index, node in self.suspects:
            if (batch, index) == (manifest.batch_id, chunk.index) and node not in unknown:
                self.catalog.clear_suspect(manifest.dataset, batch, index, node)

    def write(self, chunk: StoredChunk, copy: tuple[bytes, str], keep: list[str],
              hinted: list[str], need: int, where: str) -> list[str]:
        """Write and verify ``need`` new replicas; the nodes that verified."""
        data, source = copy
        written: list[str] = []
        for node in self.targets(source, keep, hinted):
            if len(written) == need:
                break
            store = self.store(node.name)
            try:
                store.put(chunk.key, data)
                verify_replica(store, chunk.key, chunk.digest, chunk.size,
                               chunk.md5 if not store.is_local else None)
            except (StorageError, TopologyError) as exc:
                self.health.mark(node.name, "down", str(exc))
                logger.warning("%s: a new replica on %s failed: %s", where, node.name, exc)
                continue
            self.place(node, chunk.size)
            written.append(node.name)
            self.report.bytes_copied += chunk.size
            self.report.recreated.append(f"{where} -> {node.name}")
            self.report.hints_replayed += node.name in hinted
        if len(written) < need:
            self.report.short.append(
                f"{where}: {len(keep) + len(written)} replicas of "
                f"{len(keep) + need}; no healthy node left to take another")
        return written


def repair_dataset(topology: Topology, dataset: str, *, batch_id: str | None = None,
                   node: str | None = None, lost: Collection[str] = (),
                   deep: bool = False, max_node_share: float = 0.5,
                   probe_timeout_s: float = 5.0) -> RepairReport:
    """Bring every chunk of ``dataset`` (one batch with ``batch_id``) back to R verified
    replicas; see the module's docstring. ``node``: only the batches with a replica or a
    hint on that node (a node that came back: its hints are replayed). ``lost``: nodes known
    to have lost their data (see :func:`~skyferry.ops.verify.verify_dataset`)."""
    started = time.perf_counter()
    if not 0.0 <= max_node_share <= 1.0:  # NaN too: it would turn the brake off
        raise ConfigError(f"max_node_share must be a share from 0 to 1, not {max_node_share}",
                          source="max_node_share")
    found = verify_dataset(topology, dataset, batch_id=batch_id, deep=deep, lost=lost)
    report = RepairReport(dataset=dataset, found=found)
    catalog = open_catalog(topology)
    survey = catalog.survey(dataset)
    wanted = {k: e for k, e in survey.entries.items()
              if batch_id is None or k.endswith(f"/batch={batch_id}.json")}
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
    report.braked = _brakes(found, manifests, max_node_share, lost)  # a lost node: no brake
    for node, why in report.braked.items():
        logger.error("repair of %s stopped before touching anything: %s: %s", dataset, node,
                     why)
    if not report.braked:
        repairer = _Repairer(topology, catalog, found, report, probe_timeout_s)
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
    report.seconds = round(time.perf_counter() - started, 3)
    logger.info("repair %s: %d replicas re-created, %d hints replayed, %d bad copies removed, "
                "%d chunks unrecoverable, %d manifest copies restored", dataset,
                len(report.recreated), report.hints_replayed, len(report.removed),
                len(report.unrecoverable), len(report.copies_restored))
    return report
