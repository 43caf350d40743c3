"""A rank's training rows: planned (:mod:`skyferry.read.plan`), verified and local
(:mod:`skyferry.read.fetch`), in batches, resumable from a state of a few numbers."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.retention import PIN_TTL_S, SnapshotPin
from skyferry.commit.snapshots import Snapshot, SnapshotLog, committed
from skyferry.distribute.access import node_store
from skyferry.errors import IntegrityError, ReadPlanError
from skyferry.evolution import conform, dataset_schema
from skyferry.memory import many_objects
from skyferry.read.fetch import ChunkCache, Fetcher, Mapped, ReadReport, reader_place
from skyferry.read.plan import (
    BLOCK_ROWS,
    PlannedChunk,
    RankPlan,
    ReadPlan,
    Remainder,
    Slice,
    plan_epoch,
)
from skyferry.topology import Topology, load_topology

__all__ = ["ReaderConfig", "TrainingReader", "chunk_files", "pin_snapshot", "read_to_file"]

logger = logging.getLogger("skyferry.read")

STATE_VERSION = 3
CACHE_LIMIT = 64 << 30  # default size limit of the chunk cache, bytes
_VERIFIED = 4  # chunks a reader keeps verified, beside those that runs being gathered need
_GROUPS = 8  # decoded (or decoding) row groups a reader keeps
_GROUP_ROWS = 1 << 16  # rows gathered together, then cut into batches
_THREADS = 2  # threads gathering runs of batches
_AHEAD = 4  # runs of batches gathered (or being gathered) ahead of the consumer
# rows in each row group of read_to_file's output: a row group per batch would keep
# thousands of row groups' metadata in memory until the file is closed
_OUTPUT_GROUP_ROWS = 1 << 17


@dataclass(frozen=True)
class ReaderConfig:
    """Who reads what: the same for every rank but ``rank`` (and ``worker``)."""

    dataset: str
    rank: int = 0
    world_size: int = 1
    batch_size: int = 256
    seed: int = 0
    epoch: int = 0
    worker: int = 0
    workers: int = 1
    remainder: Remainder = "pad"
    block_rows: int = BLOCK_ROWS
    cloud: str | None = None
    region: str | None = None
    cache_dir: Path | None = None
    cache_limit: int = CACHE_LIMIT
    decoded: bool = True  # keep decoded copies (Arrow IPC) in the cache: later reads skip decoding
    snapshot: str | None = None  # an id or sequence number; None: the newest when it opens
    # the reader pins its snapshot while it reads (gc keeps it), renewing the pin every third
    # of this; None: no pin
    pin_ttl_s: float | None = PIN_TTL_S
    keys: str | None = None  # an encrypted dataset's master keys (file:, env:, block:); None:
    # SKYFERRY_KEYS, then the topology's encryption.master_keys


class TrainingReader:
    """Iterates one rank's batches (Arrow tables) of one epoch.

    No row of a chunk is read before the chunk is verified: its Parquet file against the
    manifest's hash, and its decoded copy against the hash recorded when it was made from
    that verified file. A chunk is fetched from the reader's nearest replica (see
    :class:`~skyferry.read.fetch.Fetcher`).
    ``state_dict()`` after ``k`` batches, loaded into a reader of any world size, goes on
    with exactly the rows an uninterrupted run would have read next.
    """

    def __init__(self, config: ReaderConfig, *, topology: Topology | None = None,
                 manifests: list[Manifest] | None = None) -> None:
        if not 0 <= config.worker < config.workers:
            raise ReadPlanError(f"worker {config.worker} is not one of {config.workers}")
        self.config = config
        self.topology = topology or load_topology()
        self.catalog = open_catalog(self.topology)
        self._manifests = manifests
        self._snapshot: Snapshot | None = None
        self._pin: SnapshotPin | None = None
        root = config.cache_dir or self.topology.settings.home / "cache" / "chunks"
        self.fetcher = Fetcher(self.topology, self.catalog, ChunkCache(root, config.cache_limit),
                               reader_place(self.topology, config.cloud, config.region),
                               keys=config.keys)
        self.consumed = 0  # rows of the epoch read by every rank before this reader started
        self.batches_read = 0  # batches this rank has yielded since then
        self._plan: ReadPlan | None = None
        self._schema: pa.Schema | None = None
        self._files: OrderedDict[str, Future[tuple[Mapped, np.ndarray]]] = (
            OrderedDict())
        self._groups: OrderedDict[tuple[str, int], Future[tuple[Mapped, pa.Table]]] = (
            OrderedDict())
        self._lock = threading.Lock()
        self._busy: Counter[Any] = Counter()  # chunks that runs being gathered need
        self._pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="skyferry-read")

    @property
    def report(self) -> ReadReport:
        return self.fetcher.report

    @property
    def snapshot(self) -> Snapshot | None:
        """The snapshot this reader reads (None: a dataset committed before snapshots, read
        whole): ``config.snapshot``, else the newest when it first looks."""
        if self._snapshot is None and self._manifests is None:
            self.manifests()
        return self._snapshot

    def manifests(self) -> list[Manifest]:
        """The manifests of the reader's snapshot (see :func:`committed`)."""
        if self._manifests is None:
            chosen = self._snapshot or SnapshotLog(self.catalog, self.config.dataset).resolve(
                self.config.snapshot)
            self._hold(chosen)
            read = committed(self.catalog, self.config.dataset, chosen)
            for problem in read.unreadable:
                logger.warning("a manifest of %s cannot be read: %s", self.config.dataset,
                               problem)
            self._snapshot, self._manifests = read.snapshot, read.manifests
            self.report.snapshot = read.snapshot.id if read.snapshot else None
        return self._manifests

    def _hold(self, snapshot: Snapshot | None) -> None:
        """Pin ``snapshot`` (before its manifests are read) while this reader reads it."""
        if self._pin is not None and (snapshot is None or self._pin.snapshot.id != snapshot.id):
            self._pin.release()
            self._pin = None
        if snapshot is not None and self._pin is None and self.config.pin_ttl_s:
            self._pin = SnapshotPin.held_by(self, SnapshotLog(self.catalog, self.config.dataset),
                                            snapshot, ttl_s=self.config.pin_ttl_s)

    @property
    def schema(self) -> pa.Schema:
        """The dataset's schema, resolved from every chunk's (skyferry/evolution.py): every
        batch this reader yields has exactly these columns and types."""
        if self._schema is None:
            self._schema = dataset_schema(
                self.manifests(), lambda node: node_store(self.topology.node(node)))
        return self._schema

    @property
    def plan(self) -> ReadPlan:
        if self._plan is None:
            c = self.config
            with many_objects():
                self._plan = plan_epoch(self.manifests(), seed=c.seed, epoch=c.epoch,
                                        block_rows=c.block_rows)
        return self._plan

    def rank_plan(self) -> RankPlan:
        c = self.config
        return self.plan.rank(c.rank, c.world_size, batch_size=c.batch_size,
                              consumed=self.consumed, remainder=c.remainder)

    def __len__(self) -> int:
        """Batches this reader yields from where it stands."""
        return len(self.rank_plan().numbers(self.batches_read, worker=self.config.worker,
                                            workers=self.config.workers))

    def __iter__(self) -> Iterator[pa.Table]:
        return self.tables()

    def tables(self, chunks: Collection[str] | None = None) -> Iterator[pa.Table]:
        """The batches. The reader's threads work ahead of them, a run of batches at a time
        (one batch first, then up to ``_GROUP_ROWS`` rows): each finds the run's rows in
        the plan, reads the row groups that hold them (each once: mapped from the decoded
        copy, or decoded), gathers them with one ``take`` per chunk, and the batches are
        slices of the run. With ``chunks`` (digests), only the rows of those chunks: a
        batch with none of them is left out."""
        plan = self.rank_plan()
        work = self._runs(plan, chunks)
        pending: deque[tuple[_Job, Future[pa.Table]]] = deque()
        try:
            while True:
                while len(pending) < _AHEAD and (job := next(work, None)) is not None:
                    self._busy.update(job.chunks)  # kept verified until the run is read
                    pending.append((job, self._pool.submit(self._gather, plan.plan, job)))
                if not pending:
                    return
                job, future = pending[0]
                run = future.result()
                pending.popleft()
                self._busy.subtract(job.chunks)
                at = 0
                for number, size in zip(job.numbers, job.sizes, strict=True):
                    batch = run.slice(at, size)
                    at += size
                    self.batches_read = number + 1
                    yield batch
        finally:
            for job, future in pending:
                future.cancel()
                self._busy.subtract(job.chunks)

    def _runs(self, plan: RankPlan, chunks: Collection[str] | None) -> Iterator[_Job]:
        """The runs of batches to gather, one batch first (a quick first batch), then up to
        ``_GROUP_ROWS`` rows."""
        c = self.config
        limit = 1
        if chunks is None:
            numbers = plan.numbers(self.batches_read, worker=c.worker, workers=c.workers)
            at = 0
            while at < len(numbers):
                take = max(1, limit // plan.batch_size)
                sizes, spans = plan.spans_of(numbers[at:at + take])
                yield _Job(list(numbers[at:at + take]), sizes, plan.plan.chunks_in(spans),
                           spans=spans)
                at += take
                limit = min(take * plan.batch_size * 4, _GROUP_ROWS)
            return
        job, slices = _Job([], [], set()), list[Slice]()
        for number, found in plan.batches(self.batches_read, worker=c.worker,
                                          workers=c.workers, chunks=chunks):
            if found:
                job.numbers.append(number)
                job.sizes.append(sum(len(s.rows) for s in found))
                job.chunks.update(s.chunk.digest for s in found)
                for piece in found:
                    _append(slices, piece)
                if sum(job.sizes) >= limit:
                    limit = min(max(limit, sum(job.sizes)) * 4, _GROUP_ROWS)
                    job.slices = slices
                    yield job
                    job, slices = _Job([], [], set()), []
        if job.numbers:
            job.slices = slices
            yield job

    def _gather(self, plan: ReadPlan, job: _Job) -> pa.Table:
        """The rows of ``job``'s batches, end to end."""
        slices = plan.pieces(job.spans) if job.slices is None else job.slices
        tables = [self._take(piece) for piece in slices]
        return tables[0] if len(tables) == 1 else pa.concat_tables(
            tables, promote_options="permissive")

    def span(self, start: int, stop: int) -> Iterator[pa.Table]:
        """The rows at positions ``[start, stop)`` of the epoch's order, a table per chunk."""
        for piece in self.plan.order(start, stop):
            yield self._take(piece)

    # resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: eight numbers. ``consumed`` is where this reader's plan
        started and ``batches`` the batches it has read since (with workers: the batch after
        this worker's last one)."""
        c = self.config
        snapshot = self.snapshot
        return {"v": STATE_VERSION, "seed": c.seed, "epoch": c.epoch, "rows": self.plan.rows,
                "world_size": c.world_size, "batch_size": c.batch_size,
                "consumed": self.consumed, "batches": self.batches_read,
                "snapshot": snapshot.id if snapshot is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state``. On the same world size and batch size each rank (and worker)
        reads exactly what it would have read next. On another, every rank is taken to have
        read ``batches`` batches (as data-parallel training does), and the rows after those
        are shared out anew."""
        c = self.config
        if state.get("v") not in (2, STATE_VERSION):
            raise ReadPlanError(f"a reader state of version {state.get('v')!r} cannot be "
                                f"loaded (this reader's is {STATE_VERSION})")
        self._read_snapshot_of(state.get("snapshot"))
        if (state["seed"], state["epoch"]) != (c.seed, c.epoch):
            raise ReadPlanError(f"the state is of seed {state['seed']}, epoch "
                                f"{state['epoch']}; this reader reads seed {c.seed}, epoch "
                                f"{c.epoch}")
        if state["rows"] != self.plan.rows:
            raise ReadPlanError(f"the state was saved over {state['rows']} rows; "
                                f"{c.dataset} now has {self.plan.rows} (a batch was "
                                "committed or dropped since)")
        consumed, batches = int(state["consumed"]), int(state["batches"])
        if (state["world_size"], state["batch_size"]) == (c.world_size, c.batch_size):
            self.consumed, self.batches_read = consumed, batches
            return
        saved = self.plan.rank(0, int(state["world_size"]), batch_size=int(state["batch_size"]),
                               consumed=consumed, remainder=c.remainder)
        self.consumed, self.batches_read = saved.consumed_after(batches), 0

    def _read_snapshot_of(self, saved: str | None) -> None:
        """Read the snapshot a state was saved on (so a commit since changes nothing): a
        reader opened on no snapshot in particular takes it; one opened on another refuses."""
        if saved is None:
            return
        current = self.snapshot
        if current is not None and current.id == saved:
            return
        if self.config.snapshot is not None:
            raise ReadPlanError(f"the state was saved on snapshot {saved} of "
                                f"{self.config.dataset}; this reader reads snapshot "
                                f"{current.id if current else self.config.snapshot}")
        self._snapshot = SnapshotLog(self.catalog, self.config.dataset).resolve(saved)
        self._manifests = self._plan = self._schema = None

    # rows -----------------------------------------------------------------------------
    def _take(self, piece: Slice) -> pa.Table:
        """``piece``'s rows, in order: one ``take`` over the row groups that hold them (a
        piece is a run's rows of one chunk: a few row groups)."""
        chunk, rows = piece.chunk, piece.rows
        _, starts = self._file(chunk)
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= starts[-1]:
            raise IntegrityError(f"chunk {chunk.index} of {chunk.dataset}/batch="
                                 f"{chunk.batch_id} holds {starts[-1]} rows; its manifest "
                                 f"counts {high + 1} or more", dataset=chunk.dataset,
                                 batch_id=chunk.batch_id, chunk=chunk.index)
        first, last = (int(g) for g in np.searchsorted(starts, [low, high], side="right") - 1)
        tables = [self._group(chunk, g) for g in range(first, last + 1)]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        taken = pc.take(table, pa.array(rows - starts[first]),
                        boundscheck=False)  # in bounds: checked above
        return conform(taken, self.schema)

    def _file(self, chunk: PlannedChunk) -> tuple[Mapped, np.ndarray]:
        """The verified copy of ``chunk``, mapped, and where each of its row groups starts."""
        return self._once(self._files, chunk.digest, _VERIFIED, lambda: self._verify(chunk))

    def _verify(self, chunk: PlannedChunk) -> tuple[Mapped, np.ndarray]:
        # verified before any of its rows is read
        mapped = self.fetcher.open(chunk, decoded=self.config.decoded)
        if self.config.decoded:
            opened = pa.ipc.open_file(mapped.buffer)
            counts = [opened.get_batch(i).num_rows for i in range(opened.num_record_batches)]
        else:
            meta = pq.read_metadata(pa.BufferReader(mapped.buffer))
            counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return mapped, np.cumsum([0, *counts], dtype=np.int64)

    def _group(self, chunk: PlannedChunk, group: int) -> pa.Table:
        """Row group ``group`` of ``chunk``; the last ``_GROUPS`` are kept, and the mapped
        pages of one that is dropped are let go of (see :class:`Mapped`)."""
        _, table = self._once(self._groups, (chunk.digest, group), _GROUPS,
                              lambda: (self._file(chunk)[0], self._decode(chunk, group)),
                              lambda made: made[0].release_arrays(made[1]))
        return table

    def _decode(self, chunk: PlannedChunk, group: int) -> pa.Table:
        """Row group ``group`` of ``chunk`` (its record batch in the decoded copy), through a
        reader of its own: a Parquet reader is not to be shared between threads, and the
        mapped file reads at an offset without moving a position."""
        mapped, _ = self._file(chunk)
        if self.config.decoded:
            return pa.Table.from_batches([pa.ipc.open_file(mapped.buffer).get_batch(group)])
        table = pq.ParquetFile(pa.BufferReader(mapped.buffer)).read_row_group(group)
        mapped.release()  # the row group is decoded: its pages are not needed
        return table

    def _once(self, made: OrderedDict[Any, Future[Any]], key: Any, keep: int,
              make: Callable[[], Any], dropped: Callable[[Any], None] | None = None) -> Any:
        """``make()``, made once by the first thread that needs it (the others wait for
        it), of which the last ``keep`` are kept; ``dropped`` is called with each one
        dropped."""
        gone: list[Future[Any]] = []
        with self._lock:
            found = made.get(key)
            mine = found is None
            if found is None:
                found = made[key] = Future()
                # the oldest dropped, but not a chunk that a run being gathered needs
                idle = [k for k in made if k != key and not self._busy[k]]
                for old in idle[:max(0, len(made) - keep)]:
                    gone.append(made.pop(old))
            else:
                made.move_to_end(key)
        for future in gone:
            if dropped is not None and future.done() and future.exception() is None:
                dropped(future.result())
        if mine:
            try:
                found.set_result(make())
            except BaseException as exc:
                with self._lock:
                    if made.get(key) is found:
                        del made[key]  # the next one to need it tries again
                found.set_exception(exc)
        return found.result()

    def close(self) -> None:
        if self._pin is not None:
            self._pin.release()
            self._pin = None
        self._pool.shutdown(cancel_futures=True)  # waits for the runs being gathered
        self._files.clear()
        self._groups.clear()


@dataclass
class _Job:
    """A run of batches to gather: their numbers and sizes, the chunks that hold their
    rows, and the rows (``spans`` of the epoch's order, or ``slices`` found already)."""

    numbers: list[int]
    sizes: list[int]
    chunks: set[str]
    spans: list[tuple[int, int]] = field(default_factory=list)
    slices: list[Slice] | None = None


def _append(slices: list[Slice], piece: Slice) -> None:
    """Append ``piece`` to ``slices``, made one with the last slice if of the same chunk."""
    if slices and slices[-1].chunk.digest == piece.chunk.digest:
        slices[-1] = Slice(piece.chunk, np.concatenate([slices[-1].rows, piece.rows]))
    else:
        slices.append(piece)


def pin_snapshot(config: ReaderConfig, topology: Topology | None = None) -> ReaderConfig:
    """``config`` naming its snapshot: the newest now when it names none. A front end whose
    workers each open a reader pins it first, so that a commit between two workers' opens
    cannot give them different snapshots."""
    if config.snapshot is not None:
        return config
    head = SnapshotLog(open_catalog(topology or load_topology()), config.dataset).resolve(None)
    return config if head is None else dataclasses.replace(config, snapshot=head.id)


def chunk_files(dataset: str, *, verify: bool = True, topology: Topology | None = None,
                cloud: str | None = None, region: str | None = None,
                cache_dir: Path | None = None, cache_limit: int = CACHE_LIMIT
                ) -> tuple[list[str], ReadReport]:
    """Every live chunk of ``dataset`` as one file each, for DuckDB, Polars or pyarrow: with
    ``verify``, local paths of verified copies in the cache (``cache_limit`` must hold them
    all); without, the URL of each chunk's nearest replica (verified when it was written, not
    read now)."""
    reader = TrainingReader(ReaderConfig(dataset, cloud=cloud, region=region,
                                         cache_dir=cache_dir, cache_limit=cache_limit),
                            topology=topology)
    plan = plan_epoch(reader.manifests(), seed=0, epoch=0)
    ordered = sorted(plan.chunks, key=lambda c: (c.batch_id, c.index))
    if verify:
        need = sum(c.size for c in ordered)
        if need > cache_limit:
            raise ReadPlanError(f"{dataset}'s {len(ordered)} chunks ({need / 1e9:.2f} GB) do not "
                                f"fit in a cache of {cache_limit / 1e9:.2f} GB")
        return [str(reader.fetcher.local(c)) for c in ordered], reader.report
    out = []
    for chunk in ordered:
        nearest = reader.fetcher.nearest(chunk)
        if not nearest:
            raise ReadPlanError(f"chunk {chunk.index} of {dataset}/batch={chunk.batch_id} "
                                "has no verified replica")
        node = reader.topology.node(nearest[0])
        out.append(node.open_store().url_of(chunk.key))
    return out, reader.report


def read_to_file(config: ReaderConfig, to: Path, *,
                 topology: Topology | None = None) -> tuple[int, ReadReport]:
    """Write the rows ``config``'s rank reads, in its order, to a Parquet file ``to``
    (whole or not at all). Returns the rows written and what was read."""
    reader = TrainingReader(config, topology=topology)
    to = Path(to)
    temp = to.with_name(f".{to.name}.part")
    rows = 0
    writer: pq.ParquetWriter | None = None
    held: list[pa.Table] = []  # batches not yet written: a row group holds many batches
    try:
        for table in reader:
            if writer is None:  # every batch has the dataset's resolved schema
                writer = pq.ParquetWriter(temp, reader.schema, compression="zstd")
            held.append(table)
            rows += table.num_rows
            if sum(t.num_rows for t in held) >= _OUTPUT_GROUP_ROWS:
                writer.write_table(pa.concat_tables(held))
                held.clear()
        if writer is None:
            raise ReadPlanError(f"rank {config.rank} of {config.world_size} reads no rows of "
                                f"{config.dataset}")
        if held:
            writer.write_table(pa.concat_tables(held))
            held.clear()
        writer.close()
        writer = None
        temp.replace(to)
    finally:
        if writer is not None:
            writer.close()
        temp.unlink(missing_ok=True)
        reader.close()
    return rows, reader.report
