"""Retention: gc keeps every chunk a pinned, tagged or kept snapshot reads (hashed on the
nodes), frees what only expired snapshots read once the pin lapses (whole batches, and the
chunks of superseded source versions), and a reader of a newer snapshot reads on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from skyferry.cli import app
from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.retention import PIN_TTL_S, Retention
from skyferry.commit.snapshots import SnapshotLog, batch_digest
from skyferry.errors import SnapshotError
from skyferry.ops.export import export_dataset
from skyferry.ops.gc import collect_garbage
from skyferry.ops.verify import verify_dataset
from skyferry.read.reader import ReaderConfig, TrainingReader
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, replica_digest, write_ml_csv

runner = CliRunner()


def _cli(*args: str) -> str:
    done = runner.invoke(app, list(args))
    assert done.exit_code == 0, done.output
    return done.output


def _commit(tmp_path: Path, name: str, rows: int, start: int) -> Manifest:
    write_ml_csv(tmp_path / name / "part.csv", rows, seed=start, start_id=start)
    return commit_without_prefect(tmp_path / name, "ss", chunk_size="30KB")


def _ids(dataset: str, tmp_path: Path, snapshot: str | None = None) -> list[int]:
    out = tmp_path / "out.parquet"
    export_dataset(dataset, out, snapshot=snapshot)
    return sorted(pq.read_table(out).column("id").to_pylist())


def _replicas(home: Path, manifest: Manifest) -> dict[str, str | None]:
    """node:key -> the BLAKE3 of the replica on that node's disk (None: gone)."""
    return {f"{r.node}:{c.key}": replica_digest(home, r.node, c.key)
            for c in manifest.chunks for r in c.verified}


def _intact(home: Path, manifest: Manifest) -> bool:
    digests = {c.key: c.digest for c in manifest.chunks}
    return all(found == digests[where.split(":", 1)[1]]
               for where, found in _replicas(home, manifest).items())


def _pins(home: Path) -> list[Path]:
    return sorted(home.glob("**/snapshots/ss/pins/*.json"))


def test_a_pinned_or_tagged_snapshot_keeps_its_batches_and_an_expired_one_frees_them(
        home: Path, tmp_path: Path) -> None:
    a = _commit(tmp_path, "a", 300, 0)
    b = _commit(tmp_path, "b", 200, 1_000)
    c = _commit(tmp_path, "c", 100, 2_000)
    assert "keep the last 1, the tagged and the pinned" in _cli(
        "retention", "ss", "--keep-last", "1")
    _cli("tag", "ss", "two", "--snapshot", "1")  # a and b
    reader = TrainingReader(ReaderConfig(dataset="ss", snapshot="2", batch_size=50,
                                         cache_dir=tmp_path / "cache"))
    assert reader.snapshot is not None and reader.snapshot.seq == 2
    assert [p.parent.parent.parent.parent.name for p in _pins(home)] == ["catalog"]
    _cli("rollback", "ss", "--to", "0")  # snapshot 3 holds a alone
    topology = load_topology()

    kept = collect_garbage(topology, grace_s=0)
    assert (kept.snapshots_expired, kept.pins, kept.batches_freed, kept.deleted) == (1, 1, [], [])
    assert all(_intact(home, m) for m in (a, b, c))
    whole = sorted(i for t in reader for i in t.column("id").to_pylist())
    assert whole == [*range(300), *range(1_000, 1_200), *range(2_000, 2_100)]

    later = time.time() + PIN_TTL_S + 60  # the reader stopped renewing: its pin lapsed
    dry = collect_garbage(topology, grace_s=0, now=later, dry_run=True)
    assert dry.batches_freed == [f"ss/{c.batch_id}"] and dry.pins == 0
    assert dry.bytes == sum(ch.size * len(ch.verified) for ch in c.chunks) > 0
    prices = {n.name: n.storage_usd_per_gb_month for n in topology.nodes}
    assert dry.usd_per_month == pytest.approx(
        sum(ch.size / 1e9 * prices[r.node] for ch in c.chunks for r in ch.verified))
    assert _intact(home, c) and len(_pins(home)) == 1  # a dry run changes nothing

    freed = collect_garbage(topology, grace_s=0, now=later)
    assert freed.batches_freed == [f"ss/{c.batch_id}"] and not freed.errors
    assert set(_replicas(home, c).values()) == {None}  # on every node
    assert _intact(home, a) and _intact(home, b)
    assert sorted(m.batch_id for m in open_catalog(topology).manifests("ss")) == \
        sorted([a.batch_id, b.batch_id])
    assert _pins(home) == []  # the lapsed pin went too
    assert _ids("ss", tmp_path) == list(range(300))  # the newest reads on
    assert _ids("ss", tmp_path, "two") == [*range(300), *range(1_000, 1_200)]
    with pytest.raises(SnapshotError, match="expired and gc freed the batch"):
        _ids("ss", tmp_path, "2")
    reader.close()
    assert verify_dataset(topology, "ss").verdict == "healthy"


def test_a_reader_releases_its_pin_when_it_closes(home: Path, tmp_path: Path) -> None:
    _commit(tmp_path, "a", 100, 0)
    reader = TrainingReader(ReaderConfig(dataset="ss", cache_dir=tmp_path / "cache"))
    assert reader.snapshot is not None
    pins = Retention(SnapshotLog(open_catalog(load_topology()), "ss")).pins()
    assert [(p.seq, p.snapshot) for p in pins] == [(0, reader.snapshot.id)]
    assert pins[0].live(time.time()) and not pins[0].live(time.time() + PIN_TTL_S + 1)
    reader.close()
    assert _pins(home) == []
    unpinned = TrainingReader(ReaderConfig(dataset="ss", cache_dir=tmp_path / "cache",
                                           pin_ttl_s=None))
    assert unpinned.snapshot is not None and _pins(home) == []


def test_superseded_versions_are_freed_once_no_kept_snapshot_reads_them(
        home: Path, tmp_path: Path) -> None:
    source = tmp_path / "src" / "part.csv"
    write_ml_csv(source, 600, seed=1)
    first = commit_without_prefect(source.parent, "sv", chunk_size="30KB")
    write_ml_csv(source, 400, seed=2, start_id=10_000)  # rewritten: it supersedes
    os.utime(source, (time.time() + 10, time.time() + 10))
    second = commit_without_prefect(source.parent, "sv", chunk_size="30KB")
    assert _ids("sv", tmp_path) == list(range(10_000, 10_400))
    _cli("retention", "sv", "--keep-last", "1")
    topology = load_topology()

    report = collect_garbage(topology, grace_s=0)
    assert report.chunks_freed == [f"sv/{first.batch_id}/{c.index}" for c in first.chunks]
    assert report.batches_freed == [] and not report.errors
    assert set(_replicas(home, first).values()) == {None} and _intact(home, second)
    rewritten = open_catalog(topology).manifest("sv", first.batch_id)
    assert rewritten.chunks == [] and rewritten.freed == first.chunks
    assert batch_digest(rewritten) == batch_digest(first)  # the snapshots still hold it
    assert _ids("sv", tmp_path) == list(range(10_000, 10_400))
    with pytest.raises(SnapshotError, match="has expired: gc freed what it reads"):
        _ids("sv", tmp_path, "0")
    assert verify_dataset(topology, "sv").verdict == "healthy"
    assert collect_garbage(topology, grace_s=0).deleted == []  # nothing more to free


def test_verify_and_repair_take_a_snapshot(home: Path, tmp_path: Path) -> None:
    from skyferry.ops.repair import repair_dataset

    first = _commit(tmp_path, "a", 300, 0)
    second = _commit(tmp_path, "b", 200, 1_000)
    for manifest in (first, second):  # one replica of each batch damaged
        chunk = manifest.chunks[0]
        (home / "nodes" / chunk.verified[0].node / chunk.key).write_bytes(b"damaged")
    topology = load_topology()

    found = verify_dataset(topology, "ss", snapshot="0", deep=True)
    assert {c.batch_id for c in found.replicas} == {first.batch_id}
    assert [(c.batch_id, c.chunk) for c in found.replicas if c.status != "ok"] == \
        [(first.batch_id, 0)]
    fixed = repair_dataset(topology, "ss", snapshot="0", deep=True, max_node_share=1.0)
    assert len(fixed.recreated) == 1 and _intact(home, first)
    after = verify_dataset(topology, "ss", deep=True)  # the other batch was left alone
    assert [(c.batch_id, c.chunk) for c in after.replicas if c.status != "ok"] == \
        [(second.batch_id, 0)]
    with pytest.raises(SnapshotError, match="has no snapshot 7"):
        verify_dataset(topology, "ss", snapshot="7")
