"""The Dask task runner: chunk tasks run fused, on worker processes, with the same result."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog
from skyferry.config import PipelineConfig, get_settings
from skyferry.storage import Store
from tests.helpers.sf_data import replica_digest, write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def test_a_run_on_a_local_dask_cluster_stores_what_threads_store(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL

    source = tmp_path / "train.csv"
    rows = write_ml_csv(source, 5_000, seed=12, bad_rows=True)
    config = PipelineConfig(source=str(source), dataset="on-dask", chunk_size="64KB")
    threads = run_pipeline(config.model_copy(update={"dataset": "on-threads"}))
    monkeypatch.setenv("SKYFERRY_TASK_RUNNER", "dask")
    monkeypatch.setenv("SKYFERRY_MAX_WORKERS", "2")
    get_settings.cache_clear()
    dask = run_pipeline(config)
    assert dask.status == "completed", dask.error
    assert (dask.rows_stored, dask.rows_rejected) == (threads.rows_stored, threads.rows_rejected)
    assert dask.rows_stored + dask.rows_rejected == dask.rows_in == threads.rows_in
    assert dask.rows_stored >= rows and dask.rows_rejected > 0  # malformed rows, on both
    assert dask.stages["processing"].items == dask.chunks_processed
    catalog = Catalog(Store(f"{home}/catalog", name="catalog"))
    on_dask, on_threads = catalog.manifest("on-dask"), catalog.manifest("on-threads")
    assert [c.digest for c in on_dask.chunks] == [c.digest for c in on_threads.chunks]
    for chunk in on_dask.chunks:
        assert len(chunk.verified) == 3
        for replica in chunk.verified:
            assert replica_digest(home, replica.node, chunk.key) == chunk.digest
    # the chunk tasks were the move-chunk task, one per chunk, in the run's Dask subflow
    def moved(flow_run_ids: list[str]) -> list[dict[str, object]]:
        response = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", timeout=30, json={
            "flow_runs": {"id": {"any_": flow_run_ids}},
            "task_runs": {"name": {"like_": "move-chunk"}}, "limit": 200})
        response.raise_for_status()
        return [t for t in response.json() if t["state_type"] == "COMPLETED"]

    response = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", timeout=30, json={
        "flow_runs": {"parent_flow_run_id": {"any_": [dask.flow_run_id]}}, "limit": 10})
    response.raise_for_status()
    children = [r["id"] for r in response.json()]
    assert len(children) == 1
    assert len(moved(children)) == dask.chunks_processed
    assert len(moved([threads.flow_run_id])) == threads.chunks_processed  # threads: in the run
