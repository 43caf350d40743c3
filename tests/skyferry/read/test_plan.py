"""The training read plan: every rank the same number of rows, the ranks together the epoch
once, one order whatever the world size, and exact resumes, for any chunk sizes."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.errors import ReadPlanError
from skyferry.read.plan import PlannedChunk, RankPlan, ReadPlan, shuffle_chunks

Row = tuple[str, int]


def _chunks(sizes: list[int]) -> list[PlannedChunk]:
    """Chunks of these live row counts; odd ones have a superseded part in the middle."""
    out = []
    for i, rows in enumerate(sizes):
        ranges = ((0, rows),) if i % 2 == 0 or rows < 2 else (
            (0, rows // 2), (rows // 2 + 5, rows - rows // 2))
        out.append(PlannedChunk(dataset="d", batch_id=f"b{i // 3}", index=i, key=f"k{i}",
                                digest=f"{i:064x}", size=1, nodes=("n",), ranges=ranges,
                                rows=rows))
    return out


def _rows(plan: RankPlan, first: int = 0, worker: int = 0, workers: int = 1
          ) -> list[list[Row]]:
    return [[(s.chunk.digest, int(r)) for s in slices for r in s.rows]
            for _, slices in plan.batches(first, worker=worker, workers=workers)]


def _epoch(plan: ReadPlan) -> list[Row]:
    return [(s.chunk.digest, int(r)) for s in plan.order(0, plan.rows) for r in s.rows]


def _stored(chunks: list[PlannedChunk]) -> Counter[Row]:
    return Counter((c.digest, r) for c in chunks for s, n in c.ranges for r in range(s, s + n))


SIZES = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=7)


@settings(max_examples=40, deadline=None)
@given(SIZES, st.integers(min_value=1, max_value=9), st.integers(min_value=0, max_value=3),
       st.integers(min_value=1, max_value=50))
def test_the_ranks_together_read_the_epoch_once_in_equal_shares(
        sizes: list[int], batch: int, seed: int, block: int) -> None:
    chunks = _chunks(sizes)
    plan = shuffle_chunks(chunks, seed=seed, epoch=1, block_rows=block)
    epoch = _epoch(plan)
    assert Counter(epoch) == _stored(chunks)  # the order is a permutation of the live rows
    for world in (1, 2, 8):
        for workers in (1, 2):
            for remainder in ("pad", "drop"):
                ranks = [plan.rank(r, world, batch_size=batch, remainder=remainder)
                         for r in range(world)]
                assert len({r.rows for r in ranks}) == 1  # equal shares
                read: list[Row] = []
                for rank in ranks:
                    got = [row for w in range(workers) for b in _rows(rank, 0, w, workers)
                           for row in b]
                    assert len(got) == rank.rows
                    read += got
                left = plan.rows % world
                if remainder == "drop":
                    assert Counter(read) + Counter(epoch[plan.rows - left:]) == Counter(epoch)
                else:  # padded with the epoch's first rows
                    pad = (-plan.rows) % world
                    padding = [epoch[i % len(epoch)] for i in range(pad)]  # wraps round
                    assert Counter(read) == Counter(epoch) + Counter(padding)


@settings(max_examples=30, deadline=None)
@given(SIZES, st.integers(min_value=1, max_value=9), st.sampled_from([2, 3, 8]))
def test_the_order_is_the_same_whatever_the_world_size(sizes: list[int], batch: int,
                                                       world: int) -> None:
    """Step by step, rank by rank, the batches of any world size are the epoch's order."""
    plan = shuffle_chunks(_chunks(sizes), seed=7, epoch=0, block_rows=16)
    ranks = [_rows(plan.rank(r, world, batch_size=batch, remainder="drop"))
             for r in range(world)]
    interleaved = [row for step in zip(*ranks, strict=True) for b in step for row in b]
    assert interleaved == _epoch(plan)[:len(interleaved)]
    # with workers, a loader that takes a batch from each worker in turn gets the same
    rank = plan.rank(0, world, batch_size=batch)
    by_worker = [_rows(rank, 0, w, 2) for w in range(2)]
    turns = [b for pair in zip(*by_worker, strict=False) for b in pair]
    turns += by_worker[0][len(by_worker[1]):]
    assert turns == _rows(rank)


def test_the_same_seed_gives_the_same_order_and_another_seed_another() -> None:
    chunks = _chunks([500, 300, 700, 200])
    first = _epoch(shuffle_chunks(chunks, seed=3, epoch=2))
    assert first == _epoch(shuffle_chunks(chunks, seed=3, epoch=2))
    assert first != _epoch(shuffle_chunks(chunks, seed=4, epoch=2))
    assert first != _epoch(shuffle_chunks(chunks, seed=3, epoch=3))
    # rows are shuffled within a chunk, not only the chunks
    digest = chunks[0].digest
    assert [r for d, r in first if d == digest] != list(range(500))


@settings(max_examples=30, deadline=None)
@given(SIZES, st.integers(min_value=1, max_value=7), st.sampled_from([1, 2, 8]),
       st.sampled_from([1, 2, 8]), st.sampled_from([1, 3, 8]), st.data())
def test_a_resume_reads_what_an_uninterrupted_run_would_have(
        sizes: list[int], batch: int, world: int, world2: int, world3: int,
        data: st.DataObject) -> None:
    plan = shuffle_chunks(_chunks(sizes), seed=1, epoch=0, block_rows=8)
    epoch = _epoch(plan)
    whole = [_rows(plan.rank(r, world, batch_size=batch)) for r in range(world)]
    first = plan.rank(0, world, batch_size=batch)
    k = data.draw(st.integers(min_value=0, max_value=len(whole[0])))
    consumed = first.consumed_after(k)
    # on the same world size: each rank's rest is exactly its uninterrupted rest
    for r in range(world):
        again = plan.rank(r, world, batch_size=batch, consumed=consumed)
        assert _rows(again) == whole[r][k:]
    # on another world size, twice: the rows left are read once, padding aside
    assert consumed == min(plan.rows, k * world * batch)
    second = [plan.rank(r, world2, batch_size=batch, consumed=consumed) for r in range(world2)]
    k2 = data.draw(st.integers(min_value=0, max_value=len(_rows(second[0]))))
    consumed2 = second[0].consumed_after(k2)
    read = Counter(row for rank in second for b in _rows(rank)[:k2] for row in b)
    third = [plan.rank(r, world3, batch_size=batch, consumed=consumed2) for r in range(world3)]
    read += Counter(row for rank in third for b in _rows(rank) for row in b)
    rest = Counter(epoch[consumed:])
    assert rest - read == Counter()  # nothing left out
    pads = (-(plan.rows - consumed)) % world2 + (-(plan.rows - consumed2)) % world3
    assert sum((read - rest).values()) <= pads  # read twice: only padding


def test_a_plan_refuses_what_it_cannot_give() -> None:
    plan = shuffle_chunks(_chunks([10]), seed=0, epoch=0)
    with pytest.raises(ReadPlanError, match="rank 2 is not in a world of 2"):
        plan.rank(2, 2, batch_size=4)
    with pytest.raises(ReadPlanError, match="resume point 11"):
        plan.rank(0, 1, batch_size=4, consumed=11)
    with pytest.raises(ReadPlanError, match="batch size"):
        plan.rank(0, 1, batch_size=0)


@settings(max_examples=30, deadline=None)
@given(SIZES, st.integers(min_value=1, max_value=9), st.sampled_from([1, 2, 8]), st.data())
def test_the_batches_of_some_chunks_are_the_ranks_rows_of_those_chunks(
        sizes: list[int], batch: int, world: int, data: st.DataObject) -> None:
    chunks = _chunks(sizes)
    some = {c.digest for c in data.draw(st.lists(st.sampled_from(chunks), unique_by=id))}
    plan = shuffle_chunks(chunks, seed=2, epoch=0, block_rows=8)
    for r in range(world):
        rank = plan.rank(r, world, batch_size=batch)
        mine = [row for b in _rows(rank) for row in b if row[0] in some]
        picked = [(s.chunk.digest, int(x)) for _, slices in rank.batches(chunks=some)
                  for s in slices for x in s.rows]
        assert picked == mine


@settings(max_examples=30, deadline=None)
@given(SIZES, st.integers(min_value=1, max_value=9), st.sampled_from([1, 2, 8]),
       st.integers(min_value=1, max_value=50), st.data())
def test_a_run_of_batches_is_its_batches_end_to_end(sizes: list[int], batch: int, world: int,
                                                    block: int, data: st.DataObject) -> None:
    """What the reader gathers for a run of a worker's batches (spans of the order, neighbours
    made one) is those batches' rows, batch after batch, and names exactly their chunks."""
    plan = shuffle_chunks(_chunks(sizes), seed=2, epoch=0, block_rows=block)
    rank = plan.rank(data.draw(st.integers(0, world - 1)), world, batch_size=batch)
    workers = data.draw(st.sampled_from([1, 2]))
    numbers = list(rank.numbers(data.draw(st.integers(0, 3)), worker=workers - 1,
                                workers=workers))
    lo = data.draw(st.integers(0, len(numbers)))
    run = numbers[lo:lo + data.draw(st.integers(0, 20))]
    expected = dict(rank.batches(worker=workers - 1, workers=workers))
    sizes_of, spans = rank.spans_of(run)
    pieces = plan.pieces(spans)
    assert sizes_of == [sum(len(s.rows) for s in expected[n]) for n in run]
    assert [(s.chunk.digest, int(r)) for s in pieces for r in s.rows] == [
        (s.chunk.digest, int(r)) for n in run for s in expected[n] for r in s.rows]
    assert all(a.chunk.digest != b.chunk.digest for a, b in zip(pieces, pieces[1:], strict=False))
    assert plan.chunks_in(spans) == {s.chunk.digest for s in pieces}
