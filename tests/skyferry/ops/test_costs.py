"""The cost plan's arithmetic: routes, negotiated rates, multipart requests, stale prices."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from skyferry.commit.manifest import Catalog
from skyferry.errors import EgressBudgetError, TopologyError
from skyferry.models import ChunkPart, ChunkPlan
from skyferry.ops.costs import RunRecord, check_budget, cost_plan, recent_runs, record_run
from skyferry.storage import PART_SIZE
from skyferry.topology import load_topology

TOPOLOGY = """
source_cloud: aws
source_region: r1
catalog: "{home}/catalog"
nodes:
  - {{name: a1, cloud: aws, region: r1, url: "{home}/a1", storage_usd_per_gb_month: 0.02}}
  - {{name: a2, cloud: aws, region: r2, url: "{home}/a2", storage_usd_per_gb_month: 0.02}}
  - {{name: g1, cloud: gcp, region: r1, url: "{home}/g1", storage_usd_per_gb_month: 0.01}}
intra_cloud: {{latency_ms: 20, egress_usd_per_gb: 0.02}}
links:
  - {{from: aws, to: gcp, latency_ms: 35, egress_usd_per_gb: 0.09}}
  - {{from: gcp, to: aws, latency_ms: 35, egress_usd_per_gb: 0.12}}
prices:
  version: t-1
  effective: {effective}
  put_usd_per_1000: {{aws: 5.0, gcp: 4.0}}
  get_usd_per_1000: {{aws: 0.4}}
  negotiated: [{{from: aws, to: gcp, egress_usd_per_gb: 0.05}}]
"""


def _topology(tmp_path: Path, effective: str = "2026-11-01"):  # type: ignore[no-untyped-def]
    path = tmp_path / "t.yaml"
    path.write_text(TOPOLOGY.format(home=tmp_path, effective=effective))
    return load_topology(str(path))


def _chunk(index: int, size: int) -> ChunkPlan:
    return ChunkPlan(index=index, format="binary",
                     parts=(ChunkPart(source=f"s/{index}", start=0, end=size),))


def test_each_route_is_priced_at_the_table_with_negotiated_rates(tmp_path: Path) -> None:
    topology = _topology(tmp_path)
    catalog = Catalog(topology.catalog_store())
    big = 2 * PART_SIZE + 1  # a multipart upload: 3 parts, its start and completion
    chunks = [_chunk(0, 1_000_000_000), _chunk(1, big)]
    placement = [["a1", "a2", "g1"], ["a1", "g1"]]
    plan = cost_plan(topology, catalog, dataset="d", source="s", source_cloud="aws", files=2,
                     chunks=chunks, placement=placement, replicas=3, min_clouds=2,
                     binary=True, deployed=False, block_size=4 << 20, today=date(2026, 12, 6))
    routes = {(r.hop, r.node_cloud): r for r in plan.routes}
    assert routes[("write", "aws")].bytes == 2 * 1_000_000_000 + big
    assert routes[("write", "gcp")].bytes == 1_000_000_000 + big
    assert routes[("read", None)].bytes == 1_000_000_000 + big
    # a2 is in another region of aws: intra_cloud; gcp at the negotiated 0.05, not 0.09
    assert routes[("write", "aws")].egress_usd == pytest.approx(0.02)
    assert routes[("write", "gcp")].egress_usd == pytest.approx((1e9 + big) / 1e9 * 0.05,
                                                                abs=1e-6)
    assert routes[("read", None)].egress_usd == 0.0
    puts_big = 3 + 2
    assert routes[("write", "gcp")].requests == (1e9 // PART_SIZE + 1 + 2) + puts_big
    assert routes[("write", "gcp")].requests_usd == pytest.approx(
        routes[("write", "gcp")].requests * 4.0 / 1000, abs=1e-6)
    assert plan.storage_usd_per_month == pytest.approx(
        (2e9 + big) / 1e9 * 0.02 + (1e9 + big) / 1e9 * 0.01, abs=1e-6)
    assert plan.spans_min_clouds and plan.warnings == []
    with pytest.raises(EgressBudgetError, match=r"over the limit of \$0\.0100"):
        check_budget(plan, 0.01)
    check_budget(plan, 1.0)
    stale = cost_plan(topology, catalog, dataset="d", source="s", source_cloud="aws", files=2,
                      chunks=chunks, placement=[["a1", "a2"], ["a1", "a2"]], replicas=2,
                      min_clouds=2, binary=True, deployed=False, block_size=4 << 20,
                      today=date(2027, 3, 1))
    assert not stale.spans_min_clouds
    assert any("120 days ago" in w for w in stale.warnings), stale.warnings


def test_the_eta_is_the_median_rate_of_the_last_runs(tmp_path: Path) -> None:
    topology = _topology(tmp_path)
    catalog = Catalog(topology.catalog_store())
    for n, wall in enumerate([10.0, 2.0, 4.0, 100.0]):
        record_run(catalog, RunRecord(dataset="d", batch_id=f"b{n}", at=f"2026-12-0{n + 1}",
                                      bytes_in=40_000_000, bytes_stored=20_000_000,
                                      wall_s=wall))
    assert [r.batch_id for r in recent_runs(catalog, "d")] == ["b3", "b2", "b1", "b0"]
    plan = cost_plan(topology, catalog, dataset="d", source="s", source_cloud="aws", files=1,
                     chunks=[_chunk(0, 80_000_000)], placement=[["a1", "g1"]], replicas=2,
                     min_clouds=2, binary=False, deployed=False, block_size=4 << 20,
                     today=date(2026, 12, 6))
    # rates 4, 20, 10 and 0.4 MB/s: the median is 7 MB/s, so 80 MB take 11.43 s
    assert plan.eta_s == pytest.approx(80e6 / 7e6, rel=1e-3)
    assert "last 4 runs of d" in plan.eta_basis
    # converted input: stored at the runs' ratio, and said to be an estimate
    assert plan.stored_ratio == 0.5 and not plan.stored_bytes_exact
    assert {r.node_cloud: r.bytes for r in plan.routes if r.hop == "write"} == {
        "aws": 40_000_000, "gcp": 40_000_000}
    assert any("estimated" in w for w in plan.warnings)


def test_a_negotiated_rate_must_name_known_clouds(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(TOPOLOGY.format(home=tmp_path, effective="2026-11-01").replace(
        "from: aws, to: gcp, egress_usd_per_gb: 0.05", "from: aws, to: mars, "
        "egress_usd_per_gb: 0.05"))
    with pytest.raises(TopologyError, match="prices.negotiated.0.to: unknown cloud 'mars'"):
        load_topology(str(path))
