"""A node that refuses a write once: the write task is retried by Prefect and the run succeeds.

The node is a bucket on the real S3 server (moto) behind a proxy that answers the first
chunk upload with ``403 AccessDenied``. With three nodes, three replicas and a quorum of three
the chunk cannot be re-placed, so its ``move-chunk`` task fails with a transient quorum
error; the retry resumes at distribution, re-probes the node, which answers, and writes
only that replica.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog
from skyferry.config import PipelineConfig
from skyferry.storage import Store
from tests.helpers import sf_servers
from tests.helpers.sf_data import write_ml_csv
from tests.helpers.sf_proxy import RefusingProxy, chunk_upload, refusing_topology

pytestmark = [pytest.mark.integration, pytest.mark.clouds,
              pytest.mark.usefixtures("prefect_harness")]


def test_a_refused_write_is_retried_and_lands(clouds: sf_servers.CloudEnv, home: Path,
                                              tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    clouds.make_bucket("s3", "refusing")
    source = tmp_path / "src" / "train.csv"
    source.parent.mkdir()
    rows = write_ml_csv(source, 3_000, seed=5)
    with RefusingProxy(clouds.s3.endpoint, chunk_upload, times=1) as proxy:
        topology = refusing_topology(tmp_path / "t.yaml", home, proxy.endpoint,
                                     bucket="refusing")
        result = run_pipeline(PipelineConfig(source=str(source), dataset="retried",
                                             topology=str(topology), chunk_size="1MB",
                                             replicas=3, quorum=3))
    assert result.status == "completed", result.error
    assert len(proxy.refused) == 1
    assert result.stages["distribution"].retries == 1
    # the retry resumed at distribution (it wrote only the refused replica), and every
    # chunk is counted once
    assert result.stages["ingestion"].retries == result.stages["processing"].retries == 0
    for stage in ("ingestion", "processing", "distribution"):
        assert result.stages[stage].items == result.chunks_processed
    assert result.rows_stored + result.rows_rejected == rows
    manifest = Catalog(Store(f"{home}/catalog", name="catalog")).manifest("retried")
    refused_key = proxy.refused[0].split(" ", 1)[1].split("?")[0].split("/data/", 1)[1]
    chunk = next(c for c in manifest.chunks if c.key == refused_key)
    assert {r.node for r in chunk.verified} == {"aws-node-1", "gcp-node-1", "azure-node-1"}
    assert chunk.attempts == 2
    # the retried task: one move-chunk per chunk
    task = "move-chunk"
    response = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [result.flow_run_id]}}, "limit": 200})
    response.raise_for_status()
    runs = response.json()
    names = {t["name"].rsplit("-", 1)[0] for t in runs}
    assert "move-chunk" in names and "write-replicas" not in names
    retried = [t for t in runs if t["run_count"] > 1]
    assert [t["name"].rsplit("-", 1)[0] for t in retried] == [task]
    assert retried[0]["state_type"] == "COMPLETED"
