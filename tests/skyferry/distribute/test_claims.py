"""Claims: every unit of a batch is taken by one child, stolen when its cloud is done,
taken again when its holder stops."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.distribute.claims import ClaimBoard, Unit, assign_shares, cut_units
from skyferry.models import ChunkPart, ChunkPlan
from skyferry.storage import Store
from skyferry.topology import Topology, load_topology

CLOUDS = ("aws", "gcp", "azure")


def _chunks(sizes: list[int], topology: Topology) -> list[ChunkPlan]:
    names = [n.name for n in topology.nodes]
    return [ChunkPlan(index=i, format="csv",
                      parts=(ChunkPart(source=f"file:///s/{i}.csv", start=0, end=size),),
                      nodes=tuple(names[(i + k) % len(names)] for k in range(3)))
            for i, size in enumerate(sizes)]


def _board(tmp_path: Path, units: list[Unit]) -> ClaimBoard:
    board = ClaimBoard(Store(str(tmp_path / "catalog"), name="catalog"), "ds", "b1")
    board.post(units)
    return board


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 5_000), min_size=1, max_size=60),
       unit_bytes=st.integers(1, 20_000), clouds=st.sets(st.sampled_from(CLOUDS), min_size=1))
def test_units_hold_every_chunk_once_in_their_clouds_share(
        sizes: list[int], unit_bytes: int, clouds: set[str]) -> None:
    topology = load_topology()
    chunks = _chunks(sizes, topology)
    units = cut_units(chunks, topology, clouds, unit_bytes)
    assert sorted(i for u in units for i in u.chunks) == list(range(len(sizes)))
    assert [u.index for u in units] == list(range(len(units)))
    shares = assign_shares(chunks, topology, clouds)
    for unit in units:
        assert set(unit.chunks) <= set(shares[unit.cloud])
        assert unit.bytes == sum(sizes[i] for i in unit.chunks)
        assert len(unit.chunks) == 1 or unit.bytes <= unit_bytes
    for cloud, share in shares.items():  # each cloud's queue keeps its share's order
        assert [i for u in units if u.cloud == cloud for i in u.chunks] == share


def test_children_racing_for_units_take_each_one_once(tmp_path: Path) -> None:
    topology = load_topology()
    units = cut_units(_chunks([100] * 40, topology), topology, ["aws", "gcp"], 250)
    board = _board(tmp_path, units)
    start = Barrier(6)

    def child(n: int) -> list[int]:
        cloud = ("aws", "gcp")[n % 2]
        mine = ClaimBoard(board.store, "ds", "b1")
        start.wait()
        taken = []
        while True:
            claim, _ = mine.claim(f"child-{n}", cloud, ttl_s=60)
            if claim is None:
                return taken
            taken.append(claim.unit.index)
            claim.finish()

    with ThreadPoolExecutor(max_workers=6) as pool:
        took = list(pool.map(child, range(6)))
    assert sorted(u for t in took for u in t) == [u.index for u in units]
    state, _ = board.state()
    assert state.done == [u.index for u in units] and not state.free and not state.held


def test_a_child_whose_cloud_is_done_steals_from_the_longest_queue(tmp_path: Path) -> None:
    aws = [Unit(index=i, cloud="aws", chunks=(i,), bytes=10) for i in range(2)]
    gcp = [Unit(index=2 + i, cloud="gcp", chunks=(2 + i,), bytes=10) for i in range(3)]
    azure = [Unit(index=5, cloud="azure", chunks=(5,), bytes=10)]
    board = _board(tmp_path, [*aws, *gcp, *azure])
    taken = []
    for _ in range(3):
        claim, _ = board.claim("a", "aws", ttl_s=60)
        assert claim is not None
        taken.append((claim.unit.index, claim.stolen))
        claim.finish()
    # its own two from the head, then the tail of gcp's queue (30 bytes left, azure's 10)
    assert taken == [(0, False), (1, False), (4, True)]
    claim, _ = board.claim("g", "gcp", ttl_s=60)
    assert claim is not None and (claim.unit.index, claim.stolen) == (2, False)
    state, _ = board.state()
    assert state.stolen == [4] and state.done == [0, 1, 4] and list(state.held) == [2]


def test_a_claim_not_renewed_is_taken_again_and_its_holder_stops(tmp_path: Path) -> None:
    board = _board(tmp_path, [Unit(index=0, cloud="aws", chunks=(0, 1), bytes=20)])
    dead, state = board.claim("dead", "aws", ttl_s=60)
    assert dead is not None and not state.held
    dead.stop_renewing()  # its child was killed: no more heartbeats
    none, state = board.claim("other", "gcp", ttl_s=60)
    assert none is None and list(state.held) == [0]  # held until it expires
    board.store.put(board.claim_key(0, 0), board.body("dead", -1.0, False))  # expired now
    again, state = board.claim("other", "gcp", ttl_s=60)
    assert again is not None and again.retaken and again.attempt == 1 and state.free == [0]
    dead.renew()  # a holder that was only slow finds that it lost the unit
    assert dead.lost
    assert 0 in board.state(journaled=[0])[0].held  # one chunk of two: still held
    assert board.state(journaled=[0, 1])[0].done == [0]  # every chunk journaled: done
    again.finish()
    assert board.claim("third", "aws", ttl_s=60)[0] is None
    state, _ = board.state()
    assert state.retaken == [0] and state.stolen == [0]  # gcp's child took aws's unit


def test_a_released_claim_is_free_at_once_and_a_posted_board_is_kept(tmp_path: Path) -> None:
    units = [Unit(index=0, cloud="aws", chunks=(0,), bytes=1)]
    board = _board(tmp_path, units)
    claim, _ = board.claim("a", "aws", ttl_s=60)
    assert claim is not None
    claim.release()  # its child failed
    retry, state = board.claim("b", "aws", ttl_s=60)
    assert retry is not None and retry.attempt == 1 and state.free == [0]
    retry.finish()
    other = [Unit(index=0, cloud="gcp", chunks=(0, 1), bytes=2)]
    again = ClaimBoard(board.store, "ds", "b1")
    assert again.post(other) == units  # a retried parent gets the units posted first


def test_without_stealing_a_child_takes_only_its_clouds_units_or_an_expired_one(
        tmp_path: Path) -> None:
    units = [Unit(index=0, cloud="aws", chunks=(0,), bytes=1),
             Unit(index=1, cloud="gcp", chunks=(1,), bytes=1)]
    board = _board(tmp_path, units)
    mine, _ = board.claim("a", "aws", ttl_s=60, steal=False)
    assert mine is not None and mine.unit.index == 0
    mine.finish()
    none, state = board.claim("a", "aws", ttl_s=60, steal=False)
    assert none is None and state.free == [1]  # gcp's unit waits for gcp's child
    theirs, _ = board.claim("g", "gcp", ttl_s=60, steal=False)
    assert theirs is not None
    board.store.put(board.claim_key(1, 0), board.body("g", -1.0, False))  # its holder died
    again, _ = board.claim("a", "aws", ttl_s=60, steal=False)
    assert again is not None and again.unit.index == 1 and again.retaken and again.stolen
