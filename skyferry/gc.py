"""Garbage-collect objects that no manifest claims, once they are older than a grace period.

Claimed are: every chunk of every committed manifest, and every planned chunk of a pending
batch (so a run in progress, or one waiting for its re-run, keeps its objects). Rejects
files in the catalog follow the same rule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from blocks.topology import Topology
from skyferry.errors import StorageError
from skyferry.manifest import Catalog

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
    catalog = Catalog(topology.catalog_store())
    now = time.time() if now is None else now
    claimed: set[str] = set()
    datasets = set(catalog.datasets())
    for plan, _ in catalog.pending_plans():
        datasets.add(plan.dataset)
        claimed.update(plan.key(c) for c in plan.chunks)
        claimed.update(catalog.rejects_key(plan.dataset, plan.batch_id, c.index)
                       for c in plan.chunks)
    for dataset in datasets:
        for manifest in catalog.manifests(dataset):
            for chunk in manifest.chunks:
                claimed.add(chunk.key)
                if chunk.rejects_key:
                    claimed.add(chunk.rejects_key)
    report = GcReport()
    stores = [(node.name, node.store()) for node in topology.nodes if node.enabled]
    stores.append(("catalog", catalog.store))
    for name, store in stores:
        for dataset in sorted(datasets):
            prefix = f"rejects/{dataset}" if name == "catalog" else dataset
            try:
                objects = list(store.list(prefix))
            except StorageError as exc:
                report.errors.append(f"{name}: {exc}")
                continue
            for obj in objects:
                report.scanned += 1
                if obj.key in claimed:
                    continue
                if obj.mtime is not None and now - obj.mtime < grace_s:
                    report.kept_young += 1
                    continue
                report.deleted.append(f"{name}:{obj.key}")
                if not dry_run:
                    store.delete(obj.key)
    logger.info("gc: scanned %d, deleted %d, kept %d young", report.scanned,
                len(report.deleted), report.kept_young)
    return report


def drop_dataset(topology: Topology, dataset: str) -> int:
    """Delete a dataset: its manifests first (it stops being visible), then its objects.

    Returns how many objects were deleted. What a node that is down still holds is left for
    :func:`collect_garbage` (nothing claims it any more).
    """
    catalog = Catalog(topology.catalog_store())
    manifests = catalog.manifests(dataset)
    for manifest in manifests:
        catalog.store.delete(catalog.manifest_key(dataset, manifest.partition_date,
                                                  manifest.batch_id))
    deleted = len(manifests)
    for node in topology.nodes:
        if not node.enabled:
            continue
        store = node.store()
        try:
            for obj in list(store.list(dataset)):
                store.delete(obj.key)
                deleted += 1
        except StorageError as exc:
            logger.warning("drop %s: node %s: %s", dataset, node.name, exc)
    for obj in list(catalog.store.list(f"rejects/{dataset}")):
        catalog.store.delete(obj.key)
        deleted += 1
    logger.info("dropped dataset %s: %d objects", dataset, deleted)
    return deleted
