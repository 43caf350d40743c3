"""The training reader on a committed dataset: every row once across ranks, exact resumes,
no bad byte used, the nearest replica read, and the `skyferry read` command."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from skyferry.cli import app
from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.config import get_settings
from skyferry.errors import IntegrityError, ReadPlanError
from skyferry.read.reader import ReaderConfig, TrainingReader, chunk_files
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

ROWS = 3_000


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> Manifest:
    write_ml_csv(tmp_path / "src" / "a.csv", ROWS, seed=5)
    manifest = commit_without_prefect(tmp_path / "src", "train", chunk_size="20KB")
    assert len(manifest.chunks) >= 5
    return manifest


def _reader(tmp_path: Path, **options: object) -> TrainingReader:
    options.setdefault("cache_dir", tmp_path / "cache")
    return TrainingReader(ReaderConfig("train", **options))  # type: ignore[arg-type]


def _ids(tables: list[pa.Table]) -> list[int]:
    return [i for t in tables for i in t.column("id").to_pylist()]


def test_the_ranks_read_every_row_once_in_equal_shares(committed: Manifest,
                                                      tmp_path: Path) -> None:
    for world in (1, 2, 8):
        for workers in (1, 2):
            shares = []
            for rank in range(world):
                got = []
                for worker in range(workers):
                    reader = _reader(tmp_path, rank=rank, world_size=world, batch_size=32,
                                     seed=9, worker=worker, workers=workers,
                                     remainder="drop")
                    got += _ids(list(reader))
                shares.append(got)
            assert len({len(s) for s in shares}) == 1, (world, workers)
            ids = Counter(i for s in shares for i in s)
            assert max(ids.values()) == 1 and len(ids) == ROWS - ROWS % world
            assert set(ids) <= set(range(ROWS))
    one = _ids(list(_reader(tmp_path, batch_size=32, seed=9)))
    assert sorted(one) == list(range(ROWS))
    assert one == _ids(list(_reader(tmp_path, batch_size=32, seed=9)))  # the same seed
    assert one != _ids(list(_reader(tmp_path, batch_size=32, seed=10)))


def test_a_resume_reads_what_an_uninterrupted_run_would_have(committed: Manifest,
                                                            tmp_path: Path) -> None:
    whole = [_ids(list(_reader(tmp_path, rank=r, world_size=2, batch_size=50, seed=1)))
             for r in range(2)]
    # rank 0 and 1 read 7 batches each, save, and go on: once on 2 ranks, again on 3
    states = []
    for r in range(2):
        reader = _reader(tmp_path, rank=r, world_size=2, batch_size=50, seed=1)
        it = iter(reader)
        for _ in range(7):
            next(it)
        states.append(reader.state_dict())
    assert states[0] == states[1] and len(repr(states[0])) < 1024
    for r in range(2):
        again = _reader(tmp_path, rank=r, world_size=2, batch_size=50, seed=1)
        again.load_state_dict(states[0])
        assert _ids(list(again)) == whole[r][7 * 50:]
    rest = []
    for r in range(3):
        again = _reader(tmp_path, rank=r, world_size=3, batch_size=50, seed=1)
        again.load_state_dict(states[0])
        rest += _ids(list(again))
    remaining = set(range(ROWS)) - {i for r in range(2) for i in whole[r][:7 * 50]}
    assert remaining <= set(rest)  # nothing left out
    pad = (-len(remaining)) % 3  # the padding: the epoch's first rows, read again
    assert len(rest) == len(remaining) + pad
    assert sorted(Counter(rest) - Counter(remaining)) == sorted(whole[0][:pad])


def test_workers_resume_each_from_their_own_state(committed: Manifest, tmp_path: Path) -> None:
    """Two workers of a rank, taken in turn as a data loader takes them; each saves its own
    state after the loader has handed out 5 batches; restored, the turns go on exactly."""
    def worker(w: int) -> TrainingReader:
        return _reader(tmp_path, rank=1, world_size=2, batch_size=40, seed=4, worker=w,
                       workers=2)

    whole = _ids(list(_reader(tmp_path, rank=1, world_size=2, batch_size=40, seed=4)))
    readers = [worker(0), worker(1)]
    streams = [iter(r) for r in readers]
    handed = [next(streams[n % 2]) for n in range(5)]  # batches 0..4: w0, w1, w0, w1, w0
    states = [r.state_dict() for r in readers]
    assert [s["batches"] for s in states] == [5, 4]
    restored = [worker(0), worker(1)]
    for reader, state in zip(restored, states, strict=True):
        reader.load_state_dict(state)
    rest = [iter(r) for r in restored]
    after = []
    for n in range(5, len(whole) // 40 + 1):  # the loader goes on with worker 1's turn
        try:
            after.append(next(rest[n % 2]))
        except StopIteration:
            break
    assert _ids(handed + after) == whole


def test_a_corrupt_and_a_missing_replica_are_read_around_and_noted(
        committed: Manifest, home: Path, tmp_path: Path) -> None:
    rotten, gone = committed.chunks[0], committed.chunks[1]
    reader = _reader(tmp_path, batch_size=64)
    bad_nodes = {}
    for chunk, damage in ((rotten, "flip"), (gone, "delete")):
        node = reader.fetcher.nearest(reader.plan.chunks[[c.index for c in reader.plan.chunks]
                                                        .index(chunk.index)])[0]
        path = home / "nodes" / node / chunk.key
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        bad_nodes[chunk.index] = node
    ids = _ids(list(reader))
    assert sorted(ids) == list(range(ROWS))  # every row, each once, none from a bad replica
    suspects = open_catalog(load_topology()).suspects("train")
    assert {(c, n) for _, c, n in suspects} == set(bad_nodes.items())
    assert len(reader.report.failovers) == 2
    # every replica of a chunk bad: a typed error that names the chunk, no row of it
    for replica in rotten.verified:
        (home / "nodes" / replica.node / rotten.key).write_bytes(b"not the chunk")
    fresh = _reader(tmp_path / "other", batch_size=ROWS)
    with pytest.raises(IntegrityError, match=f"chunk {rotten.index} of train"):
        list(fresh)


def test_a_reader_in_gcp_reads_gcp_replicas_where_they_exist(committed: Manifest,
                                                            tmp_path: Path) -> None:
    reader = _reader(tmp_path, batch_size=100, cloud="gcp")
    assert sorted(_ids(list(reader))) == list(range(ROWS))
    gcp = {n.name for n in load_topology().nodes if n.cloud == "gcp"}
    with_gcp = [c for c in committed.chunks if any(r.node in gcp for r in c.verified)]
    assert with_gcp  # placement put replicas in gcp
    read = reader.report.bytes_from
    # counted per node: the gcp nodes served exactly the chunks that have a gcp replica
    assert sum(b for n, b in read.items() if n in gcp) == sum(c.size for c in with_gcp)
    assert sum(b for n, b in read.items() if n not in gcp) == sum(
        c.size for c in committed.chunks if c not in with_gcp)
    assert reader.report.cross_cloud_bytes == sum(
        c.size for c in committed.chunks if c not in with_gcp)
    # a second reader on the machine finds every chunk in the cache: nothing read again
    again = _reader(tmp_path, batch_size=100, cloud="gcp")
    list(again)
    assert dict(again.report.bytes_from) == {}
    assert again.report.cache_hits == len(committed.chunks)


def test_the_cache_keeps_to_its_limit_and_refetches_a_damaged_copy(
        committed: Manifest, tmp_path: Path) -> None:
    biggest = max(c.size for c in committed.chunks)
    reader = _reader(tmp_path, batch_size=500, cache_limit=2 * biggest)
    ids = _ids(list(reader))
    assert sorted(ids) == list(range(ROWS))
    # a chunk's files (Parquet and decoded) go together; only the chunk in use may overflow
    held = Counter[str]()
    for path in (tmp_path / "cache").iterdir():
        if path.suffix in (".chunk", ".arrow"):
            held[path.name.split(".")[0]] += path.stat().st_size
    assert len(held) == 1 or sum(held.values()) <= 2 * biggest
    cached = list((tmp_path / "cache").glob("*.chunk"))
    assert {p.name.split(".")[0] for p in cached} == set(held)
    damaged = cached[0]
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    files, report = chunk_files("train", cache_dir=tmp_path / "cache")
    assert len(files) == len(committed.chunks)
    assert report.fetched >= 1
    table = pq.read_table(files)  # the file list opens as one table: every row
    assert sorted(table.column("id").to_pylist()) == list(range(ROWS))
    with pytest.raises(ReadPlanError, match="do not fit in a cache"):
        chunk_files("train", cache_dir=tmp_path / "cache", cache_limit=biggest)
    urls, _ = chunk_files("train", verify=False, cloud="azure")
    assert all(u.startswith("file://") for u in urls) and len(urls) == len(files)
    in_azure = [c for c in committed.chunks if any(r.node == "azure-node-1" for r in c.verified)]
    assert in_azure and len([u for u in urls if "/azure-node-1/" in u]) == len(in_azure)


def test_skyferry_read_writes_a_ranks_rows_in_order(committed: Manifest, tmp_path: Path) -> None:
    out = tmp_path / "rank1.parquet"
    result = CliRunner().invoke(app, ["read", "train", "--rank", "1", "--world-size", "4",
                                      "--seed", "3", "--batch-size", "40", "--to", str(out),
                                      "--cache-dir", str(tmp_path / "cache"), "--no-decoded"])
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "cache").glob("*.arrow"))  # --no-decoded: Parquet files only
    expected = _ids(list(_reader(tmp_path, rank=1, world_size=4, seed=3, batch_size=40)))
    assert pq.read_table(out).column("id").to_pylist() == expected
    assert pq.ParquetFile(out).metadata.num_row_groups == 1  # not a row group per batch
    assert f"{len(expected)} rows" in result.output
    bad = CliRunner().invoke(app, ["read", "train", "--rank", "4", "--world-size", "4",
                                   "--to", str(out)])
    assert bad.exit_code != 0 and "rank 4 is not in a world of 4" in bad.output
    assert "Traceback" not in bad.output


def test_the_decoded_copies_give_the_parquet_files_rows_and_a_damaged_one_is_made_again(
        committed: Manifest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    options = {"rank": 1, "world_size": 2, "batch_size": 70, "seed": 4}
    decoded = list(_reader(tmp_path, **options))
    parquet = list(_reader(tmp_path / "parquet-only", decoded=False, **options))
    assert [t.num_rows for t in decoded] == [t.num_rows for t in parquet]
    assert pa.concat_tables(decoded).equals(pa.concat_tables(parquet))  # values, order, types
    cache = tmp_path / "cache"
    assert len(list(cache.glob("*.arrow"))) == len(committed.chunks)
    assert not list((tmp_path / "parquet-only").glob("*.arrow"))

    copy = cache / f"{committed.chunks[0].digest}.arrow"
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of the rows
    copy.write_bytes(bytes(data))
    again = _reader(tmp_path, **options)
    assert pa.concat_tables(list(again)).equals(pa.concat_tables(parquet))
    assert again.report.fetched == 0  # made again from the verified Parquet file
    assert "decoded copy of chunk 0 of train" in caplog.text
    assert bytes(data) != copy.read_bytes()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), block_rows=st.sampled_from([7, 64, 500, 4096]),
       start=st.integers(0, 2_000), size=st.integers(1, 2_500), decoded=st.booleans())
def test_rows_taken_across_row_groups_are_the_chunks_rows_in_the_plans_order(
        grouped: Manifest, tmp_path: Path, seed: int, block_rows: int, start: int, size: int,
        decoded: bool) -> None:
    reader = _reader(tmp_path, seed=seed, block_rows=block_rows, decoded=decoded)
    try:
        got = pa.concat_tables(list(reader.span(start, start + size)))
        whole = {c.digest: pq.read_table(reader.fetcher.local(c)) for c in reader.plan.chunks}
        expected = pa.concat_tables([whole[p.chunk.digest].take(p.rows)
                                     for p in reader.plan.order(start, start + size)])
    finally:
        reader.close()
    assert got.num_rows == size
    assert got.equals(expected.cast(got.schema))


@pytest.fixture
def grouped(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Manifest:
    """A dataset whose chunks hold several row groups each (64 kB blocks)."""
    monkeypatch.setenv("SKYFERRY_BLOCK_SIZE", str(64 << 10))
    get_settings.cache_clear()
    write_ml_csv(tmp_path / "src" / "a.csv", 12_000, seed=9)  # about 370 kB
    manifest = commit_without_prefect(tmp_path / "src", "train", chunk_size="150KB")
    files, _ = chunk_files("train", cache_dir=tmp_path / "check")
    assert len(files) >= 2 and all(pq.ParquetFile(f).num_row_groups > 1 for f in files)
    return manifest
