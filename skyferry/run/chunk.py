"""The one sequence a chunk walks: read → hash → process → write replicas, as one stream.

A chunk's bytes flow in record-aligned blocks of a few MB (``Settings.block_size``): each
block is read with a ranged read and hashed, decoded and written as a Parquet row group (a
binary block passes unchanged), and the output goes to every replica's streamed upload as
it is produced. Memory is a few blocks per chunk in flight, not the chunk.

The three stages overlap in time, so each one's figure is the time spent in it: reading
and hashing, decoding and encoding, and handing blocks to the replicas and waiting for
them to be committed and verified. :func:`move_chunk` is the only entry: Prefect's tasks
and the benchmark's plain baseline call it, and nothing else holds the sequence.
Journaling the stored chunk is the caller's: see :func:`skyferry.run.batch.journal_chunk`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from skyferry.distribute.replication import FanOut, WriteOutcome
from skyferry.errors import QuorumNotMetError, StageError
from skyferry.evolution import encode_schema
from skyferry.ingest.read import SourceStream
from skyferry.models import ChunkPlan, StoredChunk
from skyferry.process.clean import ChunkEncoder, ProcessOutput
from skyferry.process.encode import SchemaDrift
from skyferry.run.context import BatchRun
from skyferry.run.sealing import Sealer, Sealing, chunk_context
from skyferry.stages import Stage

__all__ = ["CHUNK_STAGES", "ChunkProgress", "Moved", "move_chunk"]

logger = logging.getLogger("skyferry.run")

CHUNK_STAGES: tuple[Stage, ...] = ("ingestion", "processing", "distribution")
"""The stages a chunk's move measures; storage (its journal and the commit) is the run's."""

Moved = tuple[StoredChunk, dict[Stage, list[float]], Stage]
"""A moved chunk: the stored record; per stage, ``[bytes, seconds]``; and the stage the
attempt started at (where a retry resumed, so where its retries are counted)."""


@dataclass(eq=False)
class ChunkProgress:
    """How far one chunk got. Whoever retries the chunk keeps it: a retry after a write that
    missed its quorum writes only the replicas still missing (the chunk is streamed from
    its source again, and must hash the same); a finished move leaves its outcome in
    ``moved``."""

    stage: Stage = "ingestion"
    done: tuple[str, ...] = ()  # nodes holding a verified replica from an earlier attempt
    expect: tuple[str, int] | None = None  # the chunk's (digest, size), once produced
    columns: Any = None  # the Parquet columns, when the chunk's had to widen
    sealing: Sealing | None = None  # encrypted: the chunk's data key, for every attempt
    timings: dict[Stage, list[float]] = field(default_factory=dict)
    moved: Moved | None = None


class _Sections:
    """The stage a failure was raised in: the innermost stage section it passed through.

    Each step of a pass runs inside ``with sections(stage)``; a failure raised outside every
    section (the replica writer's commits, verification and quorum) is distribution's.
    """

    def __init__(self) -> None:
        self._raised: dict[int, tuple[BaseException, Stage]] = {}

    @contextmanager
    def __call__(self, stage: Stage) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            self._raised.setdefault(id(exc), (exc, stage))  # the innermost section's
            raise

    def stage_of(self, exc: BaseException | None) -> Stage:
        while exc is not None:  # the failure, or what it was raised from
            if id(exc) in self._raised:
                return self._raised[id(exc)][1]
            exc = exc.__cause__
        return "distribution"


class _Stream:
    """One pass of a chunk: its source blocks, through the encoder, into a fan-out."""

    def __init__(self, chunk: ChunkPlan, run: BatchRun) -> None:
        self.chunk, self.run = chunk, run
        self.sections = _Sections()
        self.columns: Any = None  # the Parquet columns, once a pass found they must widen
        self.source: SourceStream | None = None
        self.out: ProcessOutput | None = None
        self.seconds: dict[Stage, float] = {stage: 0.0 for stage in CHUNK_STAGES}
        self._writing = 0.0  # time of this pass spent handing blocks to the replicas
        self.sealing: Sealing | None = None
        self.sealer: Sealer | None = None  # this pass's encryption, when the run encrypts

    def __call__(self, fan: FanOut) -> None:
        run, chunk = self.run, self.chunk
        self._writing = 0.0
        self.sections = _Sections()  # an earlier pass's failures (a drift) are not kept
        if self.sealing is not None:  # a binary chunk's plaintext hash is its source hash
            self.sealer = self.sealing.sealer(
                chunk_context(run.plan.key(chunk), run.plan.batch_id),
                hash_plain=chunk.format != "binary")
        with self.sections("ingestion"):
            source = SourceStream(chunk, run.config.source_options,
                                  run.setup.settings.block_size)
        if chunk.format == "binary":
            for block in self._blocks(source):
                self._put(fan, block.data)
            self._seal(fan)
            self.source, self.out = source, ProcessOutput()
            self._account(source, 0.0)
            return
        with self.sections("processing"):
            encoder = ChunkEncoder(chunk.format, run.setup.schema, run.setup.transforms,
                                   f"chunk {chunk.index} ({chunk.parts[0].source})",
                                   run.config.source_options, _Output(self, fan), self.columns)
        for block in self._blocks(source):
            with self.sections("processing"):
                encoder.add(block.part, block.data, block.header, block.offset)
        with self.sections("processing"):
            out = encoder.close(chunk.parts)
        self._seal(fan)
        self.source, self.out = source, out
        self._account(source, encoder.seconds)

    def _blocks(self, source: SourceStream) -> Iterator[Any]:
        """The source's blocks, each read (and hashed) in the ingestion section."""
        blocks = iter(source)
        while True:
            with self.sections("ingestion"):
                block = next(blocks, None)
            if block is None:
                return
            yield block

    def _account(self, source: SourceStream, processing: float) -> None:
        self.seconds["ingestion"] += source.seconds
        self.seconds["processing"] += max(0.0, processing - self._writing)

    def _put(self, fan: FanOut, data: Any) -> None:
        began = time.perf_counter()
        with self.sections("distribution"):
            fan.write(data if self.sealer is None else self.sealer.update(data))
        self._writing += time.perf_counter() - began

    def _seal(self, fan: FanOut) -> None:
        """The last segment, when the pass encrypts."""
        if self.sealer is None:
            return
        began = time.perf_counter()
        with self.sections("distribution"):
            fan.write(self.sealer.finish())
        self._writing += time.perf_counter() - began


class _Output:
    """The file the Parquet writer writes to: the chunk's fan-out."""

    def __init__(self, stream: _Stream, fan: FanOut) -> None:
        self.stream, self.fan, self.closed, self._at = stream, fan, False, 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.stream._put(self.fan, data)
        self._at += size
        return size

    def tell(self) -> int:
        return self._at

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _store(chunk: ChunkPlan, run: BatchRun, attempt: int, progress: ChunkProgress,
           stream: _Stream) -> StoredChunk:
    if attempt > 1 and progress.stage == "distribution":
        run.writer.recheck(list(chunk.nodes), run.setup.settings.probe_timeout_s)
    key = run.plan.key(chunk)
    stream.columns = progress.columns
    if run.setup.keyring is not None and progress.sealing is None:
        progress.sealing = Sealing(run.setup.keyring)
    stream.sealing = progress.sealing
    began = time.perf_counter()
    try:
        while True:
            try:
                outcome = run.writer.write(chunk.index, key, stream, list(chunk.nodes),
                                           run.plan.quorum, run.plan.min_clouds,
                                           done=progress.done, expect=progress.expect)
                break
            except SchemaDrift as drift:
                logger.info("chunk %s: its columns widen to %s; it is encoded again",
                            chunk.index, drift.schema)
                stream.columns = progress.columns = drift.schema
                if progress.sealing is not None:  # other plaintext: never the same nonces
                    progress.sealing.renew()
    finally:  # the rest of the write's time: handing blocks over, commits, verification
        stream.seconds["distribution"] = max(0.0, time.perf_counter() - began - stream.seconds[
            "ingestion"] - stream.seconds["processing"])
    return _record(chunk, run, key, attempt, stream, outcome)


def _record(chunk: ChunkPlan, run: BatchRun, key: str, attempt: int, stream: _Stream,
            outcome: WriteOutcome) -> StoredChunk:
    source, out = stream.source, stream.out
    assert source is not None and out is not None
    rejects_key = None
    if out.rejects:
        rejects_key = run.catalog.rejects_key(run.plan.dataset, run.plan.batch_id, chunk.index)
        run.catalog.save_rejects(rejects_key, out.rejects)
    binary = chunk.format == "binary"
    return StoredChunk(
        index=chunk.index, key=key, format=chunk.format, digest=outcome.digest,
        size=outcome.size, source_digest=source.digest, rows_in=out.rows_in,
        rows_out=sum(out.part_rows), rows_rejected=out.rows_rejected,
        rows_added=out.rows_added, rows_dropped=out.rows_dropped, rejects_key=rejects_key,
        parts=chunk.parts, part_digests=source.part_digests,
        part_rows=() if binary else tuple(out.part_rows), replicas=tuple(outcome.replicas),
        node_failures=outcome.node_failures, attempts=attempt, md5=outcome.md5,
        at_risk=outcome.at_risk,
        sealed=(stream.sealer.record(source.digest if binary else None)
                if stream.sealer is not None else None),
        columns=encode_schema(out.columns) if out.columns is not None else None,
    )


def move_chunk(chunk: ChunkPlan, run: BatchRun, attempt: int = 1,
               progress: ChunkProgress | None = None) -> Moved:
    """Stream ``chunk`` from its source to its replicas, in one slot of the run's window.

    A failure is raised once, as a :class:`StageError` naming the stage it happened in, the
    dataset, the batch and the chunk, ``from`` its cause. With ``progress`` from an earlier
    attempt that missed its quorum, only the missing replicas are written.
    """
    progress = progress if progress is not None else ChunkProgress()
    started_at = progress.stage
    stream = _Stream(chunk, run)
    try:
        with run.setup.window:  # a slot, for as long as the chunk's blocks are here
            stored = _store(chunk, run, attempt, progress, stream)
    except Exception as exc:
        stage = stream.sections.stage_of(exc)
        progress.stage = stage
        if isinstance(exc, QuorumNotMetError):
            progress.done, progress.expect = exc.done, exc.expect
        raise StageError(str(exc), stage=stage, batch_id=run.plan.batch_id,
                         dataset=run.config.dataset, chunk=chunk.index) from exc
    assert stream.source is not None
    timings: dict[Stage, list[float]] = {
        "ingestion": [stream.source.bytes_read, stream.seconds["ingestion"]],
        "processing": [stream.source.bytes_read, stream.seconds["processing"]],
        "distribution": [stored.size * len(stored.verified), stream.seconds["distribution"]],
    }
    moved: Moved = (stored, timings, started_at)
    progress.moved = moved
    return moved
