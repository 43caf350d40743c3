"""Garbage-collect objects that no manifest claims, once they are older than a grace period.

Claimed are: every chunk of every committed manifest, every planned chunk of a pending
batch (so a run in progress, or one waiting for its re-run, keeps its objects, temp files
included, whatever the grace), and every object of a batch whose manifest cannot be read.
Rejects files in the catalog follow the same rule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from skyferry.commit.manifest import open_catalog
from skyferry.errors import StorageError
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


def collect_garbage(topology: Topology, *, grace_s: float, now: float | None = None,
                    dry_run: bool = False) -> GcReport:
    """Delete what no manifest or pending batch claims, once older than ``grace_s``.

    The objects are listed first, and the claims read after: a batch that is planned while
    gc runs journals its plan before it writes, so its objects are claimed by the time gc
    looks. A write's temp file belongs to the key it will become. A manifest that cannot be
    read keeps its whole batch. A node that cannot be listed is reported, never skipped
    silently.
    """
    catalog = open_catalog(topology)
    now = time.time() if now is None else now
    report = GcReport()
    stores: list[tuple[str, Store]] = []
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
        manifests, unreadable = catalog.scan(dataset)
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
        if not dry_run:
            store.delete(obj.key)
    logger.info("gc: scanned %d, deleted %d, kept %d young", report.scanned,
                len(report.deleted), report.kept_young)
    for line in report.errors:
        logger.warning("gc: %s", line)
    return report


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
