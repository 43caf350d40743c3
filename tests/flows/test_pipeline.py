"""multicloud-pipeline end to end on the embedded default (ephemeral Prefect, local nodes)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import skyferry
from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.commit.snapshots import SnapshotLog
from skyferry.config import PipelineConfig
from skyferry.errors import IntegrityError
from skyferry.ops.export import DatasetReader, export_dataset
from skyferry.ops.gc import collect_garbage
from skyferry.topology import load_topology
from tests.helpers.sf_data import replica_digest, write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

Committed = Callable[[str], list[Manifest]]


def _valid_source_rows(paths: list[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(p, on_bad_lines="skip") for p in paths]
    df = pd.concat(frames)
    df = df[pd.to_numeric(df["f0"], errors="coerce").notna()].dropna().astype({"f0": float})
    return df.sort_values("id").reset_index(drop=True)


def test_csv_rows_survive_every_stage(home: Path, tmp_path: Path, schema_file: Path,
                                      committed: Committed) -> None:
    src = tmp_path / "src"
    paths = [src / "a.csv", src / "b.csv"]
    write_ml_csv(paths[0], 3000, seed=1)
    write_ml_csv(paths[1], 2000, seed=2, start_id=10_000, bad_rows=True)
    result = run_pipeline(PipelineConfig(source=f"{src}/*.csv", dataset="train",
                                         chunk_size="40KB", schema_path=str(schema_file)))
    assert result.status == "completed", result.error
    assert result.rows_in == 5002 and result.rows_stored == 5000 and result.rows_rejected == 2
    assert result.rows_in == result.rows_stored + result.rows_rejected
    assert result.chunks_processed > 4
    for stage in ("ingestion", "processing", "distribution", "storage"):
        assert result.stages[stage].success_rate == 1.0
        assert result.stages[stage].items >= result.chunks_processed
    (manifest,) = committed("train")
    assert manifest.rows_stored == 5000
    assert sum(c.rows_out for c in manifest.chunks) == 5000

    out = tmp_path / "export.parquet"
    export_dataset("train", out)
    exported = pq.read_table(out).to_pandas().sort_values("id").reset_index(drop=True)
    expected = _valid_source_rows(paths)
    pd.testing.assert_frame_equal(exported, expected, check_dtype=False)

    reasons = Counter()
    from skyferry.commit.manifest import Catalog
    from skyferry.topology import load_topology
    catalog = Catalog(load_topology().catalog_store())
    for chunk in manifest.chunks:
        if chunk.rejects_key:
            for r in catalog.load_rejects(chunk.rejects_key):
                reasons[r["reason"].split(":")[0]] += 1
                assert r["source"].endswith("b.csv")
    assert sum(reasons.values()) == 2


def test_binary_bytes_round_trip_through_three_clouds(home: Path, tmp_path: Path,
                                                     committed: Committed) -> None:
    import numpy as np

    src = tmp_path / "blobs"
    src.mkdir()
    rng = np.random.default_rng(3)
    originals = {f"img-{i}.bin": rng.bytes(size) for i, size in enumerate([250_000, 7, 90_001])}
    for name, data in originals.items():
        (src / name).write_bytes(data)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="blobs", chunk_size=100_000))
    assert result.status == "completed", result.error
    (manifest,) = committed("blobs")
    assert sum(c.size for c in manifest.chunks) == sum(len(d) for d in originals.values())
    for chunk in manifest.chunks:
        clouds = [r.cloud for r in chunk.verified]
        assert len(chunk.verified) == 3
        assert clouds.count("aws") >= 2 and any(c != "aws" for c in clouds)
        for replica in chunk.verified:
            assert replica_digest(home, replica.node, chunk.key) == chunk.digest
    assert result.stages["distribution"].cross_cloud_transfers == len(manifest.chunks)
    assert set(result.stages["storage"].by_cloud or {}) == {"aws", "gcp", "azure"}

    out = tmp_path / "restored"
    export_dataset("blobs", out)
    for name, data in originals.items():
        assert (out / name).read_bytes() == data


def test_a_node_that_dies_mid_run_is_routed_around(home: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  committed: Committed) -> None:
    from tests.helpers import sf_faults

    sf_faults.reset()
    monkeypatch.setenv("SF_BREAK_NODE", "aws-node-2")
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 6000, seed=4)
    result = run_pipeline(PipelineConfig(
        source=str(src), dataset="failover", chunk_size="30KB",
        transforms=["tests.helpers.sf_faults:break_node_on_second_chunk"]))
    assert result.status == "completed", result.error
    assert "aws-node-2" in result.down_nodes
    assert result.node_failures_handled >= 1
    assert result.stages["distribution"].node_failures_handled == result.node_failures_handled
    assert result.stages["distribution"].replica_success_rate < 1.0
    (manifest,) = committed("failover")
    assert len(manifest.chunks) >= 6
    late = [c for c in manifest.chunks if c.node_failures]
    assert late, "some chunk must have lost its planned replica on aws-node-2"
    for chunk in manifest.chunks:
        good = [r for r in chunk.verified
                if replica_digest(home, r.node, chunk.key) == chunk.digest]
        # A replica verified on aws-node-2 before its disk went is gone with the disk:
        # only there may a listed replica be unreadable, and repair owes it.
        assert {r.node for r in chunk.verified} - {r.node for r in good} <= {"aws-node-2"}
        assert len(good) >= 2 and len({r.cloud for r in good}) >= 2
    for chunk in late:
        assert "aws-node-2" not in {r.node for r in chunk.verified}
        assert len(chunk.verified) == 3  # re-placed on another node, not just hinted

    from skyferry.ops.repair import repair_dataset
    from skyferry.topology import load_topology
    assert repair_dataset(load_topology(), "failover", lost=["aws-node-2"]).complete
    (repaired,) = committed("failover")
    for chunk in repaired.chunks:
        assert "aws-node-2" not in {r.node for r in chunk.verified}
        assert len(chunk.verified) == 3
        assert all(replica_digest(home, r.node, chunk.key) == chunk.digest
                   for r in chunk.verified)


def test_a_node_disabled_in_the_topology_is_never_used(home: Path, tmp_path: Path,
                                                      committed: Committed) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text(f"""
nodes:
  - {{name: a1, cloud: aws, region: r1, url: "{home}/nodes/a1"}}
  - {{name: a2, cloud: aws, region: r1, url: "{home}/nodes/a2", enabled: false}}
  - {{name: g1, cloud: gcp, region: r1, url: "{home}/nodes/g1"}}
catalog: "{home}/catalog"
""")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="d", topology=str(topo),
                                         chunk_size=300))
    assert result.status == "completed", result.error
    assert result.down_nodes == ["a2"]
    assert not (home / "nodes" / "a2").exists()
    assert result.stages["storage"].by_node == {"a1": 4, "g1": 4}


def test_reruns_are_idempotent_and_incremental(home: Path, tmp_path: Path,
                                              committed: Committed) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 500, seed=5)
    config = PipelineConfig(source=str(src), dataset="inc", chunk_size="8KB")
    first = run_pipeline(config)
    assert first.status == "completed"
    node_files = sorted(p.relative_to(home) for p in (home / "nodes").rglob("*") if p.is_file())

    again = run_pipeline(config)
    assert again.status == "up_to_date"
    named = run_pipeline(config.model_copy(update={"batch_id": first.batch_id}))
    assert named.status == "already_committed"
    assert sorted(p.relative_to(home) for p in (home / "nodes").rglob("*")
                  if p.is_file()) == node_files
    assert len(committed("inc")) == 1

    write_ml_csv(src / "b.csv", 200, seed=6, start_id=1000)
    second = run_pipeline(config)
    assert second.status == "completed" and second.batch_id != first.batch_id
    assert second.rows_stored == 200
    # a commit per snapshot; the runs that committed nothing made none
    log = SnapshotLog(open_catalog(load_topology()), "inc")
    assert [e.id for e in log.entries(log.sequence())] == [first.snapshot, second.snapshot]
    assert [s.url.rsplit("/", 1)[-1] for m in committed("inc")[1:] for s in m.lineage.sources] \
        == ["b.csv"]


def test_export_fails_over_from_a_corrupt_replica(home: Path, tmp_path: Path,
                                                 committed: Committed) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 1000, seed=7)
    assert run_pipeline(PipelineConfig(source=str(src), dataset="c",
                                       chunk_size="20KB")).status == "completed"
    (manifest,) = committed("c")
    clean = DatasetReader("c").read_table()
    victim = manifest.chunks[0]
    first = victim.verified[0].node
    (home / "nodes" / first / victim.key).write_bytes(b"bit rot")
    second = victim.verified[1].node
    (home / "nodes" / second / victim.key).unlink()
    reader = DatasetReader("c")
    assert reader.read_table().equals(clean)
    assert len(reader.report.failovers) == 1 and first in reader.report.failovers[0]

    (home / "nodes" / victim.verified[2].node / victim.key).write_bytes(b"also rotten")
    with pytest.raises(IntegrityError) as info:
        DatasetReader("c").read_table()
    assert info.value.chunk == victim.index and "corrupt" in str(info.value)


def test_gc_removes_only_unclaimed_objects_past_the_grace_period(home: Path, tmp_path: Path,
                                                                committed: Committed) -> None:
    from skyferry.topology import load_topology

    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(5000))
    assert run_pipeline(PipelineConfig(source=str(src), dataset="g",
                                       chunk_size=2000)).status == "completed"
    orphan = home / "nodes" / "gcp-node-2" / "g" / "date=2020-01-01" / "batch=dead" / "c.bin"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crashed run")
    young = orphan.with_name("young.bin")
    young.write_bytes(b"a run in progress")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    report = collect_garbage(load_topology(), grace_s=3600)
    assert report.deleted == ["gcp-node-2:g/date=2020-01-01/batch=dead/c.bin"]
    assert not orphan.exists() and young.exists()
    (manifest,) = committed("g")
    for chunk in manifest.chunks:
        for r in chunk.verified:
            assert replica_digest(home, r.node, chunk.key) == chunk.digest


def test_parquet_and_jsonl_sources(home: Path, tmp_path: Path) -> None:
    import json

    import pyarrow as pa

    src = tmp_path / "mixed"
    src.mkdir()
    table = pa.table({"id": list(range(5000)), "x": [i * 0.5 for i in range(5000)]})
    pq.write_table(table, src / "part.parquet", row_group_size=500)
    with open(src / "events.jsonl", "w") as fh:
        for i in range(300):
            fh.write(json.dumps({"id": 10_000 + i, "x": i * 0.25}) + "\n")
        fh.write('{"id": 1, "x": \n')  # a truncated line
    result = run_pipeline(PipelineConfig(source=str(src), dataset="mixed", chunk_size="8KB"))
    assert result.status == "completed", result.error
    assert result.rows_stored == 5300 and result.rows_rejected == 1
    got = DatasetReader("mixed").read_table().to_pandas().sort_values("id")
    assert got["id"].tolist() == list(range(5000)) + list(range(10_000, 10_300))
    assert got["x"].tolist() == [i * 0.5 for i in range(5000)] + [i * 0.25 for i in range(300)]


def test_a_replica_no_node_can_take_becomes_a_hint(home: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  committed: Committed) -> None:
    from tests.helpers import sf_faults

    sf_faults.reset()
    monkeypatch.setenv("SF_BREAK_NODE", "g1")
    topo = tmp_path / "topo.yaml"
    topo.write_text(f"""
catalog: "{home}/catalog"
nodes:
  - {{name: a1, cloud: aws, region: r, url: "{home}/nodes/a1"}}
  - {{name: a2, cloud: aws, region: r, url: "{home}/nodes/a2"}}
  - {{name: g1, cloud: gcp, region: r, url: "{home}/nodes/g1"}}
""")
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 3000, seed=9)
    config = PipelineConfig(source=str(src), dataset="h", topology=str(topo), chunk_size="20KB",
                            transforms=["tests.helpers.sf_faults:break_node_on_second_chunk"])
    # with its only gcp node gone, a chunk's replicas span one cloud: no quorum by default
    failed = run_pipeline(config)
    assert failed.status == "failed" and failed.error_type == "QuorumNotMetError"
    assert "1 cloud(s) (aws)" in (failed.error or "") and "g1" in (failed.error or "")
    assert committed("h") == []
    # availability instead: the chunks commit on aws alone, marked at risk, with g1's hint
    (home / "nodes" / "g1").unlink()  # g1 answers its probe again, and breaks again mid-run
    shutil.rmtree(home / "nodes" / "g1.gone-0")  # where the fault moves its folder
    sf_faults.reset()
    result = run_pipeline(config.model_copy(update={"min_clouds": 1, "dataset": "h2"}))
    assert result.status == "completed", result.error
    (manifest,) = committed("h2")
    hinted = [c for c in manifest.chunks if any(r.state == "hinted" for r in c.replicas)]
    assert hinted, "chunks written after g1 died must carry a hint for it"
    assert manifest.chunks_at_risk == [c.index for c in hinted] == result.chunks_at_risk
    for chunk in hinted:
        assert [r.node for r in chunk.replicas if r.state == "hinted"] == ["g1"]
        assert {r.node for r in chunk.verified} == {"a1", "a2"}
        for r in chunk.verified:
            assert replica_digest(home, r.node, chunk.key) == chunk.digest


def test_every_run_publishes_progress_breakdown_and_placement(home: Path,
                                                             tmp_path: Path) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL

    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 2000, seed=12)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="Art Set", chunk_size="20KB",
                                         tables=["iceberg", "delta"]))
    assert result.status == "completed" and result.flow_run_id
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [result.flow_run_id]}}, "limit": 50})
    response.raise_for_status()
    by_type = {a["type"]: a for a in response.json()}
    assert set(by_type) == {"progress", "table", "markdown"}
    assert by_type["progress"]["data"] == 100.0
    table = by_type["table"]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["stage"] for r in rows] == ["ingestion", "processing", "distribution", "storage"]
    assert sum(1 for r in rows if r["bottleneck"] == "yes") >= 1
    assert by_type["table"]["key"] == "art-set-stage-breakdown"
    assert f"| aws-node-1 | {result.stages['storage'].by_node['aws-node-1']} |" \
        in by_type["markdown"]["data"]
    head = SnapshotLog(open_catalog(load_topology()), "Art Set").resolve(None)
    assert head is not None and result.snapshot == head.id
    assert f"snapshot `{head.id}`" in by_type["markdown"]["data"]
    manifest = open_catalog(load_topology()).manifest("Art Set")
    assert result.lineage is not None and head.lineage == [result.lineage]
    assert [s.url for s in result.lineage.sources] == [(src / "a.csv").as_uri()]
    assert result.lineage.chunk_digests == [c.digest for c in manifest.chunks]
    assert result.lineage.code_version == skyferry.__version__
    assert result.lineage.schema_ == manifest.lineage.schema_
    assert f"1 source files, {len(manifest.chunks)} chunks" in by_type["markdown"]["data"]
    assert "iceberg skyferry.Art_Set__aws" in result.tables, result.tables_skipped
    assert "- published as iceberg skyferry.Art_Set__aws" in by_type["markdown"]["data"]
