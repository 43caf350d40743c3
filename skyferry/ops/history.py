"""What the catalog holds, from the snapshot logs: the datasets (``skyferry datasets``) and
one dataset's snapshots, newest first (``skyferry log``)."""

from __future__ import annotations

from dataclasses import dataclass

from skyferry.commit.manifest import open_catalog
from skyferry.commit.snapshots import Snapshot, SnapshotLog
from skyferry.topology import Topology

__all__ = ["DatasetSummary", "LogLine", "dataset_log", "summarize_datasets"]


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
