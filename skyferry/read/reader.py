"""A rank's training rows: planned (:mod:`skyferry.read.plan`), verified and local
(:mod:`skyferry.read.fetch`), in batches, resumable from a state of a few numbers."""

from __future__ import annotations

import logging
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
_AHEAD = 4  # batches whose row groups are decoded ahead of the one being assembled
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
        """The batches, each assembled while the row groups of the next few are decoded
        in the background (pyarrow decodes without the GIL). With ``chunks`` (digests),
        only the rows of those chunks: a batch with none of them is left out."""
        plan = self.rank_plan()
        upcoming = plan.batches(self.batches_read, worker=self.config.worker,
                                workers=self.config.workers, chunks=chunks)
        ahead: deque[tuple[int, list[_Piece]]] = deque()
        try:
            for number, slices in upcoming:
                pieces = [self._piece(s) for s in slices]
                if not pieces:
                    continue
                ahead.append((number, pieces))
                if len(ahead) <= _AHEAD:
                    continue
                yield self._batch(*ahead.popleft())
            while ahead:
                yield self._batch(*ahead.popleft())
        finally:
            for _, pieces in ahead:
                for piece in pieces:
                    for group in piece.groups:
                        group.cancel()

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
    def _batch(self, number: int, pieces: list[_Piece]) -> pa.Table:
        tables = [piece.take() for piece in pieces]
        self.batches_read = number + 1
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables(tables, promote_options="permissive")

    def _piece(self, piece: Slice) -> _Piece:
        """The row groups ``piece`` needs, their decoding started, and where its rows are."""
        parquet, starts = self._file(piece.chunk)
        groups = np.searchsorted(starts, piece.rows, side="right") - 1
        first, last = int(groups.min()), int(groups.max())
        return _Piece([self._group(piece.chunk, parquet, g) for g in range(first, last + 1)],
                      piece.rows - starts[first])

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
        for opened, _ in self._files.values():
            opened.close()
        self._files.clear()
        self._groups.clear()


@dataclass
class _Piece:
    """One slice of a batch: the row groups that hold its rows (decoding, in order), and
    its rows' places in them, laid end to end."""

    groups: list[Future[pa.Table]]
    rows: np.ndarray

    def take(self) -> pa.Table:
        tables = [group.result() for group in self.groups]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        low, high = int(self.rows.min()), int(self.rows.max())
        return table.slice(low, high - low + 1).take(pa.array(self.rows - low))


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
