"""A rank's training rows: planned (:mod:`skyferry.read.plan`), verified and local
(:mod:`skyferry.read.fetch`), in batches, resumable from a state of a few numbers."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.config import get_settings
from skyferry.errors import ReadPlanError
from skyferry.read.fetch import ChunkCache, Fetcher, ReadReport, reader_place
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

__all__ = ["ReaderConfig", "TrainingReader", "chunk_files", "read_to_file"]

logger = logging.getLogger("skyferry.read")

STATE_VERSION = 2
CACHE_LIMIT = 64 << 30  # default size limit of the chunk cache, bytes
_OPEN_FILES = 4  # chunk files a reader keeps open
_GROUPS = 8  # decoded (or decoding) row groups a reader keeps
_GROUP_ROWS = 1 << 16  # rows gathered together, then cut into batches
_SEGMENTS = 16  # runs of rows from one row group above which a piece is gathered at once
_DECODERS = 2  # threads decoding row groups


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


class TrainingReader:
    """Iterates one rank's batches (Arrow tables) of one epoch.

    Each chunk is verified against its manifest hash before any of its rows is read, and
    read from the reader's nearest replica (see :class:`~skyferry.read.fetch.Fetcher`).
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
        root = config.cache_dir or get_settings().home / "cache" / "chunks"
        self.fetcher = Fetcher(self.topology, self.catalog, ChunkCache(root, config.cache_limit),
                               reader_place(self.topology, config.cloud, config.region))
        self.consumed = 0  # rows of the epoch read by every rank before this reader started
        self.batches_read = 0  # batches this rank has yielded since then
        self._plan: ReadPlan | None = None
        self._files: OrderedDict[str, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[str, int], Future[pa.Table]] = OrderedDict()
        self._decoder = ThreadPoolExecutor(max_workers=_DECODERS,
                                           thread_name_prefix="skyferry-decode")
        self._gatherer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-gather")

    @property
    def report(self) -> ReadReport:
        return self.fetcher.report

    def manifests(self) -> list[Manifest]:
        if self._manifests is None:
            manifests, unreadable = self.catalog.scan(self.config.dataset)
            for problem in unreadable:
                logger.warning("a manifest of %s cannot be read: %s", self.config.dataset,
                               problem)
            if not manifests:
                if unreadable:
                    raise unreadable[0]
                self.catalog.manifest(self.config.dataset)  # raises BatchNotFoundError
            self._manifests = manifests
        return self._manifests

    @property
    def plan(self) -> ReadPlan:
        if self._plan is None:
            c = self.config
            self._plan = plan_epoch(self.manifests(), seed=c.seed, epoch=c.epoch,
                                    block_rows=c.block_rows)
        return self._plan

    def rank_plan(self) -> RankPlan:
        c = self.config
        return self.plan.rank(c.rank, c.world_size, batch_size=c.batch_size,
                              consumed=self.consumed, remainder=c.remainder)

    def __len__(self) -> int:
        """Batches this reader yields from where it stands."""
        plan = self.rank_plan()
        count = -(-plan.rows // plan.batch_size)
        mine = len(range(self.config.worker, count, self.config.workers))
        done = len(range(self.config.worker, self.batches_read, self.config.workers))
        return mine - done

    def __iter__(self) -> Iterator[pa.Table]:
        return self.tables()

    def tables(self, chunks: Collection[str] | None = None) -> Iterator[pa.Table]:
        """The batches. A thread of the reader works ahead of them: it plans a run of
        batches (one batch first, then up to ``_GROUP_ROWS`` rows), has their row groups
        decoded by two more, and a fourth gathers the run's rows (a ``take`` per chunk and
        row group); each batch is then a slice of the run. With ``chunks`` (digests), only
        the rows of those chunks: a batch with none of them is left out."""
        plan = self.rank_plan()
        upcoming = plan.batches(self.batches_read, worker=self.config.worker,
                                workers=self.config.workers, chunks=chunks)
        made: queue.Queue[_Run | BaseException | None] = queue.Queue(maxsize=2)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(upcoming, made, stop),
                                  name="skyferry-read", daemon=True)
        worker.start()
        try:
            while (run := made.get()) is not None:
                if isinstance(run, BaseException):
                    raise run
                at = 0
                for number, size in zip(run.numbers, run.sizes, strict=True):
                    batch = run.table.slice(at, size)
                    at += size
                    self.batches_read = number + 1
                    yield batch
        finally:
            stop.set()
            while worker.is_alive():  # let it finish a put it is blocked in
                with contextlib.suppress(queue.Empty):
                    made.get(timeout=0.05)

    def _produce(self, upcoming: Iterator[tuple[int, list[Slice]]],
                 made: queue.Queue[_Run | BaseException | None], stop: threading.Event) -> None:
        def put(item: _Run | BaseException | None) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    made.put(item, timeout=0.05)
                    return True
            return False

        try:
            # planned and decoding -> gathered (on the gatherer's thread) -> handed over
            started: deque[Future[_Run]] = deque()
            batches: list[tuple[int, list[Slice]]] = []
            rows, limit = 0, 1  # the first run is one batch (a quick first batch), then more
            for number, slices in upcoming:
                if stop.is_set():
                    return
                if not slices:
                    continue
                batches.append((number, slices))
                rows += sum(len(s.rows) for s in slices)
                if rows < limit:
                    continue
                started.append(self._gatherer.submit(self._finish, *self._start(batches)))
                batches, rows, limit = [], 0, min(max(limit, rows) * 4, _GROUP_ROWS)
                while started and (started[0].done() or len(started) > 2):
                    if not put(started.popleft().result()):
                        return
            if batches:
                started.append(self._gatherer.submit(self._finish, *self._start(batches)))
            while started:
                if not put(started.popleft().result()):
                    return
            put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    def _start(self, batches: list[tuple[int, list[Slice]]]
               ) -> tuple[list[int], list[int], list[_Piece]]:
        """Each chunk's rows of these batches as one piece, its row groups' decoding
        started."""
        runs: list[tuple[PlannedChunk, list[np.ndarray]]] = []
        for _, slices in batches:
            for piece in slices:
                if runs and runs[-1][0].digest == piece.chunk.digest:
                    runs[-1][1].append(piece.rows)
                else:
                    runs.append((piece.chunk, [piece.rows]))
        pieces = [self._piece(Slice(chunk, np.concatenate(parts))) for chunk, parts in runs]
        return ([n for n, _ in batches], [sum(len(s.rows) for s in slices)
                                          for _, slices in batches], pieces)

    def _finish(self, numbers: list[int], sizes: list[int], pieces: list[_Piece]) -> _Run:
        tables = [piece.take() for piece in pieces]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(
            tables, promote_options="permissive")
        return _Run(numbers, sizes, table)

    def span(self, start: int, stop: int) -> Iterator[pa.Table]:
        """The rows at positions ``[start, stop)`` of the epoch's order, a table per chunk."""
        for piece in self.plan.order(start, stop):
            yield self._piece(piece).take()

    # resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: eight numbers. ``consumed`` is where this reader's plan
        started and ``batches`` the batches it has read since (with workers: the batch after
        this worker's last one)."""
        c = self.config
        return {"v": STATE_VERSION, "seed": c.seed, "epoch": c.epoch, "rows": self.plan.rows,
                "world_size": c.world_size, "batch_size": c.batch_size,
                "consumed": self.consumed, "batches": self.batches_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state``. On the same world size and batch size each rank (and worker)
        reads exactly what it would have read next. On another, every rank is taken to have
        read ``batches`` batches (as data-parallel training does), and the rows after those
        are shared out anew."""
        c = self.config
        if state.get("v") != STATE_VERSION:
            raise ReadPlanError(f"a reader state of version {state.get('v')!r} cannot be "
                                f"loaded (this reader's is {STATE_VERSION})")
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

    # rows -----------------------------------------------------------------------------
    def _piece(self, piece: Slice) -> _Piece:
        """The row groups ``piece`` needs, their decoding started, and where its rows are."""
        parquet, starts = self._file(piece.chunk)
        groups = np.searchsorted(starts, piece.rows, side="right") - 1
        first, last = int(groups.min()), int(groups.max())
        return _Piece([self._group(piece.chunk, parquet, g) for g in range(first, last + 1)],
                      groups - first, piece.rows - starts[groups])

    def _file(self, chunk: PlannedChunk) -> tuple[pq.ParquetFile, np.ndarray]:
        found = self._files.get(chunk.digest)
        if found is not None:
            self._files.move_to_end(chunk.digest)
            return found
        while True:
            path = self.fetcher.local(chunk)  # verified before any of its rows is read
            try:
                opened = pq.ParquetFile(path, memory_map=True)
                break
            except FileNotFoundError:  # another reader's cache trim took it: fetch it again
                logger.info("chunk %d left the cache before it was opened; fetching it again",
                            chunk.index)
        meta = opened.metadata
        starts = np.cumsum([0] + [meta.row_group(i).num_rows
                                  for i in range(meta.num_row_groups)], dtype=np.int64)
        self._files[chunk.digest] = (opened, starts)
        while len(self._files) > _OPEN_FILES:  # closed when no decode holds it any more
            self._files.popitem(last=False)
        return opened, starts

    def _group(self, chunk: PlannedChunk, parquet: pq.ParquetFile, group: int
               ) -> Future[pa.Table]:
        key = (chunk.digest, group)
        found = self._groups.get(key)
        if found is None:
            found = self._decoder.submit(parquet.read_row_group, group)
            self._groups[key] = found
            while len(self._groups) > _GROUPS:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return found

    def close(self) -> None:
        self._decoder.shutdown(cancel_futures=True)
        self._gatherer.shutdown(cancel_futures=True)
        for opened, _ in self._files.values():
            opened.close()
        self._files.clear()
        self._groups.clear()


@dataclass
class _Run:
    """Batches gathered together: their numbers, their sizes, their rows end to end."""

    numbers: list[int]
    sizes: list[int]
    table: pa.Table


@dataclass
class _Piece:
    """Rows of one chunk: the row groups that hold them (decoding, in order), and for each
    row, its row group (an index into ``groups``) and its place in that group."""

    groups: list[Future[pa.Table]]
    group_of: np.ndarray
    rows: np.ndarray

    def take(self) -> pa.Table:
        """The rows, in order: one ``take`` from each run of rows in one row group (a row
        group is one Arrow chunk, where a gather is fastest)."""
        tables = [group.result() for group in self.groups]
        cuts = np.flatnonzero(np.diff(self.group_of)) + 1
        if len(cuts) > _SEGMENTS:  # a block across two groups: its rows alternate
            table = pa.concat_tables(tables)
            offsets = np.cumsum([0] + [t.num_rows for t in tables[:-1]], dtype=np.int64)
            return table.take(pa.array(self.rows + offsets[self.group_of]))
        pieces = []
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(self.rows)], strict=True):
            rows = self.rows[lo:hi]
            low, high = int(rows.min()), int(rows.max())
            source = tables[int(self.group_of[lo])].slice(low, high - low + 1)
            pieces.append(source.take(pa.array(rows - low)))
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)


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
    try:
        for table in reader:
            if writer is None:
                writer = pq.ParquetWriter(temp, table.schema, compression="zstd")
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            raise ReadPlanError(f"rank {config.rank} of {config.world_size} reads no rows of "
                                f"{config.dataset}")
        writer.close()
        writer = None
        temp.replace(to)
    finally:
        if writer is not None:
            writer.close()
        temp.unlink(missing_ok=True)
        reader.close()
    return rows, reader.report
