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
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from skyferry.commit.manifest import Manifest
from skyferry.distribute.access import ReplicaRef
from skyferry.errors import ReadPlanError
from skyferry.ingest.versions import live_parts, readable_sources

__all__ = ["BLOCK_ROWS", "PlannedChunk", "RankPlan", "ReadPlan", "Slice", "plan_epoch",
           "shuffle_chunks"]

BLOCK_ROWS = 4096  # rows shuffled together within a chunk
Remainder = Literal["pad", "drop"]


@dataclass(frozen=True)
class PlannedChunk(ReplicaRef):
    """A chunk as the plan sees it: where its replicas are (a
    :class:`~skyferry.distribute.access.ReplicaRef`), and its live rows (ranges of the
    stored rows, superseded source versions left out)."""

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

    def order(self, start: int, stop: int) -> list[Slice]:
        """The rows at positions ``[start, stop)`` of the epoch's order, chunk by chunk.
        Positions past the epoch's end wrap to its start (padding)."""
        return self.pieces([(start, stop - start)])

    def pieces(self, spans: Iterable[tuple[int, int]]) -> list[Slice]:
        """The rows of ``spans`` (``(start, size)`` in the epoch's order; past its end:
        wrapped round to its start), end to end: a slice for each run of one chunk."""
        total = self.rows
        found: list[tuple[int, np.ndarray]] = []  # (chunk's place in the order, live rows)
        for first, size in spans:
            start, stop = first, first + size
            while total and start < stop:
                at = start % total
                take = min(stop - start, total - at)
                self._collect(at, at + take, found)
                start += take
        out = []
        while found:
            ordinal = found[-1][0]
            parts = []
            while found and found[-1][0] == ordinal:
                parts.append(found.pop()[1])
            chunk = self.chunks[ordinal]
            live = parts[0] if len(parts) == 1 else np.concatenate(parts[::-1])
            out.append(Slice(chunk, chunk.stored_rows(live)))
        return out[::-1]

    def chunks_in(self, spans: Iterable[tuple[int, int]]) -> set[str]:
        """The digests of the chunks that hold rows of ``spans`` (as in :meth:`pieces`)."""
        total = self.rows
        out: set[str] = set()
        for first, size in spans:
            if not total or size <= 0:
                continue
            if size >= total:
                return {c.digest for c in self.chunks}
            start, stop = first % total, first % total + size
            for lo, hi in ((start, min(stop, total)), (0, stop - total)):
                if hi > lo:
                    a = int(np.searchsorted(self._starts, lo, side="right")) - 1
                    b = int(np.searchsorted(self._starts, hi - 1, side="right")) - 1
                    out.update(c.digest for c in self.chunks[a:b + 1])
        return out

    def _collect(self, start: int, stop: int, found: list[tuple[int, np.ndarray]]) -> None:
        """Append the live rows at positions ``[start, stop)`` (inside the epoch): a piece
        of one block's order at a time."""
        size = self.block_rows
        ordinal = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            chunk = self.chunks[ordinal]
            base = int(self._starts[ordinal])
            lo, hi = start - base, min(stop - base, chunk.rows)
            for block in range(lo // size, (hi - 1) // size + 1):
                b0 = block * size
                rows = _block_rows(self.seed, self.epoch, chunk.digest, block, b0,
                                   min(size, chunk.rows - b0))
                found.append((ordinal, rows[max(lo, b0) - b0:min(hi, b0 + size) - b0]))
            start = base + hi
            ordinal += 1

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
        count = self.count()
        spans = None if chunks is None else self.plan.spans(chunks)
        for number in range(first, count):
            if number % workers != worker:
                continue
            ((start, size),) = self.spans_of([number])[1]
            if spans is not None and not _meets(spans, start, size, self.plan.rows):
                continue
            slices = self.plan.order(start, start + size)
            if chunks is not None:
                slices = [s for s in slices if s.chunk.digest in chunks]
            yield number, slices

    def count(self) -> int:
        """This rank's batches."""
        return -(-self.rows // self.batch_size)

    def numbers(self, first: int = 0, *, worker: int = 0, workers: int = 1) -> range:
        """The numbers of this rank's batches from ``first`` on that fall to ``worker``."""
        start = first + (worker - first) % workers
        return range(start, self.count(), workers)

    def spans_of(self, numbers: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """The sizes of batches ``numbers``, and the ``(start, size)`` spans of the epoch's
        order that hold their rows, end to end (neighbours made one)."""
        step = self.world_size * self.batch_size
        full = self.rows // self.batch_size  # batches in whole steps
        short = self.rows - full * self.batch_size  # the last step's share, split evenly
        sizes: list[int] = []
        spans: list[tuple[int, int]] = []
        for number in numbers:
            if number < full:
                start, size = self.consumed + number * step + self.rank * self.batch_size, \
                    self.batch_size
            else:
                start, size = self.consumed + full * step + self.rank * short, short
            sizes.append(size)
            if spans and sum(spans[-1]) == start:
                spans[-1] = (spans[-1][0], spans[-1][1] + size)
            else:
                spans.append((start, size))
        return sizes, spans

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
    live = readable_sources(manifests)
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
                nodes=tuple(r.node for r in chunk.verified), ranges=tuple(ranges), rows=rows,
                sealed=chunk.sealed))
    return shuffle_chunks(chunks, seed=seed, epoch=epoch, block_rows=block_rows)


def shuffle_chunks(chunks: Sequence[PlannedChunk], *, seed: int, epoch: int,
                   block_rows: int = BLOCK_ROWS) -> ReadPlan:
    """The epoch's plan over ``chunks`` (in a canonical order: the manifests')."""
    order = _generator(seed, epoch, "chunks", 0).permutation(len(chunks))
    shuffled = tuple(chunks[i] for i in order)
    starts = np.cumsum([0] + [c.rows for c in shuffled], dtype=np.int64)
    return ReadPlan(shuffled, seed, epoch, block_rows, starts)


@functools.lru_cache(maxsize=64)
def _block_rows(seed: int, epoch: int, digest: str, block: int, first: int,
                rows: int) -> np.ndarray:
    """The live rows ``[first, first + rows)`` of one block of a chunk, in the block's
    shuffled order (kept for the batches that share it): sorted by a keyed hash
    (SplitMix64's) of their place, with the place in the low bits to make each key unique."""
    key = hashlib.blake2b(f"{seed}/{epoch}/{digest}/{block}".encode(), digest_size=8)
    bits = np.uint64(max(1, (rows - 1).bit_length()))
    places = np.arange(rows, dtype=np.uint64)
    x = places + np.uint64(int.from_bytes(key.digest(), "little"))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    x >>= bits
    x <<= bits
    x |= places
    x.sort()
    x &= (np.uint64(1) << bits) - np.uint64(1)
    order = x.astype(np.int64)
    order += first
    order.setflags(write=False)
    return order


def _generator(seed: int, epoch: int, what: str, block: int) -> np.random.Generator:
    """A random generator for one thing of one epoch: the same on every machine."""
    salt = int.from_bytes(hashlib.blake2b(what.encode(), digest_size=8).digest(), "little")
    return np.random.Generator(np.random.PCG64([seed, epoch, salt, block]))
