"""Tables other engines read: a snapshot published as Iceberg and Delta tables over its
replicas gives DuckDB, Polars, pyiceberg and deltalake the rows `skyferry export` gives, and
nothing the table engines do (expiring snapshots, cleaning the log, vacuum) deletes a
replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import duckdb_ext
import polars as pl
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from typer.testing import CliRunner

from skyferry.cli import app
from skyferry.commit.manifest import Manifest
from skyferry.errors import TableError
from skyferry.ops.export import export_dataset
from skyferry.ops.gc import collect_garbage
from skyferry.ops.tables import iceberg_catalog, publish_tables
from skyferry.ops.verify import verify_dataset
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, replica_digest, write_ml_csv

runner = CliRunner()


def _commit(tmp_path: Path, name: str, rows: int, start: int) -> Manifest:
    write_ml_csv(tmp_path / name / "part.csv", rows, seed=start, start_id=start)
    return commit_without_prefect(tmp_path / name, "tb", chunk_size="30KB")


def _rows(table: Any) -> list[dict[str, Any]]:
    """A table's rows, by id (every engine in its own order)."""
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    return sorted(table.to_pylist(), key=lambda r: r["id"])


def _exported(tmp_path: Path, snapshot: str | None = None) -> list[dict[str, Any]]:
    out = tmp_path / "export.parquet"
    export_dataset("tb", out, snapshot=snapshot)
    return _rows(pq.read_table(out))


def _duckdb() -> duckdb.DuckDBPyConnection:
    """DuckDB with its Iceberg and Delta extensions from their wheels (no download)."""
    con = duckdb.connect()
    con.execute("SET extension_directory = ?",
                (str(Path(list(duckdb_ext.__path__)[0]) / "extensions"),))
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("LOAD iceberg")
    con.execute("LOAD delta")
    return con


def _duck_rows(con: duckdb.DuckDBPyConnection, query: str) -> list[dict[str, Any]]:
    return _rows(con.execute(query).fetch_arrow_table())


def _covered(manifests: list[Manifest], cloud: str) -> bool:
    return all(any(r.cloud == cloud for r in c.verified) for m in manifests for c in m.chunks)


def _digests(home: Path, manifests: list[Manifest]) -> dict[str, str | None]:
    return {f"{r.node}:{c.key}": replica_digest(home, r.node, c.key)
            for m in manifests for c in m.chunks for r in c.verified}


def test_every_engine_reads_the_snapshot_and_no_table_operation_deletes_a_replica(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")  # its plugin is not installed
    first = _commit(tmp_path, "a", 400, 0)
    second = _commit(tmp_path, "b", 300, 1_000)
    topology = load_topology()
    done = runner.invoke(app, ["tables", "tb"])
    assert done.exit_code == 0, done.output
    report = publish_tables(topology, "tb")  # again: the same snapshot, no change
    clouds = [c for c in topology.clouds if _covered([first, second], c)]
    assert clouds and [p.split("__")[-1] for p in report.published
                       if p.startswith("iceberg")] == clouds
    expected = _exported(tmp_path)
    assert len(expected) == 700
    con = _duckdb()
    tables = iceberg_catalog(topology)
    for cloud in clouds:
        table = tables.load_table(f"skyferry.tb__{cloud}")
        assert table.properties["skyferry.snapshot"] == report.snapshot
        assert _rows(table.scan().to_arrow()) == expected
        assert _duck_rows(con, f"SELECT * FROM iceberg_scan('{table.metadata_location}')") \
            == expected
        assert _rows(pl.scan_iceberg(table).collect()) == expected
    deltas = [line.split(" ", 1)[1] for line in report.published if line.startswith("delta")]
    assert deltas  # a node of a covered cloud holds every chunk (the default placement)
    for root in deltas:
        assert _rows(DeltaTable(root).to_pyarrow_table()) == expected
        assert _duck_rows(con, f"SELECT * FROM delta_scan('{root}')") == expected
        assert _rows(pl.read_delta(root)) == expected
    before = _digests(home, [first, second])
    assert None not in before.values()

    # a rollback, published: the tables follow the snapshot, and expiring the tables' own
    # history or vacuuming them deletes no replica
    assert runner.invoke(app, ["rollback", "tb", "--to", "0"]).exit_code == 0
    rolled = publish_tables(topology, "tb")
    only_first = _exported(tmp_path)
    assert len(only_first) == 400
    for cloud in clouds:
        table = tables.load_table(f"skyferry.tb__{cloud}")
        assert _rows(table.scan().to_arrow()) == only_first
        older = [s.snapshot_id for s in table.snapshots()
                 if s.snapshot_id != table.current_snapshot().snapshot_id]
        assert older
        table.maintenance.expire_snapshots().by_ids(older).commit()
        assert len(tables.load_table(f"skyferry.tb__{cloud}").snapshots()) == 1
    for line in rolled.published:
        if line.startswith("delta"):
            table = DeltaTable(line.split(" ", 1)[1])
            assert _rows(table.to_pyarrow_table()) == only_first
            table.cleanup_metadata()
            assert table.vacuum(dry_run=False) == []
            with pytest.raises(Exception, match="retention"):
                table.vacuum(retention_hours=0, dry_run=False)
    assert _digests(home, [first, second]) == before
    assert collect_garbage(topology, grace_s=0).deleted == []  # the Delta log is not garbage
    assert verify_dataset(topology, "tb").orphans == []
    assert _exported(tmp_path, "1") == expected  # the rolled-back batch is all there


def test_a_snapshot_a_table_cannot_show_is_refused_by_name(home: Path, tmp_path: Path) -> None:
    import os
    import time

    folder = tmp_path / "src"
    write_ml_csv(folder / "keep.csv", 100, seed=1)
    write_ml_csv(folder / "part.csv", 100, seed=2, start_id=1_000)
    first = commit_without_prefect(folder, "sv", chunk_size="1MB")
    assert [len(c.parts) for c in first.chunks] == [2]  # both files in one chunk
    write_ml_csv(folder / "part.csv", 50, seed=3, start_id=2_000)  # rewritten: supersedes
    os.utime(folder / "part.csv", (time.time() + 10, time.time() + 10))
    commit_without_prefect(folder, "sv", chunk_size="1MB")
    with pytest.raises(TableError, match="superseded"):
        publish_tables(load_topology(), "sv")
    assert len(_rows(pq.read_table(_export_sv(tmp_path)))) == 150  # readers skip those rows
    with pytest.raises(TableError, match="unknown table format parquet"):
        publish_tables(load_topology(), "sv", formats=["parquet"])


def _export_sv(tmp_path: Path) -> Path:
    out = tmp_path / "sv.parquet"
    export_dataset("sv", out)
    return out
