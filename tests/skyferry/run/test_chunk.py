"""The chunk sequence without Prefect: bytes in, verified replicas out, failures named once."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyferry.config import PipelineConfig
from skyferry.distribute.probe import probe_nodes
from skyferry.errors import QuorumNotMetError, SourceChangedError, StageError, is_transient
from skyferry.hashing import content_hash
from skyferry.run import chunk as sequence
from skyferry.run.batch import new_source_files, plan_batch
from skyferry.run.chunk import ChunkProgress, Ingested, Processed, move_chunk
from skyferry.run.context import BatchRun
from tests.helpers.sf_data import SCHEMA_YAML, replica_digest, write_ml_csv


def _batch(source: Path, dataset: str, **options: object) -> BatchRun:
    from skyferry.run.context import open_run

    setup = open_run(PipelineConfig(source=str(source), dataset=dataset, **options))
    probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
    return plan_batch(setup, new_source_files(setup).files)


def test_one_call_stores_what_the_stages_store_one_by_one(home: Path, tmp_path: Path) -> None:
    write_ml_csv(tmp_path / "s" / "a.csv", 3_000, seed=4, bad_rows=True)
    (tmp_path / "schema.yaml").write_text(SCHEMA_YAML)
    run = _batch(tmp_path / "s", "seq", chunk_size="16KB",
                 schema_path=str(tmp_path / "schema.yaml"))
    try:
        assert len(run.plan.chunks) > 3
        rows_in = rows_out = rows_rejected = 0
        for chunk in run.plan.chunks:
            stored, timings, started_at = move_chunk(chunk, run)
            assert started_at == "ingestion" and set(timings) == set(sequence.STAGES)
            stepped = sequence.process(sequence.ingest(chunk, run), run)
            assert stepped.record.digest == stored.digest == content_hash(stepped.data)
            assert len(stored.verified) == 3
            for replica in stored.verified:
                assert replica_digest(home, replica.node, stored.key) == stored.digest
            rows_in += stored.rows_in
            rows_out += stored.rows_out
            rows_rejected += stored.rows_rejected
        assert rows_out == 3_000 and rows_rejected == 2 and rows_in == rows_out + rows_rejected
    finally:
        run.close()


def test_a_retry_resumes_at_the_stage_that_failed(home: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_ml_csv(tmp_path / "a.csv", 500, seed=5)
    run = _batch(tmp_path / "a.csv", "resume")
    chunk = run.plan.chunks[0]
    for name in chunk.nodes + tuple(n.name for n in run.setup.topology.nodes):
        run.setup.health.mark(name, "down", "taken down by the test")  # no node can take it
    progress = ChunkProgress()
    try:
        with pytest.raises(StageError) as failed:
            move_chunk(chunk, run, 1, progress)
        error = failed.value
        assert (error.stage, error.chunk, error.dataset, error.batch_id) == (
            "distribution", chunk.index, "resume", run.plan.batch_id)
        assert isinstance(error.__cause__, QuorumNotMetError) and is_transient(error)
        assert progress.stage == "distribution" and isinstance(progress.value, Processed)
        processed_digest = progress.value.record.digest
        reads: list[int] = []
        real_read = sequence.read_chunk
        monkeypatch.setattr(sequence, "read_chunk",
                            lambda c, o=None: reads.append(c.index) or real_read(c, o))
        # attempt 2 re-probes the planned nodes (they answer) and starts at distribution
        stored, timings, started_at = move_chunk(chunk, run, 2, progress)
        assert reads == [] and started_at == "distribution"
        assert stored.attempts == 2 and len(stored.verified) == 3
        assert stored.digest == processed_digest and progress.value is None
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
    finally:
        run.close()


def test_binary_passes_through_byte_for_byte(home: Path, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "b.bin").write_bytes(data)
    run = _batch(tmp_path / "b.bin", "bin", chunk_size=1_000, format="binary")
    try:
        ingested = sequence.ingest(run.plan.chunks[1], run)
        assert isinstance(ingested, Ingested) and b"".join(ingested.pieces) == data[1000:2000]
        processed = sequence.process(ingested, run)
        assert bytes(processed.data) == data[1000:2000]
        assert processed.record.digest == content_hash(data[1000:2000])
        stored, _, _ = move_chunk(run.plan.chunks[1], run)
        assert stored.digest == content_hash(data[1000:2000])
    finally:
        run.close()
