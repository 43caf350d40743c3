"""Cloud shares: balanced by bytes over the clouds that can take work, near a replica."""

from __future__ import annotations

import pytest

from flows.shares import assign_shares
from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.models import ChunkPart, ChunkPlan
from skyferry.topology import load_topology


def planned(sizes: list[int]) -> list[ChunkPlan]:
    topology = load_topology(None)
    placer = Placer(topology, "aws", "us-east-1", 3)
    nodes = placer.plan(sizes, NodeHealth(), 2)
    return [ChunkPlan(index=i, format="binary", nodes=tuple(n),
                      parts=(ChunkPart(source="file:///x", start=0, end=size),))
            for i, (size, n) in enumerate(zip(sizes, nodes, strict=True))]


def test_every_chunk_lands_in_exactly_one_share_and_bytes_balance() -> None:
    chunks = planned([100] * 30)
    shares = assign_shares(chunks, load_topology(None), ["aws", "gcp", "azure"])
    assert sorted(i for idx in shares.values() for i in idx) == list(range(30))
    counts = [len(i) for i in shares.values()]
    assert len(counts) == 3 and max(counts) - min(counts) <= 2  # within a chunk's bonus


def test_a_chunk_prefers_a_cloud_that_holds_one_of_its_replicas() -> None:
    chunks = planned([100] * 2)
    topology = load_topology(None)
    clouds_of = {n.name: n.cloud for n in topology.nodes}
    shares = assign_shares(chunks, topology, ["aws", "gcp", "azure"])
    for cloud, indices in shares.items():
        for i in indices:
            assert cloud in {clouds_of[n] for n in chunks[i].nodes}


def test_a_cloud_left_out_gets_nothing_and_the_rest_share_its_work() -> None:
    chunks = planned([100, 300, 200, 100, 100, 100])
    shares = assign_shares(chunks, load_topology(None), ["aws", "azure"])
    assert set(shares) == {"aws", "azure"}
    loads = {c: sum(chunks[i].size for i in idx) for c, idx in shares.items()}
    assert abs(loads["aws"] - loads["azure"]) <= 300
    assert assign_shares(chunks, load_topology(None), ["aws", "azure"]) == shares


def test_no_cloud_is_an_error() -> None:
    with pytest.raises(ValueError, match="no cloud"):
        assign_shares(planned([1]), load_topology(None), [])
