"""The one sequence a chunk walks: ingest → process → write replicas.

Each stage is a plain function that takes the previous stage's output as a value (the
chunk's bytes and a small record) and returns its own. :func:`move_chunk` walks a chunk
through all of them in one call; Prefect's tasks (one per chunk, or one per stage) and the
benchmark's plain baseline call these functions, and nothing else holds the sequence.
Journaling the stored chunk is the caller's: see :func:`skyferry.run.batch.journal_chunk`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from skyferry.errors import StageError
from skyferry.hashing import content_hash
from skyferry.ingest.read import read_chunk, with_headers
from skyferry.models import ChunkPlan, IngestedChunk, ProcessedChunk, StoredChunk
from skyferry.process.clean import process_parts
from skyferry.run.context import BatchRun

__all__ = ["STAGES", "ChunkProgress", "Ingested", "Moved", "Processed", "ingest", "move_chunk",
           "next_stage", "process", "run_stage", "write_replicas"]

STAGES = ("ingestion", "processing", "distribution")

T = TypeVar("T")

Moved = tuple[StoredChunk, dict[str, list[float]], str]
"""A moved chunk: the stored record; per stage, ``[bytes, seconds]``; and the stage the
attempt started at (where a retry resumed, so where its retries are counted)."""


@dataclass(frozen=True, eq=False)
class Ingested:
    """A chunk's source bytes, one piece per part, and their record."""

    record: IngestedChunk
    pieces: list[bytes]


@dataclass(frozen=True, eq=False)
class Processed:
    """A chunk's stored form (Parquet, or a binary chunk's own bytes) and its record."""

    record: ProcessedChunk
    data: pa.Buffer | bytes


def ingest(chunk: ChunkPlan, run: BatchRun, attempt: int = 1) -> Ingested:
    """Read the chunk's parts with one ranged read each, and hash them."""
    pieces, digest = read_chunk(chunk, run.config.source_options)
    parts = tuple(content_hash(p) for p in pieces) if len(pieces) > 1 else ()
    record = IngestedChunk(plan=chunk, source_digest=digest, bytes_read=chunk.size,
                           part_digests=parts, attempts=attempt)
    return Ingested(record, pieces)


def process(ingested: Ingested, run: BatchRun, attempt: int = 1) -> Processed:
    """Decode, validate, transform and encode the chunk; save its rejected rows.

    A binary chunk passes through unchanged: its content is its source.
    """
    source, chunk = ingested.record, ingested.record.plan
    pieces = ingested.pieces
    if chunk.format == "binary":
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return Processed(ProcessedChunk(
            plan=chunk, source_digest=source.source_digest, digest=source.source_digest,
            size=chunk.size, rows_in=0, rows_out=0, rows_rejected=0,
            part_digests=source.part_digests, attempts=attempt), data)
    options = run.config.source_options
    where = f"chunk {chunk.index} ({chunk.parts[0].source})"
    setup = run.setup
    buffer, out = process_parts(with_headers(chunk, pieces, options), chunk.format,
                                setup.schema, setup.transforms, where, options)
    rejects_key = None
    if out.rejects:
        rejects_key = run.catalog.rejects_key(run.plan.dataset, run.plan.batch_id, chunk.index)
        run.catalog.save_rejects(rejects_key, out.rejects)
    return Processed(ProcessedChunk(
        plan=chunk, source_digest=source.source_digest, digest=content_hash(buffer),
        size=buffer.size, rows_in=out.rows_in, rows_out=sum(out.part_rows),
        rows_rejected=out.rows_rejected, rows_added=out.rows_added,
        rows_dropped=out.rows_dropped, rejects_key=rejects_key,
        part_digests=source.part_digests, part_rows=tuple(out.part_rows), attempts=attempt),
        buffer)


def write_replicas(processed: Processed, run: BatchRun, attempt: int = 1) -> StoredChunk:
    """Write the chunk's replicas concurrently and verify them; W of them must verify.

    A retry (``attempt`` > 1) first re-probes the chunk's planned nodes that are down.
    """
    record, chunk = processed.record, processed.record.plan
    if attempt > 1:
        run.writer.recheck(list(chunk.nodes), run.setup.settings.probe_timeout_s)
    key = run.plan.key(chunk)
    outcome = run.writer.write(chunk.index, key, memoryview(processed.data), record.digest,
                               list(chunk.nodes), run.plan.quorum, run.plan.min_clouds)
    return StoredChunk(
        index=chunk.index, key=key, format=chunk.format, digest=record.digest,
        size=record.size, source_digest=record.source_digest, rows_in=record.rows_in,
        rows_out=record.rows_out, rows_rejected=record.rows_rejected,
        rows_added=record.rows_added, rows_dropped=record.rows_dropped,
        rejects_key=record.rejects_key, parts=chunk.parts,
        part_digests=record.part_digests, part_rows=record.part_rows,
        replicas=tuple(outcome.replicas), node_failures=outcome.node_failures,
        attempts=attempt, md5=outcome.md5, at_risk=outcome.at_risk,
    )


def next_stage(stage: str) -> str | None:
    """The stage after ``stage``, or None after the last."""
    at = STAGES.index(stage)
    return STAGES[at + 1] if at + 1 < len(STAGES) else None


def _index(value: ChunkPlan | Ingested | Processed) -> int:
    return value.index if isinstance(value, ChunkPlan) else value.record.plan.index


def stage_bytes(stage: str, value: Any, out: Any) -> int:
    """The bytes a stage's metrics count: read, processed, or written (every replica)."""
    if stage == "ingestion":
        return int(out.record.bytes_read)
    if stage == "processing":
        return int(value.record.bytes_read)
    return int(out.size * len(out.verified))


def run_stage(stage: str, step: Callable[[Any, BatchRun, int], T], value: Any, run: BatchRun,
              attempt: int = 1) -> T:
    """``step`` (one stage of one chunk) on ``value``. Its failure is raised here, once, as a
    :class:`StageError` that names the stage, the dataset, the batch and the chunk, ``from``
    its cause."""
    try:
        return step(value, run, attempt)
    except Exception as exc:
        raise StageError(str(exc), stage=stage, batch_id=run.plan.batch_id,
                         dataset=run.config.dataset, chunk=_index(value)) from exc


@dataclass(eq=False)
class ChunkProgress:
    """How far one chunk got. Whoever retries the chunk keeps it, so that a retry resumes at
    the stage that failed; a finished move leaves its outcome in ``moved``."""

    stage: str = STAGES[0]
    value: Any = None  # the last finished stage's output, until the chunk is stored
    timings: dict[str, list[float]] = field(default_factory=dict)
    moved: Moved | None = None

    def step(self, stage: str, step: Callable[[Any, BatchRun, int], T], value: Any,
             run: BatchRun, attempt: int) -> T:
        """Run ``stage`` and time it; a later stage resumes from its output."""
        began = time.perf_counter()
        out = run_stage(stage, step, value, run, attempt)
        self.timings[stage] = [stage_bytes(stage, value, out), time.perf_counter() - began]
        self.stage, self.value = next_stage(stage) or stage, out
        return out


def move_chunk(chunk: ChunkPlan, run: BatchRun, attempt: int = 1,
               progress: ChunkProgress | None = None) -> Moved:
    """Walk ``chunk`` through every stage, in one slot of the run's window.

    With ``progress`` from an earlier attempt, start at the stage that failed; without
    it, start over.
    """
    progress = progress if progress is not None else ChunkProgress()
    started_at = progress.stage
    with run.setup.window:  # a slot, for as long as the chunk's bytes are here
        if progress.stage == "ingestion":
            progress.step("ingestion", ingest, chunk, run, attempt)
        if progress.stage == "processing":
            progress.step("processing", process, progress.value, run, attempt)
        stored = progress.step("distribution", write_replicas, progress.value, run, attempt)
    moved: Moved = (stored, dict(progress.timings), started_at)
    progress.value, progress.moved = None, moved
    return moved
