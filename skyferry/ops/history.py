"""What the catalog holds, from the snapshot logs: the datasets (``skyferry datasets``),
one dataset's snapshots, newest first (``skyferry log``), and what changed between two of
them (``skyferry diff``)."""

from __future__ import annotations

from dataclasses import dataclass

from skyferry.commit.manifest import open_catalog
from skyferry.commit.snapshots import BatchRef, Snapshot, SnapshotLog
from skyferry.errors import SnapshotError
from skyferry.topology import Topology

__all__ = ["DatasetSummary", "LogLine", "SnapshotDiff", "dataset_log", "diff_snapshots",
           "summarize_datasets"]


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset as its newest snapshot holds it (a dataset committed before snapshots:
    its manifests, and no snapshot)."""

    dataset: str
    snapshots: int
    snapshot: str | None
    batches: int
    rows: int
    bytes: int
    last_change: str | None  # when the newest snapshot was made


@dataclass(frozen=True)
class LogLine:
    """A snapshot, with the rows its batches added to and removed from its parent's."""

    snapshot: Snapshot
    rows_added: int
    rows_removed: int


def summarize_datasets(topology: Topology) -> list[DatasetSummary]:
    catalog = open_catalog(topology)
    found = []
    for dataset in catalog.datasets():
        log = SnapshotLog(catalog, dataset)
        seqs = log.sequence()
        if seqs:
            head = log.entry(seqs[-1])
            found.append(DatasetSummary(dataset, len(seqs), head.id, head.batches, head.rows,
                                        head.bytes, head.created_at))
            continue
        manifests = catalog.manifests(dataset)
        found.append(DatasetSummary(
            dataset, 0, None, len(manifests), sum(m.rows_stored for m in manifests),
            sum(m.bytes_stored for m in manifests),
            max((m.created_at for m in manifests), default=None)))
    return found


def dataset_log(topology: Topology, dataset: str, limit: int = 20) -> list[LogLine]:
    """The newest ``limit`` snapshots of ``dataset``, newest first."""
    log = SnapshotLog(open_catalog(topology), dataset)
    seqs = log.sequence()
    shown = seqs[-limit:] if limit > 0 else seqs
    entries = log.entries(seqs[max(0, len(seqs) - len(shown) - 1):])  # and the parent
    lines = []
    for at, entry in enumerate(entries):
        if entry.seq not in shown:
            continue
        previous = entries[at - 1].rows if at else 0
        added = sum(b.rows for b in entry.added)
        lines.append(LogLine(entry, added, added - (entry.rows - previous)))
    return lines[::-1]


@dataclass(frozen=True)
class SnapshotDiff:
    """What changed from snapshot ``a`` to snapshot ``b``."""

    a: Snapshot
    b: Snapshot
    added: list[BatchRef]
    removed: list[BatchRef]
    sources_added: list[str]
    sources_removed: list[str]

    @property
    def rows(self) -> tuple[int, int]:
        return sum(r.rows for r in self.added), sum(r.rows for r in self.removed)

    @property
    def bytes(self) -> tuple[int, int]:
        return sum(r.bytes for r in self.added), sum(r.bytes for r in self.removed)


def diff_snapshots(topology: Topology, dataset: str, a: str, b: str) -> SnapshotDiff:
    """The batches, source files (their versions' URLs), rows and bytes that snapshot ``b``
    holds and ``a`` does not (added), and the other way round (removed)."""
    catalog = open_catalog(topology)
    log = SnapshotLog(catalog, dataset)
    first, second = log.resolve(a), log.resolve(b)
    if first is None or second is None:
        raise SnapshotError(f"{dataset} has no snapshots", dataset=dataset)
    old = {r.batch_id: r for r in log.batches(first.seq)}
    new = {r.batch_id: r for r in log.batches(second.seq)}
    added = [r for k, r in new.items() if old.get(k) != r]
    removed = [r for k, r in old.items() if new.get(k) != r]
    changed = {r.batch_id for r in (*added, *removed)}
    manifests = {m.batch_id: m for m in catalog.manifests(dataset) if m.batch_id in changed}

    def sources(refs: list[BatchRef]) -> list[str]:
        return sorted({f"{s.url}@{s.fingerprint}" for r in refs if r.batch_id in manifests
                       for s in manifests[r.batch_id].lineage.sources})

    return SnapshotDiff(first, second, added, removed, sources(added), sources(removed))
