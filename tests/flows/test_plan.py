"""``skyferry plan`` against the S3, GCS and Azure servers: the bytes of every route are the
run's, its ETA is near the run that follows, and a run over its egress limit writes nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import boto3
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog
from skyferry.config import PipelineConfig
from skyferry.ops.costs import plan_for, recent_runs
from skyferry.run.context import open_run
from skyferry.topology import load_topology
from tests.flows.test_clouds import NODES, _s3_endpoint, _s3_source_options, topology
from tests.helpers import sf_servers

pytestmark = [pytest.mark.integration, pytest.mark.clouds,
              pytest.mark.usefixtures("prefect_harness")]
__all__ = ["_s3_endpoint", "topology"]  # fixtures, used by name

EGRESS_FROM_AWS = {"aws": 0.0, "azure": 0.05, "gcp": 0.09}  # the fixture topology's links


def _put_binary(clouds: sf_servers.CloudEnv, prefix: str, sizes: list[int], seed: int) -> str:
    s3 = boto3.client("s3", endpoint_url=clouds.s3.endpoint, region_name="us-east-1",
                      aws_access_key_id=sf_servers.S3_KEY,
                      aws_secret_access_key=sf_servers.S3_SECRET)
    if "raw" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="raw")
    rng = __import__("random").Random(seed)
    for i, size in enumerate(sizes):
        s3.put_object(Bucket="raw", Key=f"{prefix}/part-{i}.bin", Body=rng.randbytes(size))
    return f"s3://raw/{prefix}/*.bin"


def _config(source: str, topology: Path, dataset: str, **extra: object) -> PipelineConfig:
    return PipelineConfig(source=source, dataset=dataset, topology=str(topology),
                          format="binary", chunk_size="256KB",
                          source_options=_s3_source_options(), **extra)


def test_a_plan_gives_each_routes_bytes_exactly_and_the_run_agrees(
        clouds: sf_servers.CloudEnv, topology: Path) -> None:
    source = _put_binary(clouds, "exact", [700_000, 300_001, 1_000_000], seed=3)
    config = _config(source, topology, "planned")
    plan = plan_for(open_run(config), deployed=False)
    assert (plan.files, plan.bytes) == (3, 2_000_001)
    assert plan.stored_bytes_exact and plan.eta_s is None  # no run recorded yet
    result = run_pipeline(config)
    assert result.status == "completed", result.error
    manifest = Catalog(load_topology(str(topology)).catalog_store()).manifest("planned")
    assert len(manifest.chunks) == plan.chunks
    # what the nodes hold, per cloud, and what it cost from aws, from the manifest
    held: Counter[str] = Counter()
    egress = 0.0
    for chunk in manifest.chunks:
        for replica in chunk.verified:
            cloud = NODES[replica.node][1]
            held[cloud] += chunk.size
            egress += chunk.size / 1e9 * EGRESS_FROM_AWS[cloud]
    writes = {r.node_cloud: r.bytes for r in plan.routes if r.hop == "write"}
    assert writes == dict(held)
    assert [(r.name, r.bytes) for r in plan.routes if r.hop == "read"] == [
        ("aws → aws", 2_000_001)]
    assert plan.egress_usd == pytest.approx(egress, abs=1e-6)
    assert result.planned_bytes_written == result.bytes_written == sum(held.values())
    assert result.planned_egress_usd == pytest.approx(result.egress_usd, abs=1e-6)
    assert plan.storage_usd_per_month == 0.0  # the fixture's nodes have no storage price
    assert plan.spans_min_clouds and plan.prices_version == "unversioned"
    assert any("no effective date" in w for w in plan.warnings)


def test_the_eta_is_within_30_percent_of_the_run_that_follows(
        clouds: sf_servers.CloudEnv, topology: Path) -> None:
    sizes = [2_000_000] * 4
    for n in range(3):  # three runs recorded: the median rate is the basis
        source = _put_binary(clouds, f"eta-{n}", sizes, seed=10 + n)
        assert run_pipeline(_config(source, topology, "eta")).status == "completed"
    catalog = Catalog(load_topology(str(topology)).catalog_store())
    assert len(recent_runs(catalog, "eta")) == 3
    source = _put_binary(clouds, "eta-next", sizes, seed=20)
    config = _config(source, topology, "eta-next-run")
    plan = plan_for(open_run(config), deployed=False)
    assert plan.eta_s is not None and "any dataset" in plan.eta_basis, plan.eta_basis
    result = run_pipeline(config)
    assert result.status == "completed", result.error
    assert abs(plan.eta_s - result.duration_s) <= 0.3 * result.duration_s, (
        plan.eta_s, result.duration_s, plan.eta_basis)
    assert result.planned_eta_s == pytest.approx(plan.eta_s, rel=0.3)


def test_a_run_over_its_egress_limit_is_refused_before_anything_is_written(
        clouds: sf_servers.CloudEnv, topology: Path) -> None:
    source = _put_binary(clouds, "costly", [1_500_000], seed=5)
    result = run_pipeline(_config(source, topology, "costly", max_egress_usd=0.00001))
    assert result.status == "failed"
    assert result.error_type == "EgressBudgetError", result.error
    assert "over the limit of $0.0000" in (result.error or "") and "nothing was written" in (
        result.error or "")
    loaded = load_topology(str(topology))
    for node in loaded.nodes:  # no replica, no manifest copy, no journal
        store = node.open_store()
        assert store.names("costly") == [] and store.names("manifests/costly") == []
    catalog = Catalog(loaded.catalog_store())
    assert catalog.store.names("manifests/costly") == []
    assert catalog.store.names("pending/costly") == []
    assert catalog.store.names("snapshots/costly") == []
    # the same run under a limit it keeps goes through
    ok = run_pipeline(_config(source, topology, "costly", max_egress_usd=1.0))
    assert ok.status == "completed", ok.error
    assert ok.egress_usd == pytest.approx(ok.planned_egress_usd or 0, abs=1e-6) and (
        ok.egress_usd < 1.0)
