"""A training read plan: which rows a rank reads, in which order, as a pure function.

The epoch's rows are put in one order, the same whatever the number of ranks and workers:
the chunks are shuffled (by ``seed`` and ``epoch``), each chunk's live rows are cut into
blocks of ``block_rows``, and the rows of each block are shuffled. Ranks then take that order
in lockstep steps of ``batch_size`` rows each: step ``s`` gives rank ``r`` the rows at
``consumed + s * world_size * batch_size + r * batch_size``. After ``k`` batches on every rank
the rows read are exactly the first ``consumed + k * world_size * batch_size`` of the order,
so a resume needs one number, and can resume on another world size.

Every rank gets the same number of rows: the rows left are padded with the epoch's first rows
(``pad``, the default) or their last ones dropped (``drop``) to a multiple of the world size.
A final step shorter than ``world_size * batch_size`` is split evenly between the ranks.

Nothing here reads storage: the plan comes from the manifests alone.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from skyferry.commit.manifest import Manifest
from skyferry.errors import ReadPlanError
from skyferry.ingest.versions import live_parts, live_sources

__all__ = ["BLOCK_ROWS", "PlannedChunk", "RankPlan", "ReadPlan", "Slice", "plan_epoch",
           "shuffle_chunks"]

BLOCK_ROWS = 4096  # rows shuffled together within a chunk
Remainder = Literal["pad", "drop"]


@dataclass(frozen=True)
class PlannedChunk:
    """A chunk as the plan sees it: its live rows (ranges of the stored rows, superseded
    source versions left out) and where its replicas are."""

    dataset: str
    batch_id: str
    index: int
    key: str
    digest: str
    size: int
    nodes: tuple[str, ...]  # its verified replicas
    ranges: tuple[tuple[int, int], ...]  # live rows: (first stored row, count)
    rows: int

    def stored_rows(self, live: np.ndarray) -> np.ndarray:
        """The stored row numbers of live rows ``live`` (positions among the live rows)."""
        if len(self.ranges) == 1:
            return live + self.ranges[0][0]
        firsts = np.array([s for s, _ in self.ranges], dtype=np.int64)
        offsets = np.cumsum([0] + [n for _, n in self.ranges[:-1]], dtype=np.int64)
        which = np.searchsorted(offsets, live, side="right") - 1
        return firsts[which] + (live - offsets[which])


@dataclass(frozen=True)
class Slice:
    """Rows of one chunk, in the plan's order: ``rows`` are stored row numbers."""

    chunk: PlannedChunk
    rows: np.ndarray


@dataclass(frozen=True)
class ReadPlan:
    """The epoch's order of rows (see the module)."""

    chunks: tuple[PlannedChunk, ...]  # in the epoch's (shuffled) order
    seed: int
    epoch: int
    block_rows: int = BLOCK_ROWS
    _starts: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))

    @property
    def rows(self) -> int:
        return int(sum(c.rows for c in self.chunks))

    def order(self, start: int, stop: int) -> Iterator[Slice]:
        """The rows at positions ``[start, stop)`` of the epoch's order, chunk by chunk.
        Positions past the epoch's end wrap to its start (padding)."""
        total = self.rows
        if total == 0:
            return
        while start < stop:
            at = start % total
            take = min(stop - start, total - at)
            yield from self._order(at, at + take)
            start += take

    def _order(self, start: int, stop: int) -> Iterator[Slice]:
        starts = self._starts
        first = int(np.searchsorted(starts, start, side="right")) - 1
        for ordinal in range(first, len(self.chunks)):
            base = int(starts[ordinal])
            if base >= stop:
                return
            chunk = self.chunks[ordinal]
            lo, hi = max(start, base) - base, min(stop, base + chunk.rows) - base
            if hi > lo:
                yield Slice(chunk, self._chunk_rows(chunk, lo, hi))

    def _chunk_rows(self, chunk: PlannedChunk, lo: int, hi: int) -> np.ndarray:
        pieces = []
        for block in range(lo // self.block_rows, (hi - 1) // self.block_rows + 1):
            b0 = block * self.block_rows
            b1 = min(b0 + self.block_rows, chunk.rows)
            order = _block_order(self.seed, self.epoch, chunk.digest, block, b1 - b0)
            pieces.append(b0 + order[max(lo, b0) - b0:min(hi, b1) - b0])
        return chunk.stored_rows(np.concatenate(pieces))

    def starts(self) -> list[int]:
        """Where each chunk's rows start in the order."""
        return [int(x) for x in self._starts[:-1]]

    def spans(self, chunks: Collection[str]) -> list[tuple[int, int]]:
        """The positions ``[start, stop)`` that ``chunks`` (digests) hold in the order."""
        starts = self._starts
        return [(int(starts[i]), int(starts[i]) + c.rows) for i, c in enumerate(self.chunks)
                if c.digest in chunks]

    def rank(self, rank: int, world_size: int, *, batch_size: int, consumed: int = 0,
             remainder: Remainder = "pad") -> RankPlan:
        """What ``rank`` of ``world_size`` reads, ``consumed`` rows into the epoch."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ReadPlanError(f"rank {rank} is not in a world of {world_size}")
        if batch_size < 1:
            raise ReadPlanError(f"the batch size must be at least 1, not {batch_size}")
        if not 0 <= consumed <= self.rows:
            raise ReadPlanError(f"the resume point {consumed} is outside the epoch's "
                                f"{self.rows} rows")
        left = self.rows - consumed
        extra = (-left) % world_size
        total = left + extra if remainder == "pad" else left - (left % world_size)
        return RankPlan(self, rank, world_size, batch_size, consumed, total // world_size)


@dataclass(frozen=True)
class RankPlan:
    """One rank's rows: ``rows`` of them, in batches, from the epoch's order."""

    plan: ReadPlan
    rank: int
    world_size: int
    batch_size: int
    consumed: int  # rows of the epoch read before this plan starts, by every rank
    rows: int  # rows this rank reads

    def batches(self, first: int = 0, *, worker: int = 0, workers: int = 1,
                chunks: Collection[str] | None = None) -> Iterator[tuple[int, list[Slice]]]:
        """``(batch number, slices)`` of this rank's batches from ``first`` on; with
        ``workers``, the batches whose number is ``worker`` modulo ``workers`` (a data
        loader that takes one batch from each worker in turn puts them back in order).
        With ``chunks`` (digests), only the batches that hold rows of those chunks, found
        without shuffling the others."""
        step = self.world_size * self.batch_size
        full = self.rows // self.batch_size  # batches in whole steps
        count = full + (1 if self.rows % self.batch_size else 0)
        spans = None if chunks is None else self.plan.spans(chunks)
        for number in range(first, count):
            if number % workers != worker:
                continue
            if number < full:
                start = self.consumed + number * step + self.rank * self.batch_size
                size = self.batch_size
            else:  # the short last step, split evenly
                size = self.rows - full * self.batch_size
                start = self.consumed + full * step + self.rank * size
            if spans is not None and not _meets(spans, start, size, self.plan.rows):
                continue
            slices = list(self.plan.order(start, start + size))
            if chunks is not None:
                slices = [s for s in slices if s.chunk.digest in chunks]
            yield number, slices

    def consumed_after(self, batches: int) -> int:
        """The resume point after every rank has read ``batches`` of its batches."""
        step = self.world_size * self.batch_size
        full = self.rows // self.batch_size
        done = min(batches, full) * step
        if batches > full and self.rows % self.batch_size:
            done += (self.rows - full * self.batch_size) * self.world_size
        return min(self.plan.rows, self.consumed + done)


def _meets(spans: list[tuple[int, int]], start: int, size: int, total: int) -> bool:
    """Whether positions ``[start, start + size)`` (past ``total``: wrapped round to the
    start) meet one of ``spans``."""
    ranges = [(start, min(start + size, total))]
    if start + size > total:
        ranges.append((0, start + size - total))
    return any(lo < b and a < hi for lo, hi in ranges for a, b in spans)


def plan_epoch(manifests: Sequence[Manifest], *, seed: int, epoch: int,
               block_rows: int = BLOCK_ROWS) -> ReadPlan:
    """The epoch's plan from the committed manifests (oldest first), reading nothing."""
    if block_rows < 1:
        raise ReadPlanError(f"block_rows must be at least 1, not {block_rows}")
    live = live_sources(manifests)
    chunks = []
    for manifest in manifests:
        for chunk in manifest.chunks:
            if chunk.format == "binary":
                raise ReadPlanError(f"{manifest.dataset}/batch={manifest.batch_id} holds "
                                    "binary chunks, which have no rows to plan")
            keep = live_parts(manifest, chunk, live)
            if len(chunk.part_rows) == len(chunk.parts):
                ranges, at = [], 0
                for rows, alive in zip(chunk.part_rows, keep, strict=True):
                    if alive and rows:
                        ranges.append((at, rows))
                    at += rows
            elif any(keep):  # written before rows were kept per part: read whole
                ranges = [(0, chunk.rows_out)] if chunk.rows_out else []
            else:
                ranges = []
            rows = sum(n for _, n in ranges)
            if not rows:
                continue
            chunks.append(PlannedChunk(
                dataset=manifest.dataset, batch_id=manifest.batch_id, index=chunk.index,
                key=chunk.key, digest=chunk.digest, size=chunk.size,
                nodes=tuple(r.node for r in chunk.verified), ranges=tuple(ranges), rows=rows))
    return shuffle_chunks(chunks, seed=seed, epoch=epoch, block_rows=block_rows)


def shuffle_chunks(chunks: Sequence[PlannedChunk], *, seed: int, epoch: int,
                   block_rows: int = BLOCK_ROWS) -> ReadPlan:
    """The epoch's plan over ``chunks`` (in a canonical order: the manifests')."""
    order = _generator(seed, epoch, "chunks", 0).permutation(len(chunks))
    shuffled = tuple(chunks[i] for i in order)
    starts = np.cumsum([0] + [c.rows for c in shuffled], dtype=np.int64)
    return ReadPlan(shuffled, seed, epoch, block_rows, starts)


@functools.lru_cache(maxsize=64)
def _block_order(seed: int, epoch: int, digest: str, block: int, rows: int) -> np.ndarray:
    """The shuffled order of one block's rows (kept for the batches that share it)."""
    order = _generator(seed, epoch, digest, block).permutation(rows)
    order.setflags(write=False)
    return order


def _generator(seed: int, epoch: int, what: str, block: int) -> np.random.Generator:
    """A random generator for one thing of one epoch: the same on every machine."""
    salt = int.from_bytes(hashlib.blake2b(what.encode(), digest_size=8).digest(), "little")
    return np.random.Generator(np.random.PCG64([seed, epoch, salt, block]))
