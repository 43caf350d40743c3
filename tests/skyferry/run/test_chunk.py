"""The chunk sequence without Prefect: a stream from the source to verified replicas, failures
named once, in the stage they happened in."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from skyferry.config import PipelineConfig, get_settings
from skyferry.distribute.probe import probe_nodes
from skyferry.errors import QuorumNotMetError, SourceChangedError, StageError, is_transient
from skyferry.hashing import content_hash
from skyferry.ingest import read as source_read
from skyferry.run import chunk as sequence
from skyferry.run.batch import new_source_files, plan_batch
from skyferry.run.chunk import ChunkProgress, move_chunk
from skyferry.run.context import BatchRun
from tests.helpers.sf_data import SCHEMA_YAML, replica_digest, write_ml_csv


def _batch(source: Path, dataset: str, **options: object) -> BatchRun:
    from skyferry.run.context import open_run

    setup = open_run(PipelineConfig(source=str(source), dataset=dataset, **options))
    probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
    return plan_batch(setup, new_source_files(setup).files)


def _replica_table(home: Path, node: str, key: str) -> pa.Table:
    return pq.read_table(home / "nodes" / node / key)


@pytest.mark.parametrize("block", ["64KiB", "4MiB"])
def test_a_chunk_streamed_in_blocks_stores_every_row_once(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: str) -> None:
    monkeypatch.setenv("SKYFERRY_BLOCK_SIZE", str(64 << 10 if block == "64KiB" else 4 << 20))
    get_settings.cache_clear()
    write_ml_csv(tmp_path / "s" / "a.csv", 30_000, seed=4, bad_rows=True)
    (tmp_path / "schema.yaml").write_text(SCHEMA_YAML)
    run = _batch(tmp_path / "s", "seq", chunk_size="300KB",
                 schema_path=str(tmp_path / "schema.yaml"))
    try:
        assert len(run.plan.chunks) > 2
        rows_in = rows_out = rows_rejected = 0
        ids: list[int] = []
        for chunk in run.plan.chunks:
            stored, timings, started_at = move_chunk(chunk, run)
            assert started_at == "ingestion" and set(timings) == set(sequence.CHUNK_STAGES)
            assert timings["ingestion"][0] == chunk.size
            assert timings["distribution"][0] == 3 * stored.size
            source = (tmp_path / "s" / "a.csv").read_bytes()
            assert stored.source_digest == content_hash(b"".join(
                source[p.start:p.end] for p in chunk.parts))
            assert len(stored.verified) == 3
            for replica in stored.verified:
                assert replica_digest(home, replica.node, stored.key) == stored.digest
            table = _replica_table(home, stored.verified[0].node, stored.key)
            assert table.num_rows == stored.rows_out == sum(stored.part_rows)
            ids += table.column("id").to_pylist()
            rows_in += stored.rows_in
            rows_out += stored.rows_out
            rows_rejected += stored.rows_rejected
        assert rows_out == 30_000 and rows_rejected == 2 and rows_in == rows_out + rows_rejected
        assert sorted(ids) == list(range(30_000))
    finally:
        run.close()


def test_a_column_that_widens_in_a_later_block_is_stored_as_one_read_would(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No schema: the first blocks read ``code`` as integers and ``score`` as empty; a later
    one holds ``01`` and ``abc`` and a score. The chunk is encoded again, and stores what a
    read of the whole chunk gives."""
    monkeypatch.setenv("SKYFERRY_BLOCK_SIZE", str(64 << 10))
    get_settings.cache_clear()
    lines = [b"id,code,score"] + [b"%d,%d," % (i, i) for i in range(20_000)]
    lines += [b"20000,01,0.5", b"20001,abc,1"]
    data = b"\n".join(lines) + b"\n"
    (tmp_path / "w.csv").write_bytes(data)
    run = _batch(tmp_path / "w.csv", "widen", chunk_size="10MB")
    try:
        (chunk,) = run.plan.chunks
        stored, _, _ = move_chunk(chunk, run)
    finally:
        run.close()
    whole = pacsv.read_csv(pa.BufferReader(data))
    for replica in stored.verified:
        table = _replica_table(home, replica.node, stored.key)
        assert table.schema.types == whole.schema.types == [pa.int64(), pa.string(),
                                                            pa.float64()]
        assert table.equals(whole)
        assert replica_digest(home, replica.node, stored.key) == stored.digest


def test_a_retry_writes_only_the_replicas_still_missing(home: Path, tmp_path: Path) -> None:
    write_ml_csv(tmp_path / "a.csv", 500, seed=5)
    run = _batch(tmp_path / "a.csv", "resume", quorum=3)
    chunk = run.plan.chunks[0]
    first, second, third = chunk.nodes
    for node in run.setup.topology.nodes:
        if node.name not in (first, second):  # the third planned node and every spare
            run.setup.health.mark(node.name, "down", "taken down by the test")
    progress = ChunkProgress()
    try:
        with pytest.raises(StageError) as failed:
            move_chunk(chunk, run, 1, progress)
        error = failed.value
        assert (error.stage, error.chunk, error.dataset, error.batch_id) == (
            "distribution", chunk.index, "resume", run.plan.batch_id)
        assert isinstance(error.__cause__, QuorumNotMetError) and is_transient(error)
        assert progress.stage == "distribution" and set(progress.done) == {first, second}
        assert progress.expect is not None
        key = run.plan.key(chunk)
        kept = {n: (home / "nodes" / n / key).stat().st_ino for n in (first, second)}
        assert not (home / "nodes" / third / key).exists()
        # attempt 2 re-probes the planned nodes (the third answers) and writes only its replica
        stored, _, started_at = move_chunk(chunk, run, 2, progress)
        assert started_at == "distribution"
        assert stored.attempts == 2 and {r.node for r in stored.verified} == {first, second,
                                                                             third}
        assert (stored.digest, stored.size) == progress.expect
        assert {n: (home / "nodes" / n / key).stat().st_ino for n in kept} == kept
        for replica in stored.verified:
            assert replica_digest(home, replica.node, stored.key) == stored.digest
        assert progress.moved is not None and progress.moved[0] == stored
    finally:
        run.close()


def test_a_source_that_changed_after_planning_fails_ingest_for_good(
        home: Path, tmp_path: Path) -> None:
    source = tmp_path / "a.csv"
    write_ml_csv(source, 2_000, seed=6)
    run = _batch(source, "changed", chunk_size="8KB")
    source.write_bytes(source.read_bytes()[:4_000])  # shrank below the later chunks
    try:
        with pytest.raises(StageError) as failed:
            move_chunk(run.plan.chunks[-1], run)
        assert failed.value.stage == "ingestion" and failed.value.chunk == run.plan.chunks[-1].index
        assert isinstance(failed.value.__cause__, SourceChangedError)
        assert not is_transient(failed.value)
        assert str(source) in str(failed.value)
        assert not any((home / "nodes").rglob("*.bin")) if (home / "nodes").exists() else True
    finally:
        run.close()


def test_a_failing_transform_fails_processing_not_the_stage_around_it(
        home: Path, tmp_path: Path) -> None:
    """The stage is the one whose step raised, not the step that ran last in the stream."""
    write_ml_csv(tmp_path / "a.csv", 500, seed=2)
    run = _batch(tmp_path / "a.csv", "broken", transforms=["tests.helpers.sf_transforms:broken"])
    try:
        with pytest.raises(StageError) as failed:
            move_chunk(run.plan.chunks[0], run)
        assert failed.value.stage == "processing" and failed.value.chunk == 0
        assert "the transform broke (injected)" in str(failed.value)
        # no replica became visible (a sink's temp file is removed by its own thread)
        assert not [p for p in (home / "nodes").rglob("*.parquet")
                    if not p.name.startswith(".tmp-")]
    finally:
        run.close()


def test_a_source_that_changes_between_two_passes_is_refused(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement node is fed by streaming the chunk again: other bytes are refused."""
    data = bytes(range(256)) * 400
    (tmp_path / "b.bin").write_bytes(data)
    run = _batch(tmp_path / "b.bin", "twice", format="binary")
    chunk = run.plan.chunks[0]
    reads: list[int] = []
    real = source_read.read_range

    def flaky_read(url: str, start: int, end: int, options: object = None) -> bytes:
        reads.append(start)
        got = real(url, start, end, options)  # type: ignore[arg-type]
        return got if len(reads) == 1 else bytes([got[0] ^ 1]) + got[1:]

    monkeypatch.setattr(source_read, "read_range", flaky_read)
    victim = run.setup.topology.node(chunk.nodes[0])
    real_writer = type(run.writer.store_of(victim)).writer

    def failing_writer(store, key, **kw):  # type: ignore[no-untyped-def]
        if store.name == victim.name:
            raise OSError("the disk went away (injected)")
        return real_writer(store, key, **kw)

    monkeypatch.setattr(type(run.writer.store_of(victim)), "writer", failing_writer)
    try:
        with pytest.raises(StageError) as failed:
            move_chunk(chunk, run)
        assert isinstance(failed.value.__cause__, SourceChangedError)
        assert "other bytes" in str(failed.value) and len(reads) == 2
    finally:
        run.close()


def test_binary_passes_through_byte_for_byte(home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFERRY_BLOCK_SIZE", str(64 << 10))
    get_settings.cache_clear()
    data = bytes(range(256)) * 2_000
    (tmp_path / "b.bin").write_bytes(data)
    run = _batch(tmp_path / "b.bin", "bin", chunk_size=200_000, format="binary")
    try:
        chunk = run.plan.chunks[1]
        stored, timings, _ = move_chunk(chunk, run)
        assert stored.digest == stored.source_digest == content_hash(data[200_000:400_000])
        assert timings["processing"][1] == 0.0
        for replica in stored.verified:
            assert (home / "nodes" / replica.node / stored.key).read_bytes() == data[
                200_000:400_000]
    finally:
        run.close()
