"""Garbage-collect what no kept snapshot reads and objects that no manifest claims.

First, each dataset's snapshot log is weighed against its retention policy, tags and pins
(:mod:`skyferry.commit.retention`): a committed batch that no kept snapshot holds is
retracted (every copy of its manifest goes), and the chunks of a kept batch that no kept
snapshot reads (older versions of source files that every kept snapshot holds a newer
version of, :mod:`skyferry.ops.expire`) are moved to its manifest's ``freed`` list. A
snapshot that held them has expired: a reader of it is told so.

Then objects are swept. Claimed are: every chunk of every committed manifest, every planned
chunk of a pending batch (so a run in progress, or one waiting for its re-run, keeps its
objects, temp files included, whatever the grace), and every object of a batch whose
manifest cannot be read. Rejects files in the catalog follow the same rule. What no claim
names is deleted once older than the grace period.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from skyferry.commit.manifest import Catalog, Manifest, open_catalog
from skyferry.commit.retention import Retention
from skyferry.commit.snapshots import SnapshotLog
from skyferry.errors import SkyferryError, StorageError
from skyferry.ops.expire import unneeded
from skyferry.ops.tables import delta_log_prefix
from skyferry.storage import ObjectInfo, Store, temp_target
from skyferry.topology import Topology

__all__ = ["GcReport", "collect_garbage", "drop_dataset"]

logger = logging.getLogger("skyferry.store")


@dataclass
class GcReport:
    scanned: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_young: int = 0
    errors: list[str] = field(default_factory=list)
    bytes: int = 0  # of the objects deleted (or that would be)
    usd_per_month: float = 0.0  # what they cost to keep, at the nodes' storage prices
    snapshots_expired: int = 0  # snapshots the policies no longer keep
    batches_freed: list[str] = field(default_factory=list)  # "<dataset>/<batch id>"
    chunks_freed: list[str] = field(default_factory=list)  # "<dataset>/<batch id>/<index>"
    pins: int = 0  # live pins that kept a snapshot


def collect_garbage(topology: Topology, *, grace_s: float, now: float | None = None,
                    dry_run: bool = False) -> GcReport:
    """Free what no kept snapshot reads, then delete what no manifest or pending batch
    claims, once older than ``grace_s``; ``dry_run``: only say what would go.

    The objects are listed first, and the claims read after: a batch that is planned while
    gc runs journals its plan before it writes, so its objects are claimed by the time gc
    looks; one committed while gc runs is in no snapshot gc read, and is kept. A write's
    temp file belongs to the key it will become. A manifest that cannot be read keeps its
    whole batch. A node that cannot be listed is reported, never skipped silently.
    """
    catalog = open_catalog(topology)
    now = time.time() if now is None else now
    report = GcReport()
    stores: list[tuple[str, Store]] = []
    price = {node.name: node.storage_usd_per_gb_month for node in topology.nodes}
    for node in topology.nodes:
        if node.enabled:
            try:
                stores.append((node.name, node.open_store()))
            except StorageError as exc:
                report.errors.append(f"{node.name}: {exc}")
    stores.append(("catalog", catalog.store))
    datasets = set(catalog.datasets()) | {plan.dataset for plan, _ in catalog.pending_plans()}
    listed: list[tuple[str, Store, ObjectInfo]] = []
    for name, store in stores:
        for dataset in sorted(datasets):
            prefix = f"rejects/{dataset}" if name == "catalog" else dataset
            try:
                listed.extend((name, store, obj) for obj in store.list(prefix))
            except StorageError as exc:
                report.errors.append(f"{name}: {exc}")
    claimed: set[str] = set()
    kept_prefixes: list[str] = []
    for plan, _ in catalog.pending_plans():
        claimed.update(plan.key(c) for c in plan.chunks)
        claimed.update(catalog.rejects_key(plan.dataset, plan.batch_id, c.index)
                       for c in plan.chunks)
    for dataset in datasets:
        kept_prefixes.append(delta_log_prefix(dataset))  # a Delta table's log: not ours
        manifests, unreadable = catalog.scan(dataset)
        manifests = _expire(catalog, dataset, manifests, now, dry_run, report)
        for manifest in manifests:
            for chunk in manifest.chunks:
                claimed.add(chunk.key)
                if chunk.rejects_key:
                    claimed.add(chunk.rejects_key)
        for error in unreadable:  # manifests/<dataset>/date=<d>/batch=<id>.json
            report.errors.append(f"catalog: {error}; its batch is kept")
            _, _, date, batch = error.key[:-len(".json")].split("/", 3)
            kept_prefixes += [f"{dataset}/{date}/{batch}/", f"rejects/{dataset}/{batch}/"]
    for name, store, obj in listed:
        report.scanned += 1
        key = temp_target(obj.key) or obj.key
        if key in claimed or key.startswith(tuple(kept_prefixes)):
            continue
        if obj.mtime is not None and now - obj.mtime < grace_s:
            report.kept_young += 1
            continue
        report.deleted.append(f"{name}:{obj.key}")
        report.bytes += obj.size
        report.usd_per_month += obj.size / 1e9 * price.get(name, 0.0)
        if not dry_run:
            store.delete(obj.key)
    logger.info("gc: scanned %d, %s %d (%d bytes), kept %d young; %d snapshots expired, "
                "%d batches and %d chunks freed", report.scanned,
                "would delete" if dry_run else "deleted", len(report.deleted), report.bytes,
                report.kept_young, report.snapshots_expired, len(report.batches_freed),
                len(report.chunks_freed))
    for line in report.errors:
        logger.warning("gc: %s", line)
    return report


def _expire(catalog: Catalog, dataset: str, manifests: list[Manifest], now: float,
            dry_run: bool, report: GcReport) -> list[Manifest]:
    """The manifests still claimed once what no kept snapshot of ``dataset`` reads is
    freed: batches retracted, chunks moved to their manifest's ``freed`` list (with
    ``dry_run``, what would be). A step that fails keeps what it would have freed."""
    log = SnapshotLog(catalog, dataset)
    try:
        seqs = log.sequence()
        if not seqs:
            return manifests
        entries = log.entries(seqs)
        retention = Retention(log)
        pins = retention.pins()
        live = [p for p in pins if p.live(now)]
        kept = (retention.policy().kept(entries, now)
                | {tag.seq for tag in log.tags().values()} | {p.seq for p in live})
    except (SkyferryError, StorageError) as exc:
        report.errors.append(f"{dataset}: its snapshots cannot be weighed ({exc}); nothing "
                             "of it is freed")
        return manifests
    report.pins += len(live)
    report.snapshots_expired += len(set(seqs) - kept)
    by_id = {m.batch_id: m for m in manifests}
    found = unneeded(entries, by_id, kept, keep=entries[-1].quarantined)
    if not dry_run:
        retention.forget([p for p in pins if not p.live(now)])
    for batch_id in found.batches:
        try:
            if not dry_run:
                catalog.retract(by_id[batch_id])
        except (SkyferryError, StorageError) as exc:
            report.errors.append(f"{dataset}/{batch_id}: not freed: {exc}")
            continue
        report.batches_freed.append(f"{dataset}/{batch_id}")
        del by_id[batch_id]
    for batch_id, indices in found.chunks.items():
        manifest = by_id[batch_id]
        going = set(indices)
        rewritten = manifest.model_copy(update={
            "chunks": [c for c in manifest.chunks if c.index not in going],
            "freed": sorted([*manifest.freed, *(c for c in manifest.chunks if c.index in going)],
                            key=lambda c: c.index),
            "revision": manifest.revision + 1})
        try:
            if not dry_run:
                catalog.commit(rewritten, previous=manifest)
        except (SkyferryError, StorageError) as exc:
            report.errors.append(f"{dataset}/{batch_id}: chunks {indices} not freed: {exc}")
            continue
        report.chunks_freed += [f"{dataset}/{batch_id}/{i}" for i in indices]
        by_id[batch_id] = rewritten
    return list(by_id.values())


def drop_dataset(topology: Topology, dataset: str) -> int:
    """Delete a dataset: every copy of its manifests first (it stops being visible), then
    its objects and its snapshot log.

    Returns how many objects were deleted. A manifest copy on a node that is down stops the
    drop before any data goes (:class:`~skyferry.errors.ManifestQuorumError`): the copy
    would bring the batch back. What a down node still holds of the data is left for
    :func:`collect_garbage` (nothing claims it any more).
    """
    catalog = open_catalog(topology)
    manifests = catalog.manifests(dataset)
    for manifest in manifests:
        catalog.retract(manifest)
    deleted = len(manifests)
    for node in topology.nodes:
        if not node.enabled:
            continue
        try:
            store = node.open_store()
            for prefix in (dataset, f"manifests/{dataset}", f"snapshots/{dataset}"):
                for obj in list(store.list(prefix)):
                    store.delete(obj.key)
                    deleted += 1
        except StorageError as exc:
            logger.warning("drop %s: node %s: %s", dataset, node.name, exc)
    for prefix in (f"rejects/{dataset}", f"index/{dataset}", f"snapshots/{dataset}"):
        for obj in list(catalog.store.list(prefix)):
            catalog.store.delete(obj.key)
            deleted += 1
    logger.info("dropped dataset %s: %d objects", dataset, deleted)
    return deleted
