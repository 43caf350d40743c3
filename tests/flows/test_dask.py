"""The Dask task runner: chunk tasks run fused, on worker processes, with the same result."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog
from skyferry.config import PipelineConfig, get_settings
from skyferry.storage import Store
from tests.helpers.sf_clusters import run_with_a_worker_killed
from tests.helpers.sf_data import replica_digest, write_ml_csv
from tests.helpers.sf_servers import ROOT

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
    # the chunk tasks: on Dask, one move-chunks-on-worker per 4 chunks (SKYFERRY_CHUNKS_PER_TASK)
    # in the run's Dask subflow; on threads, one move-chunk per chunk in the run
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
    assert len(moved(children)) == -(-dask.chunks_processed // 4)
    assert len(moved([threads.flow_run_id])) == threads.chunks_processed  # threads: in the run


def test_a_batch_commits_once_on_a_dask_cluster_whose_worker_is_killed(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dask scheduler` and two `dask worker` processes, as an operator starts them; one
    worker dies in the middle of a chunk, and the scheduler gives its task to the other."""
    from prefect.settings import PREFECT_API_URL

    from tests.helpers.sf_prefect import BIN, Process, wait_for
    from tests.helpers.sf_servers import free_port

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "SKYFERRY_HOME": str(home), "SF_KILL_MARKER": str(tmp_path / "killed"),
           "PYTHONPATH": str(ROOT)}
    procs = [Process("dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                        "--port", str(port), "--no-dashboard"], env,
                     tmp_path / "scheduler.log").start()]
    try:
        for n in (1, 2):
            procs.append(Process(f"dask-worker-{n}", [
                str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                "--no-dashboard", "--no-nanny", "--name", f"w{n}"], env,
                tmp_path / f"worker-{n}.log").start())
        from distributed import Client

        with Client(address, timeout=60) as client:
            wait_for("two dask workers", lambda: len(client.scheduler_info()["workers"]) >= 2,
                     60)
        run_with_a_worker_killed(home, tmp_path, monkeypatch, "dask", address, "dask-killed",
                                 seed=13)
        killed = int((tmp_path / "killed").read_text())
        assert killed in {p.proc.pid for p in procs[1:] if p.proc is not None}
        assert sum(1 for p in procs[1:] if not p.alive) == 1  # that worker is gone
    finally:
        for proc in reversed(procs):
            proc.stop()
