"""Snapshots: each commit appends one, readers keep theirs for life, a saved state resumes
after later commits, and the log survives the catalog's loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.snapshots import SnapshotLog, batch_digest, lineage_of
from skyferry.errors import SnapshotError
from skyferry.read.reader import ReaderConfig, TrainingReader, pin_snapshot
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv


def _commit(tmp_path: Path, name: str, rows: int, start: int) -> Manifest:
    write_ml_csv(tmp_path / name / "part.csv", rows, seed=start, start_id=start)
    return commit_without_prefect(tmp_path / name, "ss", chunk_size="30KB")


def _log() -> SnapshotLog:
    return SnapshotLog(open_catalog(load_topology()), "ss")


def _ids(tables: list[pa.Table]) -> list[int]:
    return [i for t in tables for i in t.column("id").to_pylist()]


def test_each_commit_appends_a_snapshot_that_survives_the_catalogs_loss(
        home: Path, tmp_path: Path) -> None:
    batches = [_commit(tmp_path, f"b{i}", 1_000 + 100 * i, 10_000 * i) for i in range(3)]
    log = _log()
    assert log.sequence() == [0, 1, 2]
    entries = log.entries([0, 1, 2])
    assert [e.batches for e in entries] == [1, 2, 3]
    assert [e.rows for e in entries] == [1_000, 2_100, 3_300]
    assert [e.parent for e in entries] == [None, entries[0].id, entries[1].id]
    assert [[b.batch_id for b in e.added] for e in entries] == [[m.batch_id] for m in batches]
    assert [b.digest for b in log.batches(2)] == [batch_digest(m) for m in batches]
    assert [e.lineage for e in entries] == [[lineage_of(m)] for m in batches]
    assert entries[2].lineage[0].chunk_digests == [c.digest for c in batches[2].chunks]
    assert len({e.id for e in entries}) == 3
    assert log.resolve(entries[1].id[:8]) == entries[1]
    assert log.resolve("1") == entries[1]
    with pytest.raises(SnapshotError, match="has no snapshot 'ffffffffff'"):
        log.resolve("ffffffffff")

    tag = log.tag("first-two", "1")
    shutil.rmtree(home / "catalog" / "snapshots")  # the catalog's copies are gone
    again = _log()
    assert again.sequence() == [0, 1, 2]
    assert again.entries([0, 1, 2]) == entries
    assert again.batches(1) == log.batches(1)
    assert again.tags() == {"first-two": tag} and again.resolve("first-two") == entries[1]


def test_a_reader_keeps_its_snapshot_and_a_saved_state_resumes_after_a_commit(
        home: Path, tmp_path: Path) -> None:
    first = _commit(tmp_path, "a", 3_000, 0)
    options = {"dataset": "ss", "batch_size": 100, "seed": 3, "cache_dir": tmp_path / "cache"}
    whole = _ids(list(TrainingReader(ReaderConfig(**options))))  # type: ignore[arg-type]
    assert sorted(whole) == list(range(3_000))

    pinned_config = pin_snapshot(ReaderConfig(**options))  # type: ignore[arg-type]
    reader = TrainingReader(ReaderConfig(**options))  # type: ignore[arg-type]
    tables = iter(reader)
    head = _ids([next(tables) for _ in range(7)])
    state = reader.state_dict()
    assert state["snapshot"] == _log().resolve(None).id  # type: ignore[union-attr]
    _commit(tmp_path, "b", 2_000, 50_000)  # the scheduled ingest commits meanwhile
    assert sorted(_ids(list(tables))) == sorted(whole[700:])  # the open reader: its snapshot

    resumed = TrainingReader(ReaderConfig(**options))  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert head + _ids(list(resumed)) == whole
    assert resumed.snapshot is not None and resumed.snapshot.id == state["snapshot"]

    assert pinned_config.snapshot == state["snapshot"]  # pinned before the commit
    assert _ids(list(TrainingReader(pinned_config))) == whole
    fresh = TrainingReader(ReaderConfig(**options))  # type: ignore[arg-type]
    assert len(_ids(list(fresh))) == 5_000  # a new reader: the newest snapshot
    pinned = TrainingReader(ReaderConfig(**options, snapshot="0"))  # type: ignore[arg-type]
    assert sorted(_ids(list(pinned))) == list(range(3_000))
    with pytest.raises(Exception, match="saved on snapshot"):
        TrainingReader(ReaderConfig(**options, snapshot="1")).load_state_dict(  # type: ignore[arg-type]
            state)
    assert first.batch_id in {b.batch_id for b in _log().batches(1)}


def test_a_dataset_committed_before_the_log_gets_a_genesis_snapshot(
        home: Path, tmp_path: Path) -> None:
    old = _commit(tmp_path, "a", 1_000, 0)
    for path in home.rglob("snapshots"):
        shutil.rmtree(path)  # as committed before snapshots existed
    assert _log().sequence() == []
    legacy = TrainingReader(ReaderConfig("ss", cache_dir=tmp_path / "cache"))
    assert legacy.snapshot is None and len(_ids(list(legacy))) == 1_000
    new = _commit(tmp_path, "b", 500, 9_000)
    log = _log()
    genesis, commit = log.entries(log.sequence())
    assert genesis.operation == "genesis" and [b.batch_id for b in genesis.added] == [
        old.batch_id]
    assert commit.operation == "commit" and [b.batch_id for b in commit.added] == [
        new.batch_id]
    assert commit.rows == 1_500


def test_a_snapshot_is_rebuilt_from_its_full_list_or_from_the_log_alone(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skyferry.commit import snapshots

    monkeypatch.setattr(snapshots, "FULL_EVERY", 2)
    batches = [_commit(tmp_path, f"b{i}", 200, 1_000 * i) for i in range(5)]
    log = _log()
    fulls = sorted(p.name for p in (home / "catalog" / "snapshots" / "ss" / "full").iterdir())
    assert fulls == ["000000000002.json", "000000000004.json"]
    expected = [m.batch_id for m in batches]
    assert [b.batch_id for b in log.batches(4)] == expected
    assert [b.batch_id for b in log.batches(3)] == expected[:4]
    for path in home.rglob("full"):
        shutil.rmtree(path)  # no full list anywhere: the log alone
    assert [b.batch_id for b in _log().batches(4)] == expected


def test_the_commands_list_datasets_show_the_log_and_read_a_snapshot(
        home: Path, tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from skyferry.cli import app

    _commit(tmp_path, "a", 800, 0)
    _commit(tmp_path, "b", 300, 5_000)
    runner = CliRunner()
    found = json.loads(runner.invoke(app, ["datasets", "--json"]).output)
    assert [(d["dataset"], d["snapshots"], d["batches"], d["rows"]) for d in found] == [
        ("ss", 2, 2, 1_100)]
    lines = json.loads(runner.invoke(app, ["log", "ss", "--json"]).output)
    assert [(e["seq"], e["operation"], e["rows"], e["rows_added"]) for e in lines] == [
        (1, "commit", 1_100, 300), (0, "commit", 800, 800)]
    shown = runner.invoke(app, ["log", "ss"])
    assert shown.exit_code == 0 and lines[0]["id"] in shown.output

    out = tmp_path / "first.parquet"
    done = runner.invoke(app, ["export", "ss", "--snapshot", lines[1]["id"][:10],
                               "--to", str(out)])
    assert done.exit_code == 0, done.output
    assert f"snapshot {lines[1]['id']}" in done.output
    assert sorted(pq.read_table(out).column("id").to_pylist()) == list(range(800))
    read = runner.invoke(app, ["read", "ss", "--snapshot", "1", "--to", str(out),
                               "--cache-dir", str(tmp_path / "cache")])
    assert read.exit_code == 0, read.output
    assert pq.read_table(out).num_rows == 1_100
    bad = runner.invoke(app, ["export", "ss", "--snapshot", "7", "--to", str(out)])
    assert bad.exit_code == 2 and "SnapshotError: ss has no snapshot 7" in bad.output
    assert "Traceback" not in bad.output


def test_repair_puts_a_batch_committed_without_its_snapshot_in_a_new_one(
        home: Path, tmp_path: Path) -> None:
    from skyferry.ops.repair import repair_dataset

    _commit(tmp_path, "a", 400, 0)
    second = _commit(tmp_path, "b", 300, 1_000)
    for path in home.rglob("000000000001.json"):  # as if the commit stopped at its manifest
        path.unlink()
    assert [e.rows for e in _log().entries(_log().sequence())] == [400]
    reader = TrainingReader(ReaderConfig("ss", cache_dir=tmp_path / "cache"))
    assert len(_ids(list(reader))) == 400  # the newest snapshot lacks the batch

    report = repair_dataset(load_topology(), "ss")
    assert report.snapshot_added == [second.batch_id] and report.verdict == "healthy"
    head = _log().resolve(None)
    assert head is not None and (head.seq, head.rows) == (1, 700)
    assert repair_dataset(load_topology(), "ss").snapshot_added == []  # nothing more to add


def test_tags_rollback_quarantine_diff_and_as_of(home: Path, tmp_path: Path) -> None:
    import json
    from datetime import datetime

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from skyferry.cli import app

    runner = CliRunner()

    def cli(*args: str) -> str:
        done = runner.invoke(app, list(args))
        assert done.exit_code == 0, done.output
        return done.output

    def exported(*args: str) -> list[int]:
        out = tmp_path / "out.parquet"
        cli("export", "ss", "--to", str(out), *args)
        return sorted(pq.read_table(out).column("id").to_pylist())

    first = _commit(tmp_path, "a", 300, 0)
    cli("tag", "ss", "v1")
    at_tag = exported("--snapshot", "v1")
    between = datetime.now().astimezone().isoformat()
    second = _commit(tmp_path, "b", 200, 1_000)
    _commit(tmp_path, "c", 100, 2_000)
    _commit(tmp_path, "d", 50, 3_000)
    assert exported("--snapshot", "v1") == at_tag == list(range(300))  # 3 commits later
    assert exported("--as-of", between) == at_tag
    assert len(exported()) == 650
    again = runner.invoke(app, ["tag", "ss", "v1"])
    assert again.exit_code == 2 and "has a tag 'v1' already" in again.output

    changes = json.loads(cli("diff", "ss", "v1", "3", "--json"))
    assert changes["batches_added"][0] == second.batch_id and changes["rows_added"] == 350
    assert changes["rows_removed"] == 0 and len(changes["sources_added"]) == 3

    # a state saved before the quarantine resumes after it on its own snapshot
    options = {"dataset": "ss", "batch_size": 50, "cache_dir": tmp_path / "cache"}
    whole = _ids(list(TrainingReader(ReaderConfig(**options))))  # type: ignore[arg-type]
    reader = TrainingReader(ReaderConfig(**options))  # type: ignore[arg-type]
    tables = iter(reader)
    head = _ids([next(tables) for _ in range(4)])
    state = reader.state_dict()
    cli("quarantine", "ss", "--batch", second.batch_id)
    assert len(exported()) == 450 and not set(exported()) & set(range(1_000, 1_200))
    resumed = TrainingReader(ReaderConfig(**options))  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert head + _ids(list(resumed)) == whole
    _commit(tmp_path, "e", 10, 4_000)  # a commit after a quarantine keeps it hidden
    assert len(exported()) == 460
    cli("quarantine", "ss", "--batch", second.batch_id, "--release")
    assert len(exported()) == 660

    rolled = cli("rollback", "ss", "--to", "v1")
    assert "holds 1 batches, 300 rows" in rolled
    assert exported() == at_tag
    log = _log()
    newest = log.resolve(None)
    assert newest is not None and newest.operation == "rollback"
    assert [b.batch_id for b in log.batches(newest.seq)] == [first.batch_id]
    cli("rollback", "ss", "--to", str(newest.seq - 1))  # nothing was deleted: all back
    assert len(exported()) == 660
    bad = runner.invoke(app, ["export", "ss", "--to", str(tmp_path / "x.parquet"),
                              "--as-of", "yesterday"])
    assert bad.exit_code == 2 and "is not a time" in bad.output


def test_an_append_after_the_catalog_lost_its_newest_entry_takes_the_next_number(
        home: Path, tmp_path: Path) -> None:
    _commit(tmp_path, "a", 100, 0)
    _commit(tmp_path, "b", 100, 1_000)
    log = _log()
    kept = log.entry(1)
    (home / "catalog" / "snapshots" / "ss" / "000000000001.json").unlink()
    _commit(tmp_path, "c", 100, 2_000)  # the nodes hold 1: the append lists every place
    log = _log()
    assert log.sequence() == [0, 1, 2]
    assert log.entry(1) == kept and log.entry(2).parent == kept.id
    assert log.entry(2).rows == 300


def test_a_state_resumes_after_a_commit_and_a_quarantine_on_any_world_size(
        home: Path, tmp_path: Path) -> None:
    _commit(tmp_path, "a", 1_500, 0)
    second = _commit(tmp_path, "b", 1_000, 10_000)
    options = {"dataset": "ss", "batch_size": 64, "seed": 5, "cache_dir": tmp_path / "cache"}

    def reader(rank: int, world: int) -> TrainingReader:
        return TrainingReader(ReaderConfig(**options, rank=rank,  # type: ignore[arg-type]
                                           world_size=world))

    whole = {r: _ids(list(reader(r, 2))) for r in (0, 1)}  # uninterrupted, world size 2
    alone = _ids(list(reader(0, 1)))  # uninterrupted, world size 1
    assert sorted(alone) == sorted(whole[0] + whole[1])
    heads, states = {}, {}
    for rank in (0, 1):
        started = reader(rank, 2)
        batches = iter(started)
        heads[rank] = _ids([next(batches) for _ in range(5)])
        states[rank] = started.state_dict()
        started.close()
    _commit(tmp_path, "c", 500, 20_000)  # the scheduled ingest commits
    log = _log()
    log.append("quarantine", quarantine=[second.batch_id], note="bad batch")
    newest = log.resolve(None)
    assert newest is not None and newest.rows == 2_000  # the quarantine is in the newest

    for rank in (0, 1):  # the same world size: each rank goes on where it stopped
        resumed = reader(rank, 2)
        resumed.load_state_dict(states[rank])
        assert heads[rank] + _ids(list(resumed)) == whole[rank]
    resumed = reader(0, 1)  # another world size: the rows after both ranks' 5 batches
    resumed.load_state_dict(states[0])
    rest = _ids(list(resumed))
    assert rest == alone[len(alone) - len(rest):]
    assert sorted(heads[0] + heads[1] + rest) == sorted(alone)
