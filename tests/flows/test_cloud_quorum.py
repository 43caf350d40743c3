"""Quorums that survive the loss of a cloud: a committed chunk's verified replicas span two
clouds, or the run commits nothing (unless min_clouds: 1, and then the manifest says so)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog
from skyferry.config import PipelineConfig
from skyferry.distribute.placement import NodeHealth, Placer
from skyferry.distribute.replication import FanOut, ReplicaWriter
from skyferry.errors import InsufficientCloudsError, QuorumNotMetError
from skyferry.ops.export import export_dataset
from skyferry.topology import load_topology
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _topology(tmp_path: Path, disabled: set[str]) -> str:
    """The embedded default topology with the nodes ``disabled`` switched off."""
    lines = []
    for line in resources.files("skyferry").joinpath("default_topology.yaml").read_text(
            ).splitlines():
        name = line.split("name:")[1].split(",")[0].strip() if "name:" in line else None
        if name in disabled:
            line = line.replace("}", ", enabled: false}")
        lines.append(line)
    path = tmp_path / f"topology-{len(disabled)}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _source(tmp_path: Path) -> Path:
    write_ml_csv(tmp_path / "src" / "a.csv", 3_000, seed=17)
    return tmp_path / "src"


def test_with_a_cloud_down_every_chunk_still_spans_two(home: Path, tmp_path: Path) -> None:
    result = run_pipeline(PipelineConfig(source=str(_source(tmp_path)), dataset="q1",
                                         chunk_size="24KB", topology=_topology(
                                             tmp_path, {"aws-node-1", "aws-node-2"})))
    assert result.status == "completed", result.error
    manifest = Catalog(load_topology().catalog_store()).manifest("q1")
    for chunk in manifest.chunks:
        assert {r.cloud for r in chunk.verified} == {"gcp", "azure"}
    copies = {p.parts[-5] for p in home.glob("nodes/*/manifests/q1/*/*.json")}
    assert {load_topology().node(n).cloud for n in copies} == {"gcp", "azure"}
    assert manifest.chunks_at_risk == []


def test_with_one_cloud_reachable_no_batch_is_committed(home: Path, tmp_path: Path) -> None:
    only_aws = _topology(tmp_path, {"gcp-node-1", "gcp-node-2", "azure-node-1"})
    result = run_pipeline(PipelineConfig(source=str(_source(tmp_path)), dataset="q2",
                                         chunk_size="24KB", topology=only_aws))
    assert result.status == "failed" and result.error_type == "InsufficientCloudsError"
    for node in ("gcp-node-1", "gcp-node-2", "azure-node-1"):
        assert node in (result.error or "")
    assert Catalog(load_topology().catalog_store()).manifests("q2") == []
    assert list(home.glob("**/manifests/q2/**/*.json")) == []  # no copy anywhere
    # availability instead: min_clouds 1 commits, and the manifest names the chunks at risk
    result = run_pipeline(PipelineConfig(source=str(_source(tmp_path)), dataset="q2",
                                         chunk_size="24KB", topology=only_aws, min_clouds=1))
    assert result.status == "completed", result.error
    manifest = Catalog(load_topology().catalog_store()).manifest("q2")
    assert manifest.chunks_at_risk == [c.index for c in manifest.chunks]
    assert all({r.cloud for r in c.verified} == {"aws"} for c in manifest.chunks)


def test_losing_a_whole_cloud_after_a_run_loses_nothing(home: Path, tmp_path: Path) -> None:
    assert run_pipeline(PipelineConfig(source=str(_source(tmp_path)), dataset="q3",
                                       chunk_size="24KB")).status == "completed"
    before = tmp_path / "before.parquet"
    export_dataset("q3", before)
    for cloud in ("aws", "gcp", "azure"):
        gone = [n.name for n in load_topology().nodes if n.cloud == cloud]
        for node in gone:  # the cloud's data is gone (moved aside, and back afterwards)
            (home / "nodes" / node).rename(tmp_path / f"away-{node}")
        out = tmp_path / f"without-{cloud}.parquet"
        report = export_dataset("q3", out)
        for node in gone:
            (tmp_path / f"away-{node}").rename(home / "nodes" / node)
        assert out.read_bytes() == before.read_bytes(), cloud
        assert report.chunks == len(Catalog(load_topology().catalog_store())
                                    .manifest("q3").chunks)


def _stream(data: bytes) -> Callable[[FanOut], None]:
    return lambda fan: fan.write(data)


def test_a_write_that_reaches_one_cloud_is_not_a_quorum(home: Path) -> None:
    topology = load_topology()
    health = NodeHealth()
    writer = ReplicaWriter(topology, health, Placer(topology, "aws", "us-east-1", 3), "aws")
    for node in ("gcp-node-1", "gcp-node-2", "azure-node-1"):
        health.mark(node, "down", "taken down by the test")
    try:
        with pytest.raises(QuorumNotMetError) as failed:
            writer.write(0, "q/chunk-00000.bin", _stream(b"x" * 100),
                         ["aws-node-1", "aws-node-2", "gcp-node-1"], 2, min_clouds=2)
        assert "1 cloud(s) (aws)" in str(failed.value) and "azure-node-1" in str(failed.value)
        outcome = writer.write(1, "q/chunk-00001.bin", _stream(b"y" * 100),
                               ["aws-node-1", "aws-node-2", "gcp-node-1"], 2, min_clouds=1)
        assert outcome.at_risk and len([r for r in outcome.replicas
                                        if r.state == "verified"]) == 2
        health.mark("azure-node-1", "healthy")  # a cloud back: the replicas spread to it
        outcome = writer.write(2, "q/chunk-00002.bin", _stream(b"z" * 100),
                               ["aws-node-1", "aws-node-2"], 2, min_clouds=2)
        assert not outcome.at_risk
        assert {r.cloud for r in outcome.replicas if r.state == "verified"} == {"aws", "azure"}
    finally:
        writer.close()


def test_planning_refuses_when_the_healthy_nodes_span_one_cloud(home: Path) -> None:
    topology = load_topology()
    health = NodeHealth()
    for node in ("gcp-node-1", "gcp-node-2", "azure-node-1"):
        health.mark(node, "down", "probe timed out")
    placer = Placer(topology, "aws", "us-east-1", 3)
    with pytest.raises(InsufficientCloudsError, match="azure-node-1 \\(probe timed out\\)"):
        placer.plan([10], health, 2, min_clouds=2)
    assert placer.plan([10], health, 2, min_clouds=1) == [["aws-node-1", "aws-node-2"]]
